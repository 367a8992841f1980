//! One conformance suite that every backend runs: each op against a plain f64 reference on
//! fresh random inputs (tolerances stated per op), the fused ops against the composed ones,
//! and bit-identity of every row alone or in any batch.
//!
//! The GPU run needs an adapter: with only a software driver, set UPG_BATCH_GPU_ADAPTER
//! (scripts/test.sh sets `llvmpipe`). It fails, never skips, when none is found.

use std::sync::Arc;

use half::{bf16, f16};
use memmap2::MmapMut;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{AttentionShape, Backend, CacheShape, StepInput, StepRow};
use crate::backend::Activation;
use crate::tensor::{HostTensor, SharedBytes, WeightFormat};

const FORMATS: [WeightFormat; 8] = WeightFormat::ALL;

fn random(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// `values` as a mapped f32 file, the form checkpoints arrive in.
fn mapped(values: &[f32]) -> SharedBytes {
    let mut m = MmapMut::map_anon(values.len() * 4).expect("anonymous map");
    m.copy_from_slice(bytemuck::cast_slice(values));
    Arc::new(m.make_read_only().expect("read-only map"))
}

/// The values a format holds (what the kernels must multiply by).
fn rounded(values: &[f32], format: WeightFormat) -> Vec<f64> {
    match format {
        WeightFormat::F32 => values.iter().map(|&v| v as f64).collect(),
        WeightFormat::F16 => values.iter().map(|&v| f16::from_f32(v).to_f64()).collect(),
        WeightFormat::Bf16 => values.iter().map(|&v| bf16::from_f32(v).to_f64()).collect(),
        block => crate::with_block_format!(block, F => crate::quant::dequantize::<F>(&crate::quant::quantize::<F>(values))).iter().map(|&v| v as f64).collect(),
    }
}

fn upload<B: Backend>(b: &B, values: &[f32], rows: usize, cols: usize, format: WeightFormat) -> B::Matrix {
    let map = mapped(values);
    let shape = [rows, cols];
    let t = HostTensor { name: "w", dtype: WeightFormat::F32, shape: &shape, map: &map, start: 0, end: values.len() * 4 };
    b.upload_matrix(&t, rows, cols, format).expect("upload")
}

fn act<B: Backend>(b: &B, values: &[f32], rows: usize, width: usize) -> B::Act {
    let mut a = b.activation(rows, width).expect("activation");
    b.write(&mut a, values).expect("write");
    a
}

fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_close_within(what, got, want, tol, &vec![0.0; want.len()])
}

/// As `assert_close`, with an absolute allowance per element on top of the relative one.
fn assert_close_within(what: &str, got: &[f32], want: &[f64], tol: f64, slack: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((g, w), s)) in got.iter().zip(want).zip(slack).enumerate() {
        assert!((*g as f64 - w).abs() <= tol * w.abs().max(1.0) + s, "{what}: element {i}: {g} vs reference {w} (tolerance {tol}, allowance {s})");
    }
}

/// What int8 activations may add to the products (n, rows) of block-format weights `m`
/// (rows, cols) with `xs` (n, cols): a group of 32 activations is held as d * q with an error
/// of at most d / 2, d = max |x| / 127 (1% added for the rounding of d). Zero for the plain
/// formats, whose products see the activations exactly.
fn act_slack(format: WeightFormat, m: &[f64], xs: &[f32], n: usize, rows: usize, cols: usize) -> Vec<f64> {
    if format.is_plain() {
        return vec![0.0; n * rows];
    }
    let group_d = |x: &[f32]| x.iter().fold(0f64, |a, v| a.max(v.abs() as f64)) / 127.0 * 1.01;
    (0..n)
        .flat_map(|i| (0..rows).map(move |r| (i, r)))
        .map(|(i, r)| {
            let x = &xs[i * cols..(i + 1) * cols];
            x.chunks(32).enumerate().map(|(g, xg)| group_d(xg) / 2.0 * m[r * cols + g * 32..r * cols + g * 32 + xg.len()].iter().map(|w| w.abs()).sum::<f64>()).sum()
        })
        .collect()
}

