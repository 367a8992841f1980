// y (n, ld) [row_offset ..] = x' (n, cols) @ W^T (rows, cols)  (+ bias) (+ y when accumulating)
// where x' = x, or rmsnorm(x) * g when the norm flag is set (RMSNorm folded into the product).
// With GATED, a second matrix U gives y = silu(x' @ W^T) * (x' @ U^T) (SwiGLU in one pass).
//
// One workgroup per (output row, tile of TB batch rows). Each of its WG threads sums the
// fixed strided subset k = t, t + WG, ... of the row, then a fixed tree sums the threads: an
// output element is reduced in the same order whatever n and TB are, so a batch row gives
// bit-identical results alone or in any batch. Each weight load serves TB batch rows (TB is
// chosen per dispatch from n: 1, 4 or 16), and the tiles of one output row are consecutive
// workgroups, so a row's weights read by one tile are still in cache for the next.
// Weight loads (load_W, load_U) come from a format snippet (weights_*.wgsl).

const WG: u32 = 64u;
const TB: u32 = $TBu;
const GATED: bool = $GATED;

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
    tiles: u32,      // batch tiles per output row: ceil(n / TB)
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(2) var<storage, read> X: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> Y: array<f32>;
@group(0) @binding(4) var<storage, read> Bias: array<f32>;
@group(0) @binding(5) var<storage, read> G: array<vec4<f32>>;

var<workgroup> red: array<f32, $RED>; // (3 * TB, WG): partial sums of W.x, U.x and x.x

// Tree-sums red[s * WG ..] for s < sets; the result lands in red[s * WG].
fn tree(t: u32, sets: u32) {
    for (var w = WG / 2u; w > 0u; w = w / 2u) {
        workgroupBarrier();
        if t < w {
            for (var s = 0u; s < sets; s++) {
                red[s * WG + t] += red[s * WG + t + w];
            }
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let id = wg.y * P.grid_x + wg.x;
    let r = id / P.tiles;
    if r >= P.rows {
        return; // uniform: the whole workgroup leaves
    }
    let b0 = (id % P.tiles) * TB;
    let c4 = P.cols / 4u;
    let norm = (P.flags & FLAG_NORM) != 0u;
    // With the norm folded in: sum_k w_k (x_k inv g_k) = inv * sum_k w_k (x_k g_k), and the
    // sum of squares behind inv is gathered in the same pass over x.
    var acc: array<f32, TB>;
    var acc_u: array<f32, TB>;
    var ss: array<f32, TB>;
    for (var k = t; k < c4; k += WG) {
        let w = load_W(r * c4 + k);
        var u = vec4<f32>(0.0);
        if GATED {
            u = load_U(r * c4 + k);
        }
        var g = vec4<f32>(1.0);
        if norm {
            g = G[k];
        }
        for (var j = 0u; j < TB; j++) {
            if b0 + j < P.n {
                var x = X[(b0 + j) * c4 + k];
                if norm {
                    ss[j] += dot(x, x);
                    x = x * g;
                }
                acc[j] += dot(w, x);
                if GATED {
                    acc_u[j] += dot(u, x);
                }
            }
        }
    }
    for (var j = 0u; j < TB; j++) {
        red[j * WG + t] = acc[j];
        red[(TB + j) * WG + t] = acc_u[j];
        red[(2u * TB + j) * WG + t] = ss[j];
    }
    var sets = TB;
    if GATED {
        sets = 2u * TB;
    }
    if norm {
        sets = 3u * TB;
    }
    tree(t, sets);
    if t < TB && b0 + t < P.n {
        let j = t;
        let at = (b0 + j) * P.ld + P.row_offset + r;
        var v = red[j * WG];
        var vu = red[(TB + j) * WG];
        if norm {
            let inv = inverseSqrt(red[(2u * TB + j) * WG] / f32(P.cols) + P.eps);
            v = v * inv;
            vu = vu * inv;
        }
        if (P.flags & FLAG_BIAS) != 0u {
            v += Bias[P.row_offset + r];
        }
        if GATED {
            v = v / (1.0 + exp(-v)) * vu;
        }
        if (P.flags & FLAG_ACCUMULATE) != 0u {
            v = Y[at] + v;
        }
        Y[at] = v;
    }
}
