// Weight loads for f16 weights: $W is (rows, cols) row-major, two halves per u32, bound as
// 16-byte words (8 elements) and widened exactly to f32 (no shader-f16 feature needed).
@group(0) @binding($B) var<storage, read> $W: array<vec4<u32>>;

fn widen_$W(p: vec2<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(p.x), unpack2x16float(p.y));
}

// Elements 4i .. 4i+3 of $W.
fn load_$W(i: u32) -> vec4<f32> {
    let p = $W[i >> 1u];
    if (i & 1u) == 0u {
        return widen_$W(p.xy);
    }
    return widen_$W(p.zw);
}
