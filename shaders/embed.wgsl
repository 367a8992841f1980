// x (n, hidden) = rows `token` of the embedding table E (vocab, hidden), widened to f32.
// A table split over several buffers (larger than one storage binding) is read chunk by
// chunk: this dispatch covers tokens row_start .. row_start + row_count. One thread per
// (row, 4 elements).

struct Params {
    n: u32,
    hidden: u32,    // multiple of 4
    row_start: u32,
    row_count: u32,
    grid_x: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(2) var<storage, read_write> Y: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> Rows: array<vec4<u32>>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let h4 = P.hidden / 4u;
    let id = gid.y * P.grid_x + gid.x;
    if id >= P.n * h4 {
        return;
    }
    let i = id / h4;
    let d = id % h4;
    let token = Rows[i].z;
    if token >= P.row_start && token < P.row_start + P.row_count {
        Y[i * h4 + d] = load_W((token - P.row_start) * h4 + d);
    }
}
