// Streams a buffer once: the ceiling every weight-bound kernel is measured against. Each
// thread sums a grid-strided set of vec4s; the sum is stored only if it equals a value
// random data never gives, so the loads cannot be optimized away and nothing is written.

struct Params {
    count: u32,   // vec4s in the buffer
    threads: u32, // threads in the grid
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> A: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> Out: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let id = gid.y * groups.x * 256u + gid.x;
    var s = vec4<f32>(0.0);
    for (var i = id; i < P.count; i += P.threads) {
        s += A[i];
    }
    let total = s.x + s.y + s.z + s.w;
    if total == 1234.5678 {
        Out[0] = total;
    }
}
