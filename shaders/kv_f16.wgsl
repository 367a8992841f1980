// An f16 KV cache (half the memory): two consecutive elements per u32, element 2j in the low
// half; arithmetic stays f32.
@group(0) @binding($KB) var<storage, $ACCESS> KC: array<u32>; // (slots, context, kv_dim / 2)
@group(0) @binding($VB) var<storage, $ACCESS> VC: array<u32>;

fn get_KC(a: u32) -> f32 {
    return unpack2x16float(KC[a >> 1u])[a & 1u];
}

fn get_VC(a: u32) -> f32 {
    return unpack2x16float(VC[a >> 1u])[a & 1u];
}
