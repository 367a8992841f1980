// Unaligned reads from a u32-bound block format $W (blocks of 34 or 18 bytes: every block and
// every 8-byte run the matrix product reads starts at an even byte address).

// The 8 bytes at even byte address a, as two little-endian words.
fn bytes8_$W(a: u32) -> vec2<u32> {
    let k = a >> 2u;
    let w0 = $W[k];
    let w1 = $W[k + 1u];
    if (a & 2u) == 0u {
        return vec2<u32>(w0, w1);
    }
    let w2 = $W[k + 2u];
    return vec2<u32>((w0 >> 16u) | (w1 << 16u), (w1 >> 16u) | (w2 << 16u));
}

// The f16 at even byte address a, as f32.
fn half_$W(a: u32) -> f32 {
    return unpack2x16float($W[a >> 2u] >> ((a & 2u) * 8u)).x;
}
