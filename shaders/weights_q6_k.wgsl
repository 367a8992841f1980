// Weight loads for Q6_K weights (GGUF's block layout): $W is (rows, cols) row-major in
// super-blocks of 256 weights, each 210 bytes: 128 bytes of low 4 bits (ql), 64 of high 2
// bits (qh), 16 int8 scales, then an f16 d. Weight 128 n + 32 k + l (k < 4, l < 32) is
// d * scale[8 n + 2 k + l / 16] * (q - 32), q from the low (k < 2) or high nibble of
// ql[64 n + 32 (k % 2) + l] and bits 2k .. 2k+1 of qh[32 n + l].
@group(0) @binding($B) var<storage, read> $W: array<u32>;

fn byte_$W(a: u32) -> u32 {
    return ($W[a >> 2u] >> ((a & 3u) * 8u)) & 0xffu;
}

fn int8_$W(a: u32) -> f32 {
    return f32(bitcast<i32>(byte_$W(a) << 24u) >> 24u);
}

// Elements 4i .. 4i+3 of $W (one 16-weight sub-block holds all four).
fn load_$W(i: u32) -> vec4<f32> {
    let e = i * 4u;
    let base = (e / 256u) * 210u;
    let d = unpack2x16float(byte_$W(base + 208u) | (byte_$W(base + 209u) << 8u)).x;
    let j = e % 256u;
    let n = j / 128u;
    let k = (j % 128u) / 32u;
    let l = j % 32u;
    let scale = d * int8_$W(base + 192u + 8u * n + 2u * k + l / 16u);
    let ql = base + 64u * n + 32u * (k % 2u) + l;
    let qh = base + 128u + 32u * n + l;
    let lo = (vec4<u32>(byte_$W(ql), byte_$W(ql + 1u), byte_$W(ql + 2u), byte_$W(ql + 3u)) >> vec4<u32>(4u * (k / 2u))) & vec4<u32>(0xfu);
    let hi = (vec4<u32>(byte_$W(qh), byte_$W(qh + 1u), byte_$W(qh + 2u), byte_$W(qh + 3u)) >> vec4<u32>(2u * k)) & vec4<u32>(3u);
    return scale * (vec4<f32>(lo | (hi << vec4<u32>(4u))) - 32.0);
}
