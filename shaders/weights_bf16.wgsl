// Weight loads for bf16 weights: $W is (rows, cols) row-major, two bf16 per u32 (little
// endian: element 2j in the low half). A bf16 is the top half of an f32, so widening is exact.
@group(0) @binding($B) var<storage, read> $W: array<vec2<u32>>;

// Elements 4i .. 4i+3 of $W.
fn load_$W(i: u32) -> vec4<f32> {
    let p = $W[i];
    return vec4<f32>(
        bitcast<f32>(p.x << 16u), bitcast<f32>(p.x & 0xffff0000u),
        bitcast<f32>(p.y << 16u), bitcast<f32>(p.y & 0xffff0000u),
    );
}
