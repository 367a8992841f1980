// Matrix-product segments: three matrices with the same x (q, k and v of one layer) in one
// dispatch: W into Y, U into Y1, V into Y2, each with its own bias. The segment is uniform
// over a workgroup, so every branch below is too.
const SEGMENTS: u32 = 3u;

@group(0) @binding(8) var<storage, read_write> Y1: array<f32>;
@group(0) @binding(9) var<storage, read_write> Y2: array<f32>;
@group(0) @binding(10) var<storage, read> Bias1: array<f32>;
@group(0) @binding(11) var<storage, read> Bias2: array<f32>;

fn seg_load8(seg: u32, i: u32, hi: bool) -> Pair {
    if seg == 0u {
        return load8_W(i, hi);
    }
    if seg == 1u {
        return load8_U(i, hi);
    }
    return load8_V(i, hi);
}

fn seg_store(seg: u32, at: u32, v: f32) {
    if seg == 0u {
        Y[at] = v;
    } else if seg == 1u {
        Y1[at] = v;
    } else {
        Y2[at] = v;
    }
}

fn seg_bias(seg: u32, r: u32) -> f32 {
    if seg == 0u {
        return Bias[P.row_offset + r];
    }
    if seg == 1u {
        return Bias1[r];
    }
    return Bias2[r];
}

fn seg_ld(seg: u32) -> u32 {
    if seg == 0u {
        return P.ld;
    }
    return P.ld1;
}
