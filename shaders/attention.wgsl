// Causal attention of each row's query over its sequence's cached keys and values, one
// workgroup per (head, row): out (n, heads * head_dim) = softmax(q . K^T * scale) @ V over
// positions first ..= pos (first > 0 with a sliding window).
//
// The positions are walked in tiles of WG anchored at `first`, with an online softmax: each
// thread scores one position of the tile, the tile's maximum and weights are formed in a
// fixed order, and each thread accumulates its own output dimensions (d = t, t + WG, ...).
// Nothing depends on the other rows of the batch, so the result is batch invariant.
// Grouped-query attention: query head h reads kv head h / (heads / kv_heads). The cache's
// element type comes from kv_*.wgsl.

const WG: u32 = 64u;
const MAX_HEAD_DIM: u32 = 256u;
const DIMS_PER_THREAD: u32 = MAX_HEAD_DIM / WG;

struct Params {
    n: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    context: u32,   // positions per cache slot
    window: u32,    // 0: no sliding window
    scale: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> Q: array<f32>;
@group(0) @binding(4) var<storage, read_write> O: array<f32>;
@group(0) @binding(5) var<storage, read> Rows: array<vec4<u32>>; // (slot, pos, token, 0)

var<workgroup> qs: array<f32, MAX_HEAD_DIM>;
var<workgroup> weights: array<f32, WG>;
var<workgroup> tile_max: f32;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let h = wg.x;
    let i = wg.y;
    if i >= P.n {
        return;
    }
    let hd = P.head_dim;
    let kv_dim = P.kv_heads * hd;
    let kvh = h / (P.heads / P.kv_heads);
    let row = Rows[i];
    let last = row.y;
    var first = 0u;
    if P.window != 0u && last + 1u > P.window {
        first = last + 1u - P.window;
    }
    let base = row.x * P.context * kv_dim + kvh * hd;
    for (var d = t; d < hd; d += WG) {
        qs[d] = Q[(i * P.heads + h) * hd + d];
    }
    workgroupBarrier();

    var m = -3.0e38; // running maximum (finite, so exp(m - m_new) is never NaN)
    var l = 0.0;     // running sum of weights
    var acc: array<f32, DIMS_PER_THREAD>;
    for (var start = first; start <= last; start += WG) {
        let p = start + t;
        var score = -3.0e38;
        if p <= last {
            var s = 0.0;
            let k0 = base + p * kv_dim;
            for (var d = 0u; d < hd; d++) {
                s += qs[d] * get_KC(k0 + d);
            }
            score = s * P.scale;
        }
        weights[t] = score;
        workgroupBarrier();
        if t == 0u {
            var mx = m;
            for (var j = 0u; j < WG; j++) {
                mx = max(mx, weights[j]);
            }
            tile_max = mx;
        }
        workgroupBarrier();
        let m_new = tile_max;
        let correction = exp(m - m_new);
        workgroupBarrier(); // every thread has read the scores' maximum
        var w = 0.0;
        if p <= last {
            w = exp(score - m_new);
        }
        weights[t] = w;
        workgroupBarrier();
        let count = min(WG, last + 1u - start);
        var tile_sum = 0.0;
        for (var j = 0u; j < count; j++) {
            tile_sum += weights[j];
        }
        l = l * correction + tile_sum;
        for (var e = 0u; e < DIMS_PER_THREAD; e++) {
            let d = t + e * WG;
            if d < hd {
                var a = acc[e] * correction;
                for (var j = 0u; j < count; j++) {
                    a += weights[j] * get_VC(base + (start + j) * kv_dim + d);
                }
                acc[e] = a;
            }
        }
        m = m_new;
        workgroupBarrier();
    }
    for (var e = 0u; e < DIMS_PER_THREAD; e++) {
        let d = t + e * WG;
        if d < hd {
            O[(i * P.heads + h) * hd + d] = acc[e] / l;
        }
    }
}
