// Weight loads for f32 weights: $W is (rows, cols) row-major, read four elements at a time.
@group(0) @binding($B) var<storage, read> $W: array<vec4<f32>>;

// Elements 4i .. 4i+3 of $W.
fn load_$W(i: u32) -> vec4<f32> {
    return $W[i];
}
