//! The LLaMA-family decoder (Llama 1/2/3, Mistral, Qwen2): one struct per block with `load`
//! and `forward`, weight names as in the checkpoint.

use std::path::Path;
use std::sync::Arc;

use rayon::prelude::*;

use super::config::ModelConfig;
use super::loader::Checkpoint;
use super::weights::{Matrix, WeightFormat};
use crate::backend::cpu::attention::attend_head;
use crate::backend::cpu::matmul::matmul;
use crate::backend::cpu::ops::{rmsnorm, silu_mul, Rope};
use crate::engine::kv_cache::SeqCache;
use crate::error::Result;

/// y (batch, out) = x (batch, in) @ W^T (+ b)
pub struct Linear {
    pub weight: Matrix,
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    fn load(ckpt: &Checkpoint, prefix: &str, out: usize, inp: usize, bias: bool, format: WeightFormat) -> Result<Self> {
        let weight = ckpt.matrix(&format!("{prefix}.weight"), out, inp, format)?;
        let bias = if bias { Some(ckpt.vector(&format!("{prefix}.bias"), out)?) } else { None };
        Ok(Linear { weight, bias })
    }

    fn forward(&self, x: &[f32], batch: usize, out: &mut [f32]) {
        matmul(self.weight.view(), self.weight.rows, self.weight.cols, x, batch, out);
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(b.len()) {
                row.iter_mut().zip(b).for_each(|(o, &bi)| *o += bi);
            }
        }
    }

    fn bytes(&self) -> usize {
        self.weight.byte_size() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }
}

pub struct DecoderLayer {
    input_layernorm: Vec<f32>,          // (hidden,)
    q_proj: Linear,                     // (heads * head_dim, hidden)
    k_proj: Linear,                     // (kv_heads * head_dim, hidden)
    v_proj: Linear,                     // (kv_heads * head_dim, hidden)
    o_proj: Linear,                     // (hidden, heads * head_dim)
    post_attention_layernorm: Vec<f32>, // (hidden,)
    gate_proj: Linear,                  // (ffn, hidden)
    up_proj: Linear,                    // (ffn, hidden)
    down_proj: Linear,                  // (hidden, ffn)
}

impl DecoderLayer {
    fn load(ckpt: &Checkpoint, cfg: &ModelConfig, i: usize, format: WeightFormat) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let (h, q, kv, ffn) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
        Ok(DecoderLayer {
            input_layernorm: ckpt.vector(&format!("{p}.input_layernorm.weight"), h)?,
            q_proj: Linear::load(ckpt, &format!("{p}.self_attn.q_proj"), q, h, cfg.qkv_bias, format)?,
            k_proj: Linear::load(ckpt, &format!("{p}.self_attn.k_proj"), kv, h, cfg.qkv_bias, format)?,
            v_proj: Linear::load(ckpt, &format!("{p}.self_attn.v_proj"), kv, h, cfg.qkv_bias, format)?,
            o_proj: Linear::load(ckpt, &format!("{p}.self_attn.o_proj"), h, q, cfg.o_bias, format)?,
            post_attention_layernorm: ckpt.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
            gate_proj: Linear::load(ckpt, &format!("{p}.mlp.gate_proj"), ffn, h, false, format)?,
            up_proj: Linear::load(ckpt, &format!("{p}.mlp.up_proj"), ffn, h, false, format)?,
            down_proj: Linear::load(ckpt, &format!("{p}.mlp.down_proj"), h, ffn, false, format)?,
        })
    }

    fn bytes(&self) -> usize {
        let norms = (self.input_layernorm.len() + self.post_attention_layernorm.len()) * 4;
        let linears = [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj, &self.gate_proj, &self.up_proj, &self.down_proj];
        norms + linears.iter().map(|l| l.bytes()).sum::<usize>()
    }
}

/// One token of one sequence in a step: the sequence's cache slot, its position, its token.
#[derive(Clone, Copy, Debug)]
pub struct StepRow {
    pub slot: usize,
    pub pos: usize,
    pub token: u32,
}

