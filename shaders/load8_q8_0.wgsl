// Elements 4i .. 4i+7 of Q8_0 $W for the matrix product (one group of 8 in one block): the
// scale and 8 bytes in 3 or 4 word loads, the same values as two load_$W calls.
fn int8x4_$W(w: u32) -> vec4<f32> {
    return vec4<f32>((vec4<i32>(bitcast<i32>(w)) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u));
}

fn load8_$W(i: u32, hi: bool) -> Pair {
    if !hi || (i & 1u) == 1u {
        return load8_any_$W(i, hi);
    }
    let e = i * 4u;
    let base = (e / 32u) * 34u;
    let d = half_$W(base);
    let q = bytes8_$W(base + 2u + e % 32u);
    return Pair(d * int8x4_$W(q.x), d * int8x4_$W(q.y));
}