fn dot(w: &[f64], x: &[f32]) -> f64 {
    w.iter().zip(x).map(|(a, b)| a * *b as f64).sum()
}

fn rms(x: &[f32], eps: f64) -> f64 {
    1.0 / (x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64 + eps).sqrt()
}

fn one_step<B: Backend>(b: &B, rows: &[StepRow], rope: &[f32], logit_rows: &[usize]) -> B::Step {
    b.begin_step(&StepInput { rows, rope, logit_rows }).expect("step")
}

/// Matrix products in every format, with bias, folded norm, residual and SwiGLU, against f64.
/// Tolerance: 1e-5 x sqrt(cols) relative to max(|ref|, 1), f32 accumulation over cols terms.
fn matmuls<B: Backend>(b: &B, rng: &mut ChaCha8Rng) {
    let eps = 1e-5;
    // Batch sizes on both sides of the GPU's matmul tiles (1, 4, 16 rows per workgroup).
    for (rows, cols, n) in [(5, 8, 1), (13, 68, 3), (70, 260, 9), (9, 36, 21), (7, 96, 1), (11, 64, 21), (6, 256, 3), (5, 512, 21)] {
        let tol = 1e-5 * (cols as f64).sqrt() * 4.0;
        for format in FORMATS.into_iter().filter(|f| f.fits_row(cols)) {
            let what = format!("{rows}x{cols} {} batch {n}", format.name());
            let (wv, uv, x, bias, g, res) =
                (random(rows * cols, rng), random(rows * cols, rng), random(n * cols, rng), random(rows, rng), random(cols, rng), random(n * rows, rng));
            let (wr, ur) = (rounded(&wv, format), rounded(&uv, format));
            let (w, u) = (upload(b, &wv, rows, cols, format), upload(b, &uv, rows, cols, format));
            let xa = act(b, &x, n, cols);
            let bias_v = b.upload_vector(&bias).unwrap();
            let g_v = b.upload_vector(&g).unwrap();
            let row = |m: &[f64], r: usize| m[r * cols..(r + 1) * cols].to_vec();
            let normed: Vec<f32> = (0..n)
                .flat_map(|i| {
                    let xi = &x[i * cols..(i + 1) * cols];
                    let inv = rms(xi, eps);
                    xi.iter().zip(&g).map(move |(&v, &gg)| (v as f64 * inv * gg as f64) as f32).collect::<Vec<_>>()
                })
                .collect();
            let reference = |xs: &[f32], m: &[f64], with_bias: bool| -> Vec<f64> {
                (0..n)
                    .flat_map(|i| (0..rows).map(move |r| (i, r)))
                    .map(|(i, r)| dot(&row(m, r), &xs[i * cols..(i + 1) * cols]) + if with_bias { bias[r] as f64 } else { 0.0 })
                    .collect()
            };

            let (slack, slack_normed) = (act_slack(format, &wr, &x, n, rows, cols), act_slack(format, &wr, &normed, n, rows, cols));
            let mut out = b.activation(n, rows).unwrap();
            b.matmul(n, &w, Some(&bias_v), &xa, &mut out);
            assert_close_within(&format!("matmul+bias {what}"), &b.read(n, &out).unwrap(), &reference(&x, &wr, true), tol, &slack);

            let mut scratch = b.activation(n, cols).unwrap();
            b.norm_matmul(n, &xa, &g_v, eps, &w, None, &mut scratch, &mut out);
            assert_close_within(&format!("norm_matmul {what}"), &b.read(n, &out).unwrap(), &reference(&normed, &wr, false), tol, &slack_normed);

            let mut acc = act(b, &res, n, rows);
            let mut scratch_out = b.activation(n, rows).unwrap();
            b.matmul_add(n, &w, Some(&bias_v), &xa, &mut scratch_out, &mut acc);
            let want: Vec<f64> = reference(&x, &wr, true).iter().zip(&res).map(|(a, &r)| a + r as f64).collect();
            assert_close_within(&format!("matmul_add {what}"), &b.read(n, &acc).unwrap(), &want, tol, &slack);

            let (mut gate, mut up) = (b.activation(n, rows).unwrap(), b.activation(n, rows).unwrap());
            b.norm_gate_up(n, &xa, &g_v, eps, &w, &u, &mut scratch, &mut gate, &mut up);
            let (gr, ur2) = (reference(&normed, &wr, false), reference(&normed, &ur, false));
            let silu = |v: f64| v / (1.0 + (-v).exp());
            let want: Vec<f64> = gr.iter().zip(&ur2).map(|(&gg, &uu)| silu(gg) * uu).collect();
            // silu' lies in [-0.1, 1.1]: an error e_g in the gate and e_u in up move the
            // product by at most 1.1 e_g |u| + |silu(g)| e_u + e_g e_u.
            let slack_up = act_slack(format, &ur, &normed, n, rows, cols);
            let slack_gated: Vec<f64> = (0..n * rows).map(|i| 1.1 * slack_normed[i] * ur2[i].abs() + silu(gr[i]).abs() * slack_up[i] + slack_normed[i] * slack_up[i]).collect();
            assert_close_within(&format!("norm_gate_up {what}"), &b.read(n, &gate).unwrap(), &want, tol, &slack_gated);

            // Batch invariance: each row alone gives the bits it gives in the batch, for the
            // plain, norm-folded and gated products.
            let run = |m: usize, xs: &B::Act| -> [Vec<f32>; 3] {
                let (mut o, mut scratch) = (b.activation(m, rows).unwrap(), b.activation(m, cols).unwrap());
                b.matmul(m, &w, Some(&bias_v), xs, &mut o);
                let plain = b.read(m, &o).unwrap();
                b.norm_matmul(m, xs, &g_v, eps, &w, None, &mut scratch, &mut o);
                let normed = b.read(m, &o).unwrap();
                let (mut gate, mut up) = (b.activation(m, rows).unwrap(), b.activation(m, rows).unwrap());
                b.norm_gate_up(m, xs, &g_v, eps, &w, &u, &mut scratch, &mut gate, &mut up);
                [plain, normed, b.read(m, &gate).unwrap()]
            };
            let batched = run(n, &xa);
            for i in 0..n {
                let alone = run(1, &act(b, &x[i * cols..(i + 1) * cols], 1, cols));
                for (form, (a1, bn)) in ["matmul", "norm_matmul", "norm_gate_up"].iter().zip(alone.iter().zip(&batched)) {
                    let same = a1.iter().zip(&bn[i * rows..(i + 1) * rows]).all(|(p, q)| p.to_bits() == q.to_bits());
                    assert!(same, "{form} {what}: row {i} alone differs from the batch");
                }
            }
        }
    }
}

