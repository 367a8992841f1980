// Elements 4i .. 4i+7 of $W for the matrix product, from its format's 4-element load; b is
// zero unless `hi` (the row goes on past 4i+3). Formats with a faster way define load8_$W
// with this as their fallback.
fn load8_any_$W(i: u32, hi: bool) -> Pair {
    var b = vec4<f32>(0.0);
    if hi {
        b = load_$W(i + 1u);
    }
    return Pair(load_$W(i), b);
}
