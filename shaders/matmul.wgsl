// y (n, ld) [row_offset ..] = x' (n, cols) @ W^T (rows, cols)  (+ bias) (+ y when accumulating)
// where x' = x, or rmsnorm(x) * g when the norm flag is set (RMSNorm folded into the product).
// With GATED, a second matrix U gives y = silu(x' @ W^T) * (x' @ U^T) (SwiGLU in one pass).
//
// The summation order of one output element is fixed, whatever the batch size and tile:
// a row is cut into chunks of 8 elements; lane l of 32 sums the chunks l, l + 32, l + 64, ...
// in that order (a chunk as dot(first 4) + dot(last 4)), then a fixed pairwise tree sums the
// 32 lanes. So a batch row gives bit-identical results alone or in any batch.
//
// A workgroup holds G groups of 32 lanes; each group computes one tile of R output rows by TB
// batch rows. Each lane keeps the tile's R * TB partial sums in registers: the x values it
// loads serve R rows and the weight values TB batch rows. At batch 1 (TB = 1) a group streams
// R rows with 16-byte loads, 32 lanes side by side over consecutive bytes, UNROLL chunks at a time.
// Weight loads (load8_W, load8_U) come from a format snippet; the segment functions (seg_load8,
// seg_store, seg_bias, seg_ld) from matmul_segments_*.wgsl: one matrix, or three (q, k and v
// of one layer: rows 0 .. P.rows of W, then P.rows1 of U, then P.rows1 of V, each into its
// own output) in one dispatch.

const LANES: u32 = 32u;
const G: u32 = $Gu;
const R: u32 = $Ru;
const TB: u32 = $TBu;
const UNROLL: u32 = $Uu;
const GATED: bool = $GATED;
// Partials of a lane: R * TB of W.x, then R * TB of U.x (GATED only), then TB of x.x (the
// norm's sum of squares).
const SS0: u32 = $SS0u;
const SETS: u32 = SS0 + TB;
// A lane's partials lie at stride ST in workgroup memory: odd, so that the reads of the tree
// (lane e reads set e of every lane) and the writes hit distinct banks.
const ST: u32 = SETS | 1u;

const FLAG_BIAS: u32 = 1u;
const FLAG_ACCUMULATE: u32 = 2u;
const FLAG_NORM: u32 = 4u;

struct Params {
    n: u32,          // batch rows
    rows: u32,       // rows of this (chunk of the) weight matrix
    cols: u32,       // multiple of 4
    flags: u32,
    row_offset: u32, // first output column of this chunk
    ld: u32,         // row stride of y
    grid_x: u32,     // workgroups along x (the rest wrap into y beyond it)
    eps: f32,
    tiles: u32,      // batch tiles per row block: ceil(n / TB)
    blocks0: u32,    // row blocks of the first matrix: ceil(rows / R)
    rows1: u32,      // rows of the second and third matrices (three segments only)
    ld1: u32,        // row stride of their outputs
}

// Elements 4i .. 4i + 7 of a matrix: a, then b (zero past the row's end).
struct Pair {
    a: vec4<f32>,
    b: vec4<f32>,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(2) var<storage, read> X: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> Y: array<f32>;
@group(0) @binding(4) var<storage, read> Bias: array<f32>;
@group(0) @binding(5) var<storage, read> Gn: array<vec4<f32>>;

var<workgroup> red: array<f32, G * LANES * ST>; // (G, LANES, ST)
var<workgroup> sums: array<f32, G * SETS>;

// The fixed tree over the 32 lanes' partial `s` of group g.
fn lane_total(g: u32, s: u32) -> f32 {
    let base = g * LANES * ST + s;
    var v: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) {
        v[i] = red[base + i * ST] + red[base + (i + 16u) * ST];
    }
    for (var i = 0u; i < 8u; i++) {
        v[i] += v[i + 8u];
    }
    for (var i = 0u; i < 4u; i++) {
        v[i] += v[i + 4u];
    }
    return (v[0] + v[2]) + (v[1] + v[3]);
}

