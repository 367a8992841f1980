// Elements 4i .. 4i+7 of f16 $W for the matrix product: one 16-byte load where the 8 share a
// word (even i), else two halves; b is zero unless `hi` (the row goes on past 4i+3).
fn load8_$W(i: u32, hi: bool) -> Pair {
    if hi && (i & 1u) == 0u {
        let p = $W[i >> 1u];
        return Pair(widen_$W(p.xy), widen_$W(p.zw));
    }
    return load8_any_$W(i, hi);
}
