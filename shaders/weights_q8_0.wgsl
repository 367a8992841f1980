// Weight loads for Q8_0 weights (GGUF's block layout): $W is (rows, cols) row-major in blocks
// of 32 weights, each 34 bytes: an f16 scale d, then 32 int8 q; a weight is d * q (exact in
// f32). Blocks are not 4-byte aligned, so bytes are picked out of u32 words.
@group(0) @binding($B) var<storage, read> $W: array<u32>;

fn byte_$W(a: u32) -> u32 {
    return ($W[a >> 2u] >> ((a & 3u) * 8u)) & 0xffu;
}

fn int8_$W(a: u32) -> f32 {
    return f32(bitcast<i32>(byte_$W(a) << 24u) >> 24u);
}

// Elements 4i .. 4i+3 of $W (one block holds all four: 32 is a multiple of 4).
fn load_$W(i: u32) -> vec4<f32> {
    let e = i * 4u;
    let base = (e / 32u) * 34u;
    let d = unpack2x16float(byte_$W(base) | (byte_$W(base + 1u) << 8u)).x;
    let q = base + 2u + e % 32u;
    return d * vec4<f32>(int8_$W(q), int8_$W(q + 1u), int8_$W(q + 2u), int8_$W(q + 3u));
}
