// Weight loads for Q5_0 weights (GGUF's block layout): $W is (rows, cols) row-major in blocks
// of 32 weights, each 22 bytes: an f16 scale d, a little-endian u32 whose bit j is weight j's
// fifth bit, then 16 bytes of low nibbles (weights 0..16 low, 16..32 high); a weight is
// d * (q - 16). Blocks are not 4-byte aligned, so bytes are picked out of u32 words.
@group(0) @binding($B) var<storage, read> $W: array<u32>;

fn byte_$W(a: u32) -> u32 {
    return ($W[a >> 2u] >> ((a & 3u) * 8u)) & 0xffu;
}

// Elements 4i .. 4i+3 of $W (one half of one block holds all four).
fn load_$W(i: u32) -> vec4<f32> {
    let e = i * 4u;
    let base = (e / 32u) * 22u;
    let d = unpack2x16float(byte_$W(base) | (byte_$W(base + 1u) << 8u)).x;
    let j = e % 32u;
    let high = (byte_$W(base + 2u + j / 8u) >> (j % 8u)) & 0xfu; // bits j .. j+3
    let q = base + 6u + j % 16u;
    let shift = (j / 16u) * 4u;
    let n = vec4<u32>(byte_$W(q), byte_$W(q + 1u), byte_$W(q + 2u), byte_$W(q + 3u));
    let fifth = (vec4<u32>(high) >> vec4<u32>(0u, 1u, 2u, 3u)) & vec4<u32>(1u);
    return d * (vec4<f32>(((n >> vec4<u32>(shift)) & vec4<u32>(0xfu)) | (fifth << vec4<u32>(4u))) - 16.0);
}
