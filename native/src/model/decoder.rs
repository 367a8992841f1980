//! The LLaMA-family decoder (Llama 1/2/3, Mistral, Qwen2), written once and generic over the
//! compute backend: one struct per block with `load` and `forward`, weight names as in the
//! checkpoint.

use std::sync::Mutex;

use super::checkpoint::Checkpoint;
use super::config::{Activation, ModelConfig, RopeScaling};
use super::rope::Rope;
use super::scheme::WeightScheme;
use crate::backend::{AttentionShape, Backend, CacheShape, StepInput, StepRow};
use crate::error::Result;

/// What loading the matrices of a checkpoint did: the scheme asked for, the matrices held in a
/// 16-bit format instead (rows that are not whole blocks of their format), and the bytes the
/// checkpoint stores for them.
pub struct WeightLoad {
    pub scheme: WeightScheme,
    layers: usize,
    tied: bool,
    pub fallbacks: Vec<String>,
    pub stored_bytes: usize,
}

impl WeightLoad {
    fn matrix<B: Backend>(&mut self, b: &B, ckpt: &Checkpoint, name: &str, rows: usize, cols: usize) -> Result<B::Matrix> {
        let shape = [rows, cols];
        let t = ckpt.tensor(name, &shape)?;
        self.stored_bytes += t.end - t.start;
        let (held, fell_back) = self.scheme.held_format(name, self.layers, self.tied, t.dtype, cols);
        if fell_back {
            self.fallbacks.push(name.to_string());
        }
        b.upload_matrix(&t, rows, cols, held)
    }
}

/// y (n, out) = x (n, in) @ W^T (+ b)
pub struct Linear<B: Backend> {
    pub weight: B::Matrix, // (out, in)
    pub bias: Option<B::Vector>,
    bias_len: usize,
}

impl<B: Backend> Linear<B> {
    fn load(b: &B, ckpt: &Checkpoint, prefix: &str, out: usize, inp: usize, bias: bool, w: &mut WeightLoad) -> Result<Self> {
        let weight = w.matrix(b, ckpt, &format!("{prefix}.weight"), out, inp)?;
        let bias = if bias { Some(b.upload_vector(&ckpt.vector(&format!("{prefix}.bias"), out)?)?) } else { None };
        let bias_len = if bias.is_some() { out } else { 0 };
        Ok(Linear { weight, bias, bias_len })
    }

    fn forward(&self, b: &B, n: usize, x: &B::Act, out: &mut B::Act) {
        b.matmul(n, &self.weight, self.bias.as_ref(), x, out);
    }

    fn bytes(&self, b: &B) -> usize {
        b.matrix_bytes(&self.weight) + self.bias_len * 4
    }
}

pub struct DecoderLayer<B: Backend> {
    input_layernorm: B::Vector, // (hidden,)
    q_proj: Linear<B>,          // (heads * head_dim, hidden)
    k_proj: Linear<B>,          // (kv_heads * head_dim, hidden)
    v_proj: Linear<B>,          // (kv_heads * head_dim, hidden)
    o_proj: Linear<B>,          // (hidden, heads * head_dim)
    /// The MLP's input norm: `post_attention_layernorm` in the LLaMA family,
    /// `pre_feedforward_layernorm` with sandwich norms.
    mlp_norm: B::Vector,
    gate_proj: Linear<B>, // (ffn, hidden)
    up_proj: Linear<B>,   // (ffn, hidden)
    down_proj: Linear<B>, // (hidden, ffn)
    /// Sandwich norms: `post_attention_layernorm` and `post_feedforward_layernorm`, on the
    /// attention and MLP outputs before the residual add.
    attn_out_norm: Option<B::Vector>,
    mlp_out_norm: Option<B::Vector>,
    /// Per-head q and k norms, (head_dim,) each.
    q_norm: Option<B::Vector>,
    k_norm: Option<B::Vector>,
}

