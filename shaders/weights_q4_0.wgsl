// Weight loads for Q4_0 weights (GGUF's block layout): $W is (rows, cols) row-major in blocks
// of 32 weights, each 18 bytes: an f16 scale d, then 16 bytes whose low nibbles are weights
// 0..16 and high nibbles weights 16..32; a weight is d * (q - 8). Blocks are not 4-byte
// aligned, so bytes are picked out of u32 words.
@group(0) @binding($B) var<storage, read> $W: array<u32>;

fn byte_$W(a: u32) -> u32 {
    return ($W[a >> 2u] >> ((a & 3u) * 8u)) & 0xffu;
}

// Elements 4i .. 4i+3 of $W (one half of one block holds all four).
fn load_$W(i: u32) -> vec4<f32> {
    let e = i * 4u;
    let base = (e / 32u) * 18u;
    let d = unpack2x16float(byte_$W(base) | (byte_$W(base + 1u) << 8u)).x;
    let j = e % 32u;
    let q = base + 2u + j % 16u;
    let shift = (j / 16u) * 4u;
    let n = vec4<u32>(byte_$W(q), byte_$W(q + 1u), byte_$W(q + 2u), byte_$W(q + 3u));
    return d * (vec4<f32>((n >> vec4<u32>(shift)) & vec4<u32>(0xfu)) - 8.0);
}
