// Matrix-product segments: one matrix (W, with U when GATED) into Y.
const SEGMENTS: u32 = 1u;

fn seg_load8(seg: u32, i: u32, hi: bool) -> Pair {
    return load8_W(i, hi);
}

fn seg_store(seg: u32, at: u32, v: f32) {
    Y[at] = v;
}

fn seg_bias(seg: u32, r: u32) -> f32 {
    return Bias[P.row_offset + r];
}

fn seg_ld(seg: u32) -> u32 {
    return P.ld;
}