impl<B: Backend> DecoderLayer<B> {
    fn load(b: &B, ckpt: &Checkpoint, cfg: &ModelConfig, i: usize, w: &mut WeightLoad) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let (h, q, kv, ffn) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
        let blocks = &cfg.blocks;
        let norm_of = |name: &str, len: usize| -> Result<B::Vector> {
            let mut values = ckpt.vector(&format!("{p}.{name}.weight"), len)?;
            values.iter_mut().for_each(|v| *v += blocks.norm_offset);
            b.upload_vector(&values)
        };
        let norm = |name: &str| norm_of(name, h);
        let sandwich = blocks.sandwich_norms;
        Ok(DecoderLayer {
            input_layernorm: norm("input_layernorm")?,
            q_proj: Linear::load(b, ckpt, &format!("{p}.self_attn.q_proj"), q, h, cfg.qkv_bias, w)?,
            k_proj: Linear::load(b, ckpt, &format!("{p}.self_attn.k_proj"), kv, h, cfg.qkv_bias, w)?,
            v_proj: Linear::load(b, ckpt, &format!("{p}.self_attn.v_proj"), kv, h, cfg.qkv_bias, w)?,
            o_proj: Linear::load(b, ckpt, &format!("{p}.self_attn.o_proj"), h, q, cfg.o_bias, w)?,
            mlp_norm: norm(if sandwich { "pre_feedforward_layernorm" } else { "post_attention_layernorm" })?,
            gate_proj: Linear::load(b, ckpt, &format!("{p}.mlp.gate_proj"), ffn, h, false, w)?,
            up_proj: Linear::load(b, ckpt, &format!("{p}.mlp.up_proj"), ffn, h, false, w)?,
            down_proj: Linear::load(b, ckpt, &format!("{p}.mlp.down_proj"), h, ffn, false, w)?,
            attn_out_norm: if sandwich { Some(norm("post_attention_layernorm")?) } else { None },
            mlp_out_norm: if sandwich { Some(norm("post_feedforward_layernorm")?) } else { None },
            q_norm: if blocks.qk_norm { Some(norm_of("self_attn.q_norm", cfg.head_dim)?) } else { None },
            k_norm: if blocks.qk_norm { Some(norm_of("self_attn.k_norm", cfg.head_dim)?) } else { None },
        })
    }

    fn bytes(&self, b: &B, hidden: usize, head_dim: usize) -> usize {
        let linears = [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj, &self.gate_proj, &self.up_proj, &self.down_proj];
        let norms = (2 + 2 * usize::from(self.attn_out_norm.is_some())) * hidden + 2 * usize::from(self.q_norm.is_some()) * head_dim;
        norms * 4 + linears.iter().map(|l| l.bytes(b)).sum::<usize>()
    }
}

/// Per-step activation buffers, (rows, width) each, allocated for the largest step seen and
/// reused by every later step.
struct Workspace<B: Backend> {
    rows: usize,
    logit_rows: usize,
    x: B::Act,
    normed: B::Act,
    q: B::Act,
    k: B::Act,
    v: B::Act,
    attn: B::Act,
    proj: B::Act,
    gate: B::Act,
    up: B::Act,
    selected: B::Act,
    logits: B::Act,
}

impl<B: Backend> Workspace<B> {
    fn new(b: &B, c: &ModelConfig, rows: usize, logit_rows: usize) -> Result<Self> {
        let (h, qd, kvd, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        Ok(Workspace {
            rows,
            logit_rows,
            x: b.activation(rows, h)?,
            normed: b.activation(rows, h)?,
            q: b.activation(rows, qd)?,
            k: b.activation(rows, kvd)?,
            v: b.activation(rows, kvd)?,
            attn: b.activation(rows, qd)?,
            proj: b.activation(rows, h)?,
            gate: b.activation(rows, ffn)?,
            up: b.activation(rows, ffn)?,
            selected: b.activation(logit_rows, h)?,
            logits: b.activation(logit_rows, c.vocab_size)?,
        })
    }
}

pub struct Decoder<B: Backend> {
    pub cfg: ModelConfig,
    pub scheme: WeightScheme,
    pub backend: B,
    /// Fused kernels where the backend has them (`fused=False` keeps one op per dispatch).
    pub fused: bool,
    embed_tokens: B::Matrix, // (vocab, hidden)
    layers: Vec<DecoderLayer<B>>,
    norm: B::Vector, // (hidden,)
    /// (vocab, hidden); None when tied to the embedding.
    lm_head: Option<B::Matrix>,
    /// Rotary tables: the model's, then the sliding layers' own (Gemma 3) if they have one.
    ropes: Vec<Rope>,
    work: Mutex<Option<Workspace<B>>>,
    /// Fallbacks and the checkpoint's bytes of the matrices.
    pub loaded: WeightLoad,
}

impl<B: Backend> Decoder<B> {
    pub fn load(backend: B, ckpt: &Checkpoint, cfg: ModelConfig, scheme: WeightScheme, fused: bool) -> Result<Self> {
        let b = &backend;
        let (h, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let name = "model.embed_tokens.weight";
        let mut w = WeightLoad { scheme, layers: cfg.num_hidden_layers, tied: cfg.tie_word_embeddings, fallbacks: Vec::new(), stored_bytes: 0 };
        let embed_tokens = w.matrix(b, ckpt, name, vocab, h)?;
        // Tied checkpoints may still carry an lm_head copy; transformers ignores it, so do we.
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(w.matrix(b, ckpt, "lm_head.weight", vocab, h)?) };
        let layers = (0..cfg.num_hidden_layers).map(|i| DecoderLayer::load(b, ckpt, &cfg, i, &mut w)).collect::<Result<_>>()?;
        let mut final_norm = ckpt.vector("model.norm.weight", h)?;
        final_norm.iter_mut().for_each(|v| *v += cfg.blocks.norm_offset);
        let norm = b.upload_vector(&final_norm)?;
        let mut ropes = vec![Rope::new(cfg.head_dim, cfg.rope_theta, &cfg.rope_scaling)];
        if let Some(theta) = cfg.blocks.rope_local_theta {
            ropes.push(Rope::new(cfg.head_dim, theta, &RopeScaling::None));
        }
        Ok(Decoder { cfg, scheme, backend, fused, embed_tokens, layers, norm, lm_head, ropes, work: Mutex::new(None), loaded: w })
    }

