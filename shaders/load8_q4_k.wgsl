// Elements 4i .. 4i+7 of Q4_K $W for the matrix product (8 of one sub-block): the sub-block's
// scale and min decoded once, the nibbles from two aligned words; the same values as two
// load_$W calls.
fn load8_$W(i: u32, hi: bool) -> Pair {
    if !hi || (i & 1u) == 1u {
        return load8_any_$W(i, hi);
    }
    let e = i * 4u;
    let base = (e / 256u) * 144u;
    let dm = unpack2x16float($W[base / 4u]);
    let j = e % 256u;
    let g = j / 32u;
    let sm = scale_min_$W(g, base + 4u);
    let a = (base + 16u + 32u * (g / 2u) + j % 32u) / 4u;
    let shift = vec4<u32>(0u, 8u, 16u, 24u) + vec4<u32>(4u * (g % 2u));
    let n0 = (vec4<u32>($W[a]) >> shift) & vec4<u32>(0xfu);
    let n1 = (vec4<u32>($W[a + 1u]) >> shift) & vec4<u32>(0xfu);
    let scale = dm.x * sm.x;
    let min = vec4<f32>(dm.y * sm.y);
    return Pair(scale * vec4<f32>(n0) - min, scale * vec4<f32>(n1) - min);
}
