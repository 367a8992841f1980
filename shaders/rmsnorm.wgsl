// y (n, width) = x[src(j)] / sqrt(mean(x[src(j)]^2) + eps) * g, one workgroup per output row.
// src(j) = j, or Idx[j] with the gather flag (the final norm of the rows whose logits are read).
// With the in_place flag the rows of Y are normed in place (X unused): Gemma's per-head q and k
// norms, one "row" per head.
// Each thread sums a fixed strided subset of the row, then a fixed tree: the same order for a
// row whatever n is.

const WG: u32 = 64u;

struct Params {
    n: u32,
    width: u32,
    gather: u32,
    in_place: u32,
    eps: f32,
    grid_x: u32,    // workgroups along x: rows may exceed one dimension's limit
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;
@group(0) @binding(3) var<storage, read> G: array<f32>;
@group(0) @binding(4) var<storage, read> Idx: array<u32>;

var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let j = wg.y * P.grid_x + wg.x;
    if j >= P.n {
        return;
    }
    var src = j;
    if P.gather != 0u {
        src = Idx[j];
    }
    let x0 = src * P.width;
    var ss = 0.0;
    for (var k = t; k < P.width; k += WG) {
        var v = X[x0 + k];
        if P.in_place != 0u {
            v = Y[x0 + k];
        }
        ss += v * v;
    }
    red[t] = ss;
    for (var w = WG / 2u; w > 0u; w = w / 2u) {
        workgroupBarrier();
        if t < w {
            red[t] += red[t + w];
        }
    }
    workgroupBarrier();
    let inv = inverseSqrt(red[0] / f32(P.width) + P.eps);
    for (var k = t; k < P.width; k += WG) {
        if P.in_place != 0u {
            Y[x0 + k] = Y[x0 + k] * inv * G[k];
        } else {
            Y[j * P.width + k] = X[x0 + k] * inv * G[k];
        }
    }
}