    /// Bytes of weights held (mapped or owned).
    pub fn weight_bytes(&self) -> usize {
        let b = &self.backend;
        let h = self.cfg.hidden_size;
        let lm = self.lm_head.as_ref().map_or(0, |m| b.matrix_bytes(m));
        b.matrix_bytes(&self.embed_tokens) + lm + h * 4 + self.layers.iter().map(|l| l.bytes(b, h, self.cfg.head_dim)).sum::<usize>()
    }

    pub fn parameter_count(&self) -> usize {
        let c = &self.cfg;
        let (h, q, kv, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let bias = if c.qkv_bias { q + 2 * kv } else { 0 } + if c.o_bias { h } else { 0 };
        let extra_norms = if c.blocks.sandwich_norms { 2 * h } else { 0 } + if c.blocks.qk_norm { 2 * c.head_dim } else { 0 };
        let per_layer = 2 * h + extra_norms + h * q + 2 * h * kv + q * h + 3 * h * ffn + bias;
        let lm = if c.tie_word_embeddings { 0 } else { c.vocab_size * h };
        c.vocab_size * h + lm + h + c.num_hidden_layers * per_layer
    }

    /// A KV cache for `slots` sequences of up to `context` positions.
    pub fn new_cache(&self, slots: usize, context: usize) -> Result<B::Cache> {
        let c = &self.cfg;
        self.backend.new_cache(CacheShape { layers: c.num_hidden_layers, kv_dim: c.kv_dim(), slots, context })
    }

    /// Runs `rows` (tokens of one or more sequences) through the model, appending their keys
    /// and values to the cache at `row.slot`, and returns the logits (len(logit_rows), vocab)
    /// of the rows listed in `logit_rows`. Token ids must be < vocab (checked by the caller).
    /// Rows of one sequence must come in position order, and every earlier position must
    /// already be in its cache or among the rows.
    pub fn forward(&self, rows: &[StepRow], cache: &mut B::Cache, logit_rows: &[usize]) -> Result<Vec<f32>> {
        let (b, c) = (&self.backend, &self.cfg);
        let (n, m) = (rows.len(), logit_rows.len());
        let mut guard = self.work.lock().unwrap_or_else(|e| e.into_inner());
        if guard.as_ref().is_none_or(|w| w.rows < n || w.logit_rows < m) {
            // Grow to the larger of what is needed and what was held: shapes settle quickly.
            let (old_n, old_m) = guard.as_ref().map_or((0, 0), |w| (w.rows, w.logit_rows));
            *guard = None;
            *guard = Some(Workspace::new(b, c, n.max(old_n), m.max(old_m))?);
        }
        let a = guard.as_mut().expect("workspace allocated above");
        let mut rope = Vec::with_capacity(self.ropes.len() * n * c.head_dim);
        for table in &self.ropes {
            for r in rows {
                table.push_row(r.pos, &mut rope);
            }
        }
        let step = b.begin_step(&StepInput { rows, rope: &rope, logit_rows })?;
        b.embed(&step, &self.embed_tokens, &mut a.x);
        if let Some(s) = c.blocks.embed_scale {
            b.scale(n, &mut a.x, s);
        }
        for (l, layer) in self.layers.iter().enumerate() {
            self.attention_block(&step, l, layer, n, cache, a);
            self.mlp_block(layer, n, a);
        }
        b.rmsnorm_logit_rows(&step, &a.x, &self.norm, c.rms_norm_eps, &mut a.selected);
        let lm_head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        b.matmul(m, lm_head, None, &a.selected, &mut a.logits);
        b.read(m, &a.logits)
    }

    /// x += out_norm(o_proj(attention(rope(qk_norm(q)), rope(qk_norm(k)), v))) for one layer
    /// (the norms where the architecture has them), writing k and v to the cache.
    fn attention_block(&self, step: &B::Step, l: usize, layer: &DecoderLayer<B>, n: usize, cache: &mut B::Cache, a: &mut Workspace<B>) {
        let (b, c) = (&self.backend, &self.cfg);
        let eps = c.rms_norm_eps;
        let hd = c.head_dim;
        let shape = AttentionShape {
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: hd,
            window: c.layer_window(l),
            scale: c.blocks.attn_scale,
        };
        let table = c.layer_rope_table(l);
        let norm = &layer.input_layernorm;
        if self.fused {
            let (q, k, v) = (&layer.q_proj, &layer.k_proj, &layer.v_proj);
            let w = [&q.weight, &k.weight, &v.weight];
            let bias = [q.bias.as_ref(), k.bias.as_ref(), v.bias.as_ref()];
            b.norm_qkv(n, &a.x, norm, eps, w, bias, &mut a.normed, &mut a.q, &mut a.k, &mut a.v);
        } else {
            b.rmsnorm(n, &a.x, norm, eps, &mut a.normed);
            layer.q_proj.forward(b, n, &a.normed, &mut a.q);
            layer.k_proj.forward(b, n, &a.normed, &mut a.k);
            layer.v_proj.forward(b, n, &a.normed, &mut a.v);
        }
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            b.head_rmsnorm(n, &mut a.q, qn, eps, hd);
            b.head_rmsnorm(n, &mut a.k, kn, eps, hd);
        }
        if self.fused {
            b.rope_kv_write(step, table, cache, l, &mut a.q, &mut a.k, &a.v, hd);
        } else {
            b.rope(step, table, &mut a.q, &mut a.k, hd);
            b.kv_write(step, cache, l, &a.k, &a.v);
        }
        b.attention(step, cache, l, shape, &a.q, &mut a.attn);
        let out = (&mut a.x, &mut a.proj, &mut a.normed);
        self.residual(n, &layer.o_proj, &a.attn, layer.attn_out_norm.as_ref(), out);
    }