@compute @workgroup_size(LANES * G)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let l = t % LANES;
    let g = t / LANES;
    let id = (wg.y * P.grid_x + wg.x) * G + g;
    var rb = id / P.tiles;
    var seg = 0u;
    var rows = P.rows;
    if SEGMENTS > 1u && rb >= P.blocks0 {
        rb -= P.blocks0;
        rows = P.rows1;
        seg = 1u + rb / ((P.rows1 + R - 1u) / R);
        rb = rb % ((P.rows1 + R - 1u) / R);
    }
    let r0 = rb * R;
    // Uniform over the group, not the workgroup: an idle group still meets the barriers.
    let working = r0 < rows && seg < SEGMENTS;
    let b0 = (id % P.tiles) * TB;
    let c4 = P.cols / 4u;
    let chunks = (c4 + 1u) / 2u;
    let norm = (P.flags & FLAG_NORM) != 0u;
    // With the norm folded in: sum_k w_k (x_k inv g_k) = inv * sum_k w_k (x_k g_k), and the
    // sum of squares behind inv is gathered in the same pass over x.
    var part: array<f32, SETS>;
    if working {
        // UNROLL chunks a pass: their weights are all loaded before any is summed (more bytes in
        // flight per lane), then summed chunk after chunk, so the order stays the same.
        for (var c0 = l; c0 < chunks; c0 += UNROLL * LANES) {
            var ws: array<Pair, UNROLL * R>;
            var us: array<Pair, UNROLL * R>;
            for (var s = 0u; s < UNROLL; s++) {
                let c = c0 + s * LANES;
                for (var r = 0u; r < R; r++) {
                    if c < chunks && r0 + r < rows {
                        let i = (r0 + r) * c4 + 2u * c;
                        let hi = 2u * c + 1u < c4;
                        ws[s * R + r] = seg_load8(seg, i, hi);
                        if GATED {
                            us[s * R + r] = load8_U(i, hi);
                        }
                    }
                }
            }
            for (var s = 0u; s < UNROLL; s++) {
                let c = c0 + s * LANES;
                if c >= chunks {
                    break;
                }
                let i = 2u * c;
                let hi = i + 1u < c4;
                var ga = vec4<f32>(1.0);
                var gb = vec4<f32>(1.0);
                if norm {
                    ga = Gn[i];
                    if hi {
                        gb = Gn[i + 1u];
                    }
                }
                var xa: array<vec4<f32>, TB>;
                var xb: array<vec4<f32>, TB>;
                for (var j = 0u; j < TB; j++) {
                    if b0 + j < P.n {
                        var a = X[(b0 + j) * c4 + i];
                        var b = vec4<f32>(0.0);
                        if hi {
                            b = X[(b0 + j) * c4 + i + 1u];
                        }
                        if norm {
                            part[SS0 + j] += dot(a, a) + dot(b, b);
                            a = a * ga;
                            b = b * gb;
                        }
                        xa[j] = a;
                        xb[j] = b;
                    }
                }
                for (var r = 0u; r < R; r++) {
                    let w = ws[s * R + r];
                    let u = us[s * R + r];
                    for (var j = 0u; j < TB; j++) {
                        part[r * TB + j] += dot(w.a, xa[j]) + dot(w.b, xb[j]);
                        if GATED {
                            part[R * TB + r * TB + j] += dot(u.a, xa[j]) + dot(u.b, xb[j]);
                        }
                    }
                }
            }
        }
    }
    for (var s = 0u; s < SETS; s++) {
        red[(g * LANES + l) * ST + s] = part[s];
    }
    workgroupBarrier();
    for (var s = l; s < SETS; s += LANES) {
        sums[g * SETS + s] = lane_total(g, s);
    }
    workgroupBarrier();
    if !working {
        return;
    }
    for (var e = l; e < R * TB; e += LANES) {
        let i = e / TB;
        let j = e % TB;
        if r0 + i >= rows || b0 + j >= P.n {
            continue;
        }
        let r = r0 + i;
        let at = (b0 + j) * seg_ld(seg) + P.row_offset + r;
        var v = sums[g * SETS + e];
        var vu = 0.0;
        if GATED {
            vu = sums[g * SETS + R * TB + e];
        }
        if norm {
            let inv = inverseSqrt(sums[g * SETS + SS0 + j] / f32(P.cols) + P.eps);
            v = v * inv;
            vu = vu * inv;
        }
        if (P.flags & FLAG_BIAS) != 0u {
            v += seg_bias(seg, r);
        }
        if GATED {
            v = v / (1.0 + exp(-v)) * vu;
        }
        if (P.flags & FLAG_ACCUMULATE) != 0u {
            v = Y[at] + v; // one matrix only
        }
        seg_store(seg, at, v);
    }
}