/// The three attention-input products of a layer (q rows differ from k and v rows) against
/// f64, with and without biases, and each row alone against the batch.
fn qkv<B: Backend>(b: &B, rng: &mut ChaCha8Rng) {
    let eps = 1e-5;
    let (rq, rkv, cols) = (12, 5, 256);
    let tol = 1e-5 * (cols as f64).sqrt() * 4.0;
    for format in FORMATS {
        for (n, with_bias) in [(1, false), (3, true), (21, true), (21, false)] {
            let what = format!("norm_qkv {} batch {n} bias {with_bias}", format.name());
            let rows = [rq, rkv, rkv];
            let values: Vec<Vec<f32>> = rows.iter().map(|&r| random(r * cols, rng)).collect();
            let biases: Vec<Vec<f32>> = rows.iter().map(|&r| random(r, rng)).collect();
            let (x, g) = (random(n * cols, rng), random(cols, rng));
            let mats: Vec<B::Matrix> = values.iter().zip(rows).map(|(v, r)| upload(b, v, r, cols, format)).collect();
            let bias_v: Vec<B::Vector> = biases.iter().map(|v| b.upload_vector(v).unwrap()).collect();
            let g_v = b.upload_vector(&g).unwrap();
            let run = |m: usize, xs: &[f32]| -> Vec<Vec<f32>> {
                let xa = act(b, xs, m, cols);
                let mut normed = b.activation(m, cols).unwrap();
                let mut outs: Vec<B::Act> = rows.iter().map(|&r| b.activation(m, r).unwrap()).collect();
                let bias = if with_bias { [Some(&bias_v[0]), Some(&bias_v[1]), Some(&bias_v[2])] } else { [None; 3] };
                let [q, k, v] = &mut outs[..] else { unreachable!() };
                b.norm_qkv(m, &xa, &g_v, eps, [&mats[0], &mats[1], &mats[2]], bias, &mut normed, q, k, v);
                outs.iter().map(|o| b.read(m, o).unwrap()).collect()
            };
            let got = run(n, &x);
            for (s, name) in ["q", "k", "v"].iter().enumerate() {
                let wr = rounded(&values[s], format);
                let normed: Vec<f32> = (0..n)
                    .flat_map(|i| {
                        let xi = &x[i * cols..(i + 1) * cols];
                        let inv = rms(xi, eps);
                        xi.iter().zip(&g).map(move |(&v, &gg)| (v as f64 * inv * gg as f64) as f32).collect::<Vec<_>>()
                    })
                    .collect();
                let want: Vec<f64> = (0..n)
                    .flat_map(|i| (0..rows[s]).map(move |r| (i, r)))
                    .map(|(i, r)| dot(&wr[r * cols..(r + 1) * cols], &normed[i * cols..(i + 1) * cols]) + if with_bias { biases[s][r] as f64 } else { 0.0 })
                    .collect();
                assert_close_within(&format!("{what} {name}"), &got[s], &want, tol, &act_slack(format, &wr, &normed, n, rows[s], cols));
            }
            for i in 0..n {
                let alone = run(1, &x[i * cols..(i + 1) * cols]);
                for s in 0..3 {
                    let same = alone[s].iter().zip(&got[s][i * rows[s]..(i + 1) * rows[s]]).all(|(p, q)| p.to_bits() == q.to_bits());
                    assert!(same, "{what}: output {s} of row {i} alone differs from the batch");
                }
            }
        }
    }
}

