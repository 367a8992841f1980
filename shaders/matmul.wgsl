// y (n, ld) [row_offset ..] = x' (n, cols) @ W^T (rows, cols)  (+ bias) (+ y when accumulating)
// where x' = x, or rmsnorm(x) * g when the norm flag is set (RMSNorm folded into the product).
// With GATED, a second matrix U gives y = silu(x' @ W^T) * (x' @ U^T) (SwiGLU in one pass).
//
// One workgroup per (block of R output rows, tile of TB batch rows). Each of its WG threads
// sums, for every output element of the block, the fixed strided subset k = t, t + WG, ... of
// the row, then a fixed tree sums the threads: an output element is reduced in the same order
// whatever n, R and TB are, so a batch row gives bit-identical results alone or in any batch.
// A thread's x values serve R rows and its weight values TB batch rows, from registers; R and
// TB are chosen per dispatch from n. The tiles of one row block are consecutive workgroups, so
// weights one tile reads are still in cache for the next.
// Weight loads (load_W, load_U, load_V) come from a format snippet (weights_*.wgsl); the
// segment functions (seg_load, seg_store, seg_bias, seg_ld) from matmul_segments_*.wgsl: one
// matrix, or three (q, k and v of one layer: rows 0 .. P.rows of W, then P.rows1 of U, then
// P.rows1 of V, each into its own output) in one dispatch.

const WG: u32 = 64u;
const R: u32 = $Ru;
const TB: u32 = $TBu;
const GATED: bool = $GATED;
// Partial sums: R * TB of W.x, then R * TB of U.x (GATED only), then TB of x.x (from SS0).
// The tree runs over CHUNK of them at a time.
const SS0: u32 = $SS0u;
const SETS: u32 = SS0 + TB;
const CHUNK: u32 = 32u;

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

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(2) var<storage, read> X: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> Y: array<f32>;
@group(0) @binding(4) var<storage, read> Bias: array<f32>;
@group(0) @binding(5) var<storage, read> G: array<vec4<f32>>;

var<workgroup> red: array<f32, 2048>; // (CHUNK, WG)
var<workgroup> sums: array<f32, SETS>;

// The tree's total of partial s: still in red when one chunk held them all.
fn total(s: u32, used: u32) -> f32 {
    if used > CHUNK {
        return sums[s];
    }
    return red[s * WG];
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let id = wg.y * P.grid_x + wg.x;
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
    if r0 >= rows || seg >= SEGMENTS {
        return; // uniform: the whole workgroup leaves
    }
    let b0 = (id % P.tiles) * TB;
    let c4 = P.cols / 4u;
    let norm = (P.flags & FLAG_NORM) != 0u;
    // With the norm folded in: sum_k w_k (x_k inv g_k) = inv * sum_k w_k (x_k g_k), and the
    // sum of squares behind inv is gathered in the same pass over x.
    var part: array<f32, SETS>;
    for (var k = t; k < c4; k += WG) {
        var g = vec4<f32>(1.0);
        if norm {
            g = G[k];
        }
        var xs: array<vec4<f32>, TB>;
        for (var j = 0u; j < TB; j++) {
            if b0 + j < P.n {
                var x = X[(b0 + j) * c4 + k];
                if norm {
                    part[SS0 + j] += dot(x, x);
                    x = x * g;
                }
                xs[j] = x;
            }
        }
        for (var i = 0u; i < R; i++) {
            if r0 + i < rows {
                let w = seg_load(seg, (r0 + i) * c4 + k);
                var u = vec4<f32>(0.0);
                if GATED {
                    u = load_U((r0 + i) * c4 + k);
                }
                for (var j = 0u; j < TB; j++) {
                    part[i * TB + j] += dot(w, xs[j]);
                    if GATED {
                        part[R * TB + i * TB + j] += dot(u, xs[j]);
                    }
                }
            }
        }
    }
    // Tree-sum every partial over the WG threads, CHUNK partials at a time.
    var used = SS0;
    if norm {
        used = SETS;
    }
    for (var s0 = 0u; s0 < used; s0 += CHUNK) {
        let m = min(CHUNK, used - s0);
        for (var s = 0u; s < m; s++) {
            red[s * WG + t] = part[s0 + s];
        }
        for (var w = WG / 2u; w > 0u; w = w / 2u) {
            workgroupBarrier();
            if t < w {
                for (var s = 0u; s < m; s++) {
                    red[s * WG + t] += red[s * WG + t + w];
                }
            }
        }
        workgroupBarrier();
        if used > CHUNK {
            // Several chunks: keep this one's totals before the next overwrites red.
            if t < m {
                sums[s0 + t] = red[t * WG];
            }
            workgroupBarrier();
        }
    }
    for (var e = t; e < R * TB; e += WG) {
        let i = e / TB;
        let j = e % TB;
        if r0 + i >= rows || b0 + j >= P.n {
            continue;
        }
        let r = r0 + i;
        let at = (b0 + j) * seg_ld(seg) + P.row_offset + r;
        var v = total(e, used);
        var vu = 0.0;
        if GATED {
            vu = total(R * TB + e, used);
        }
        if norm {
            let inv = inverseSqrt(total(SS0 + j, used) / f32(P.cols) + P.eps);
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