    /// x += out_norm(down(act(gate(norm(x))) * up(norm(x))))
    fn mlp_block(&self, layer: &DecoderLayer<B>, n: usize, a: &mut Workspace<B>) {
        let (b, c) = (&self.backend, &self.cfg);
        let eps = c.rms_norm_eps;
        let norm = &layer.mlp_norm;
        if self.fused && c.blocks.activation == Activation::Silu {
            b.norm_gate_up(n, &a.x, norm, eps, &layer.gate_proj.weight, &layer.up_proj.weight, &mut a.normed, &mut a.gate, &mut a.up);
        } else {
            b.rmsnorm(n, &a.x, norm, eps, &mut a.normed);
            layer.gate_proj.forward(b, n, &a.normed, &mut a.gate);
            layer.up_proj.forward(b, n, &a.normed, &mut a.up);
            b.gated_act(n, c.blocks.activation, &mut a.gate, &a.up);
        }
        let out = (&mut a.x, &mut a.proj, &mut a.normed);
        self.residual(n, &layer.down_proj, &a.gate, layer.mlp_out_norm.as_ref(), out);
    }

    /// x += out_norm(y @ W^T (+ bias)), `out_norm` where the architecture has one; `proj`
    /// and `normed` are scratch.
    fn residual(&self, n: usize, linear: &Linear<B>, y: &B::Act, out_norm: Option<&B::Vector>, out: (&mut B::Act, &mut B::Act, &mut B::Act)) {
        let b = &self.backend;
        let (x, proj, normed) = out;
        match out_norm {
            None if self.fused => b.matmul_add(n, &linear.weight, linear.bias.as_ref(), y, proj, x),
            None => {
                linear.forward(b, n, y, proj);
                b.add(n, x, proj);
            }
            Some(norm) => {
                linear.forward(b, n, y, proj);
                b.rmsnorm(n, proj, norm, self.cfg.rms_norm_eps, normed);
                b.add(n, x, normed);
            }
        }
    }
}