/// RMSNorm (also of gathered rows and per head), gated activations, scaling, residual add and
/// embedding lookup.
fn row_ops<B: Backend>(b: &B, rng: &mut ChaCha8Rng) {
    let (n, d, eps) = (6, 100, 1e-6);
    let (x, w, y) = (random(n * d, rng), random(d, rng), random(n * d, rng));
    let xa = act(b, &x, n, d);
    let wv = b.upload_vector(&w).unwrap();
    let mut out = b.activation(n, d).unwrap();
    b.rmsnorm(n, &xa, &wv, eps, &mut out);
    let want: Vec<f64> = (0..n * d).map(|k| x[k] as f64 * rms(&x[k / d * d..(k / d + 1) * d], eps) * w[k % d] as f64).collect();
    assert_close("rmsnorm", &b.read(n, &out).unwrap(), &want, 1e-5);

    let rows: Vec<StepRow> = (0..n).map(|i| StepRow { slot: 0, pos: i, token: (i * 7 % 11) as u32 }).collect();
    let rope = vec![0f32; n * 2];
    let step = one_step(b, &rows, &rope, &[4, 1]);
    b.rmsnorm_logit_rows(&step, &xa, &wv, eps, &mut out);
    let want: Vec<f64> = [4, 1].iter().flat_map(|&i| want[i * d..(i + 1) * d].to_vec()).collect();
    assert_close("rmsnorm of logit rows", &b.read(2, &out).unwrap(), &want, 1e-5);

    for activation in [Activation::Silu, Activation::GeluTanh] {
        let mut g = act(b, &x, n, d);
        b.gated_act(n, activation, &mut g, &act(b, &y, n, d));
        let f = |a: f64| match activation {
            Activation::Silu => a / (1.0 + (-a).exp()),
            Activation::GeluTanh => 0.5 * a * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (a + 0.044715 * a.powi(3))).tanh()),
        };
        let want: Vec<f64> = x.iter().zip(&y).map(|(&a, &c)| f(a as f64) * c as f64).collect();
        assert_close(&format!("gated_act {activation:?}"), &b.read(n, &g).unwrap(), &want, 1e-5);
    }

    // Per-head norms: d = 100 split into heads of 20 (and 4 rows of 5 heads).
    let hd = 20;
    let wh = random(hd, rng);
    let mut xh = act(b, &x, n, d);
    b.head_rmsnorm(n, &mut xh, &b.upload_vector(&wh).unwrap(), eps, hd);
    let want: Vec<f64> = (0..n * d).map(|k| x[k] as f64 * rms(&x[k / hd * hd..(k / hd + 1) * hd], eps) * wh[k % hd] as f64).collect();
    assert_close("head_rmsnorm", &b.read(n, &xh).unwrap(), &want, 1e-5);

    let mut sc = act(b, &x, n, d);
    b.scale(n, &mut sc, 25.3);
    let want: Vec<f64> = x.iter().map(|&a| a as f64 * 25.3f32 as f64).collect();
    assert_close("scale", &b.read(n, &sc).unwrap(), &want, 1e-6);

    let mut s = act(b, &x, n, d);
    b.add(n, &mut s, &act(b, &y, n, d));
    let want: Vec<f64> = x.iter().zip(&y).map(|(&a, &c)| a as f64 + c as f64).collect();
    assert_close("add", &b.read(n, &s).unwrap(), &want, 1e-6);

    for format in FORMATS {
        let (vocab, h) = (11, if format.is_plain() { 12 } else { 256 });
        let table = random(vocab * h, rng);
        let t = upload(b, &table, vocab, h, format);
        let step = one_step(b, &rows, &rope, &[]);
        let mut e = b.activation(n, h).unwrap();
        b.embed(&step, &t, &mut e);
        let held = rounded(&table, format);
        let want: Vec<f64> = rows.iter().flat_map(|r| held[r.token as usize * h..(r.token as usize + 1) * h].to_vec()).collect();
        assert_close(&format!("embed {}", format.name()), &b.read(n, &e).unwrap(), &want, 0.0);
    }
}

