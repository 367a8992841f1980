// An f32 KV cache: the layer's keys (binding 2 in attention, 6 in rope_kv) and values.
@group(0) @binding($KB) var<storage, $ACCESS> KC: array<f32>; // (slots, context, kv_dim)
@group(0) @binding($VB) var<storage, $ACCESS> VC: array<f32>;

fn get_KC(a: u32) -> f32 {
    return KC[a];
}

fn get_VC(a: u32) -> f32 {
    return VC[a];
}
