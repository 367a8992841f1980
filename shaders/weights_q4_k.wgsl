// Weight loads for Q4_K weights (GGUF's block layout): $W is (rows, cols) row-major in
// super-blocks of 256 weights, each 144 bytes: f16 d, f16 dmin, 12 bytes of 6-bit sub-block
// scales and mins, 128 bytes of 4-bit q. Sub-block g (32 weights) has w = d * sc_g * q -
// dmin * m_g, its q the low (g even) or high (g odd) nibbles of bytes 16 + 32 (g / 2) ...
@group(0) @binding($B) var<storage, read> $W: array<u32>;

fn byte_$W(a: u32) -> u32 {
    return ($W[a >> 2u] >> ((a & 3u) * 8u)) & 0xffu;
}

// ggml's get_scale_min_k4: (scale, min) of sub-block g from the 12 bytes at s.
fn scale_min_$W(g: u32, s: u32) -> vec2<f32> {
    if g < 4u {
        return vec2<f32>(f32(byte_$W(s + g) & 63u), f32(byte_$W(s + g + 4u) & 63u));
    }
    let sc = (byte_$W(s + g + 4u) & 0xfu) | ((byte_$W(s + g - 4u) >> 6u) << 4u);
    let m = (byte_$W(s + g + 4u) >> 4u) | ((byte_$W(s + g) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(m));
}

// Where element e lies: its sub-block's scale and min, the word holding its q byte, and the
// shift of its nibble (low for even sub-blocks, high for odd).
struct Sub_$W {
    scale: f32,
    min: f32,
    word: u32,
    shift: u32,
}

fn sub_$W(e: u32) -> Sub_$W {
    let base = (e / 256u) * 144u;
    let dm = unpack2x16float($W[base / 4u]);
    let j = e % 256u;
    let g = j / 32u;
    let sm = scale_min_$W(g, base + 4u);
    return Sub_$W(dm.x * sm.x, dm.y * sm.y, (base + 16u + 32u * (g / 2u) + j % 32u) / 4u, 4u * (g % 2u));
}

// The four weights of a word of q bytes (consecutive, one sub-block).
fn weights4_$W(s: Sub_$W, word: u32) -> vec4<f32> {
    let n = (vec4<u32>(word) >> vec4<u32>(0u, 8u, 16u, 24u) >> vec4<u32>(s.shift)) & vec4<u32>(0xfu);
    return s.scale * vec4<f32>(n) - vec4<f32>(s.min);
}

// Elements 4i .. 4i+3 of $W (one sub-block holds all four).
fn load_$W(i: u32) -> vec4<f32> {
    let s = sub_$W(i * 4u);
    return weights4_$W(s, $W[s.word]);
}