/// RoPE, KV write and causal attention (GQA, sliding window, tiles of positions, two
/// sequences in one step), fused and unfused, against f64; then bit-identity of a row
/// attended alone or with others.
fn attention<B: Backend>(b: &B, rng: &mut ChaCha8Rng) {
    // The second case rotates with the second of two rotary tables (Gemma 3's local layers).
    for (heads, kv_heads, hd, window, table) in [(4, 2, 16, None, 0), (2, 1, 96, Some(37), 1)] {
        let (qd, kvd, context) = (heads * hd, kv_heads * hd, 160);
        let shape = AttentionShape { heads, kv_heads, head_dim: hd, window, scale: 1.0 / (hd as f32).sqrt() };
        let lens = [(1usize, 150usize), (0, 5)];
        let rows: Vec<StepRow> = lens.iter().flat_map(|&(slot, len)| (0..len).map(move |pos| StepRow { slot, pos, token: 0 })).collect();
        let n = rows.len();
        let angles: Vec<f32> = (0..2 * n * hd / 2).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
        // (tables, rows, head_dim): cos then sin per row
        let tables: Vec<f32> = (0..2 * n)
            .flat_map(|i| {
                let a = &angles[i * hd / 2..(i + 1) * hd / 2];
                a.iter().map(|v| v.cos()).chain(a.iter().map(|v| v.sin())).collect::<Vec<_>>()
            })
            .collect();
        let rope = &tables[table * n * hd..(table + 1) * n * hd];
        let (q, k, v) = (random(n * qd, rng), random(n * kvd, rng), random(n * kvd, rng));
        let rotate = |x: &[f32], width: usize| -> Vec<f64> {
            let mut out = vec![0f64; x.len()];
            for i in 0..n {
                for h0 in (0..width).step_by(hd) {
                    for p in 0..hd / 2 {
                        let (c, s) = (rope[i * hd + p] as f64, rope[i * hd + hd / 2 + p] as f64);
                        let (a, bb) = (x[i * width + h0 + p] as f64, x[i * width + h0 + p + hd / 2] as f64);
                        out[i * width + h0 + p] = a * c - bb * s;
                        out[i * width + h0 + p + hd / 2] = bb * c + a * s;
                    }
                }
            }
            out
        };
        let (qr, kr) = (rotate(&q, qd), rotate(&k, kvd));
        let mut want = vec![0f64; n * qd];
        for (i, r) in rows.iter().enumerate() {
            let same: Vec<usize> = (0..n).filter(|&j| rows[j].slot == r.slot && rows[j].pos <= r.pos).collect();
            let first = window.map_or(0, |w| (r.pos + 1).saturating_sub(w));
            let seen: Vec<usize> = same.into_iter().filter(|&j| rows[j].pos >= first).collect();
            for h in 0..heads {
                let ko = (h / (heads / kv_heads)) * hd;
                let scores: Vec<f64> =
                    seen.iter().map(|&j| (0..hd).map(|d| qr[i * qd + h * hd + d] * kr[j * kvd + ko + d]).sum::<f64>() * shape.scale as f64).collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for d in 0..hd {
                    want[i * qd + h * hd + d] = seen.iter().zip(&scores).map(|(&j, s)| (s - m).exp() / z * v[j * kvd + ko + d] as f64).sum();
                }
            }
        }
        let what = format!("attention heads {heads}/{kv_heads} dim {hd} window {window:?}");
        for fused in [false, true] {
            let mut cache = b.new_cache(CacheShape { layers: 2, kv_dim: kvd, slots: 2, context }).unwrap();
            let step = one_step(b, &rows, &tables, &[]);
            let (mut qa, mut ka, va) = (act(b, &q, n, qd), act(b, &k, n, kvd), act(b, &v, n, kvd));
            if fused {
                b.rope_kv_write(&step, table, &mut cache, 1, &mut qa, &mut ka, &va, hd);
            } else {
                b.rope(&step, table, &mut qa, &mut ka, hd);
                b.kv_write(&step, &mut cache, 1, &ka, &va);
            }
            assert_close(&format!("rope q {what}"), &b.read(n, &qa).unwrap(), &qr, 1e-5);
            let mut out = b.activation(n, qd).unwrap();
            b.attention(&step, &cache, 1, shape, &qa, &mut out);
            let batched = b.read(n, &out).unwrap();
            assert_close(&format!("{what} fused={fused}"), &batched, &want, 1e-5);

            // The last row of sequence 1 alone, over the cache written above.
            let i = lens[0].1 - 1;
            let alone_rows = [rows[i]];
            let rope1: Vec<f32> = [i, n + i].iter().flat_map(|&r| tables[r * hd..(r + 1) * hd].to_vec()).collect();
            let step1 = one_step(b, &alone_rows, &rope1, &[]);
            let q1 = act(b, &b.read(n, &qa).unwrap()[i * qd..(i + 1) * qd], 1, qd);
            let mut o1 = b.activation(1, qd).unwrap();
            b.attention(&step1, &cache, 1, shape, &q1, &mut o1);
            let alone = b.read(1, &o1).unwrap();
            assert!(alone.iter().zip(&batched[i * qd..(i + 1) * qd]).all(|(p, q)| p.to_bits() == q.to_bits()), "{what}: a row alone differs from the batch");
        }
    }
}

fn conformance<B: Backend>(b: &B) {
    let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
    matmuls(b, &mut rng);
    row_ops(b, &mut rng);
    attention(b, &mut rng);
    qkv(b, &mut rng);
}

#[test]
fn cpu_backend_conforms() {
    rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap().install(|| conformance(&super::cpu::CpuBackend::default()));
}

#[test]
fn cpu_backend_with_f32_activations_conforms() {
    let b = super::cpu::CpuBackend { acts: super::cpu::matmul::BlockActs::F32, kv_f16: false };
    rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap().install(|| conformance(&b));
}

#[cfg(feature = "gpu")]
#[test]
fn wgpu_backend_conforms() {
    let b = super::wgpu::WgpuBackend::new(false).unwrap_or_else(|e| panic!("no GPU adapter for the conformance suite: {e}"));
    conformance(&b);
}
