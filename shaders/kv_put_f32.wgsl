// Writes of two consecutive elements (a.x at `at`, a.y after it) to an f32 KV cache.
fn put_KC(at: u32, a: vec2<f32>) {
    KC[at] = a.x;
    KC[at + 1u] = a.y;
}

fn put_VC(at: u32, a: vec2<f32>) {
    VC[at] = a.x;
    VC[at + 1u] = a.y;
}
