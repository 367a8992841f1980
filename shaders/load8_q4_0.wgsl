// Elements 4i .. 4i+7 of Q4_0 $W for the matrix product (8 nibbles of one half of a block):
// the scale and 8 bytes in 3 or 4 word loads, the same values as two load_$W calls.
fn load8_$W(i: u32, hi: bool) -> Pair {
    if !hi || (i & 1u) == 1u {
        return load8_any_$W(i, hi);
    }
    let e = i * 4u;
    let base = (e / 32u) * 18u;
    let d = half_$W(base);
    let j = e % 32u;
    let q = bytes8_$W(base + 2u + j % 16u);
    let shift = vec4<u32>(0u, 8u, 16u, 24u) + vec4<u32>((j / 16u) * 4u);
    let n0 = (vec4<u32>(q.x) >> shift) & vec4<u32>(0xfu);
    let n1 = (vec4<u32>(q.y) >> shift) & vec4<u32>(0xfu);
    return Pair(d * (vec4<f32>(n0) - 8.0), d * (vec4<f32>(n1) - 8.0));
}
