// Weight loads for f16 weights: $W is (rows, cols) row-major, two halves per u32, read four
// elements (8 bytes) at a time and widened exactly to f32 (no shader-f16 feature needed).
@group(0) @binding($B) var<storage, read> $W: array<vec2<u32>>;

// Elements 4i .. 4i+3 of $W.
fn load_$W(i: u32) -> vec4<f32> {
    let p = $W[i];
    return vec4<f32>(unpack2x16float(p.x), unpack2x16float(p.y));
}
