// Writes of two consecutive elements to an f16 KV cache: one word (`at` is even).
fn put_KC(at: u32, a: vec2<f32>) {
    KC[at >> 1u] = pack2x16float(a);
}

fn put_VC(at: u32, a: vec2<f32>) {
    VC[at >> 1u] = pack2x16float(a);
}