pub struct Llama {
    pub cfg: ModelConfig,
    pub format: WeightFormat,
    embed_tokens: Arc<Matrix>, // (vocab, hidden)
    layers: Vec<DecoderLayer>,
    norm: Vec<f32>,       // (hidden,)
    lm_head: Arc<Matrix>, // (vocab, hidden); the embedding itself when tied
    rope: Rope,
}

/// Per-step activation buffers, (rows, width) each.
struct Activations {
    x: Vec<f32>,
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

impl Llama {
    pub fn load(model_dir: &Path, cfg: ModelConfig, format: WeightFormat) -> Result<Self> {
        let ckpt = Checkpoint::open(model_dir)?;
        let (h, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let embed_tokens = Arc::new(ckpt.matrix("model.embed_tokens.weight", vocab, h, format)?);
        // Tied checkpoints may still carry an lm_head copy; transformers ignores it, so do we.
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            Arc::new(ckpt.matrix("lm_head.weight", vocab, h, format)?)
        };
        let layers = (0..cfg.num_hidden_layers).map(|i| DecoderLayer::load(&ckpt, &cfg, i, format)).collect::<Result<_>>()?;
        let norm = ckpt.vector("model.norm.weight", h)?;
        let rope = Rope::new(cfg.head_dim, cfg.rope_theta, &cfg.rope_scaling);
        Ok(Llama { cfg, format, embed_tokens, layers, norm, lm_head, rope })
    }

    /// Bytes of weights held (mapped or owned).
    pub fn weight_bytes(&self) -> usize {
        let lm = if Arc::ptr_eq(&self.embed_tokens, &self.lm_head) { 0 } else { self.lm_head.byte_size() };
        self.embed_tokens.byte_size() + lm + self.norm.len() * 4 + self.layers.iter().map(|l| l.bytes()).sum::<usize>()
    }

