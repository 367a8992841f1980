// Element-wise ops over the first `count` elements:
// op 0: a += b (residual add); op 1: a = silu(a) * b with silu(g) = g / (1 + e^-g) (SwiGLU).

struct Params {
    count: u32,
    op: u32,
    grid_x: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read_write> A: array<f32>;
@group(0) @binding(2) var<storage, read> B: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y * P.grid_x + gid.x;
    if i >= P.count {
        return;
    }
    if P.op == 0u {
        A[i] = A[i] + B[i];
    } else {
        let g = A[i];
        A[i] = g / (1.0 + exp(-g)) * B[i];
    }
}