    pub fn parameter_count(&self) -> usize {
        let c = &self.cfg;
        let (h, q, kv, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let bias = if c.qkv_bias { q + 2 * kv } else { 0 } + if c.o_bias { h } else { 0 };
        let per_layer = 2 * h + h * q + 2 * h * kv + q * h + 3 * h * ffn + bias;
        let lm = if c.tie_word_embeddings { 0 } else { c.vocab_size * h };
        c.vocab_size * h + lm + h + c.num_hidden_layers * per_layer
    }

    pub fn new_cache(&self) -> SeqCache {
        SeqCache::new(self.cfg.num_hidden_layers, self.cfg.kv_dim())
    }

    /// Runs `rows` (tokens of one or more sequences) through the model, appending their keys
    /// and values to `caches[row.slot]`, and returns the logits (len(logit_rows), vocab) of
    /// the rows listed in `logit_rows`. Token ids must be < vocab (checked by the caller).
    /// Rows of one sequence must come in position order, and every earlier position must
    /// already be in its cache or among the rows.
    pub fn forward(&self, rows: &[StepRow], caches: &mut [SeqCache], logit_rows: &[usize]) -> Vec<f32> {
        let c = &self.cfg;
        let n = rows.len();
        let (h, qd, kvd, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let mut a = Activations {
            x: vec![0.0; n * h],
            normed: vec![0.0; n * h],
            q: vec![0.0; n * qd],
            k: vec![0.0; n * kvd],
            v: vec![0.0; n * kvd],
            attn: vec![0.0; n * qd],
            proj: vec![0.0; n * h],
            gate: vec![0.0; n * ffn],
            up: vec![0.0; n * ffn],
        };
        for (i, r) in rows.iter().enumerate() {
            self.embed_tokens.row_to_f32(r.token as usize, &mut a.x[i * h..(i + 1) * h]);
            caches[r.slot].grow_to(r.pos + 1);
        }
        let tables: Vec<(Vec<f32>, Vec<f32>)> = rows.iter().map(|r| self.rope.table(r.pos)).collect();
        for (l, layer) in self.layers.iter().enumerate() {
            self.attention_block(l, layer, rows, caches, &tables, &mut a);
            // MLP block: x += down(silu(gate(norm(x))) * up(norm(x)))
            norm_rows(&a.x, &layer.post_attention_layernorm, c.rms_norm_eps, &mut a.normed);
            layer.gate_proj.forward(&a.normed, n, &mut a.gate);
            layer.up_proj.forward(&a.normed, n, &mut a.up);
            a.gate.par_chunks_mut(ffn).zip(a.up.par_chunks(ffn)).for_each(|(g, u)| silu_mul(g, u));
            layer.down_proj.forward(&a.gate, n, &mut a.proj);
            a.x.iter_mut().zip(&a.proj).for_each(|(x, p)| *x += p);
        }
        let m = logit_rows.len();
        let mut selected = vec![0f32; m * h];
        for (j, &i) in logit_rows.iter().enumerate() {
            rmsnorm(&a.x[i * h..(i + 1) * h], &self.norm, c.rms_norm_eps, &mut selected[j * h..(j + 1) * h]);
        }
        let mut logits = vec![0f32; m * c.vocab_size];
        matmul(self.lm_head.view(), c.vocab_size, h, &selected, m, &mut logits);
        logits
    }

    /// x += o_proj(attention(rope(q), rope(k), v)) for one layer, writing k and v to the caches.
    fn attention_block(
        &self,
        l: usize,
        layer: &DecoderLayer,
        rows: &[StepRow],
        caches: &mut [SeqCache],
        tables: &[(Vec<f32>, Vec<f32>)],
        a: &mut Activations,
    ) {
        let c = &self.cfg;
        let n = rows.len();
        let (qd, kvd, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
        norm_rows(&a.x, &layer.input_layernorm, c.rms_norm_eps, &mut a.normed);
        layer.q_proj.forward(&a.normed, n, &mut a.q);
        layer.k_proj.forward(&a.normed, n, &mut a.k);
        layer.v_proj.forward(&a.normed, n, &mut a.v);
        for (i, r) in rows.iter().enumerate() {
            let (cos, sin) = &tables[i];
            Rope::apply(&mut a.q[i * qd..(i + 1) * qd], hd, cos, sin);
            Rope::apply(&mut a.k[i * kvd..(i + 1) * kvd], hd, cos, sin);
            let (keys, values) = &mut caches[r.slot].layers[l];
            keys[r.pos * kvd..(r.pos + 1) * kvd].copy_from_slice(&a.k[i * kvd..(i + 1) * kvd]);
            values[r.pos * kvd..(r.pos + 1) * kvd].copy_from_slice(&a.v[i * kvd..(i + 1) * kvd]);
        }
        let heads = c.num_attention_heads;
        let group = heads / c.num_key_value_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let window = c.sliding_window;
        let caches: &[SeqCache] = caches;
        let q = &a.q;
        a.attn.par_chunks_mut(hd).enumerate().for_each_init(Vec::new, |scores, (idx, out)| {
            let (i, head) = (idx / heads, idx % heads);
            let r = rows[i];
            let (keys, values) = &caches[r.slot].layers[l];
            let first = window.map_or(0, |w| (r.pos + 1).saturating_sub(w));
            let qh = &q[i * qd + head * hd..i * qd + (head + 1) * hd];
            attend_head(qh, keys, values, kvd, (head / group) * hd, first, r.pos, scale, scores, out);
        });
        layer.o_proj.forward(&a.attn, n, &mut a.proj);
        a.x.iter_mut().zip(&a.proj).for_each(|(x, p)| *x += p);
    }
}

/// RMSNorm of every row of x (rows, width) into out.
fn norm_rows(x: &[f32], w: &[f32], eps: f64, out: &mut [f32]) {
    let width = w.len();
    out.par_chunks_mut(width).zip(x.par_chunks(width)).for_each(|(o, xr)| rmsnorm(xr, w, eps, o));
}
