// Rotary embeddings in the "rotate half" layout (element i pairs with i + head_dim/2) of
// q (n, q_heads * head_dim) and k (n, kv_heads * head_dim), in place, with the step's table
// T (tables, n, head_dim): cos then sin of each pair's angle at the row's position. With the write
// flag, the rotated k and the v of each row also go to the layer's cache at (slot, pos):
// RoPE and the KV write in one dispatch. Without the rotate flag it is only the KV write
// (then any head split of kv_dim works: head_dim = kv_dim, one head). One thread per
// (row, head, two consecutive pairs): with an f16 cache two consecutive elements are one
// word (head_dim is a multiple of 4). The cache's element type comes from kv_*.wgsl.

struct Params {
    n: u32,
    q_heads: u32,
    kv_heads: u32,
    head_dim: u32,
    write_kv: u32,  // 1: also write k and v to the cache
    context: u32,   // positions per cache slot
    grid_x: u32,    // threads along x (64 * workgroups)
    rotate: u32,    // 0: only write k and v (the unfused KV write); else 1 + the rotary table
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read_write> Q: array<f32>;
@group(0) @binding(2) var<storage, read_write> K: array<f32>;
@group(0) @binding(3) var<storage, read> V: array<f32>;
@group(0) @binding(4) var<storage, read> T: array<f32>;
@group(0) @binding(5) var<storage, read> Rows: array<vec4<u32>>; // (slot, pos, token, 0)

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let half = P.head_dim / 2u;
    let quarter = half / 2u;
    let heads = P.q_heads + P.kv_heads;
    let id = gid.y * P.grid_x + gid.x;
    if id >= P.n * heads * quarter {
        return;
    }
    let i = id / (heads * quarter);
    let h = (id / quarter) % heads;
    let p = (id % quarter) * 2u;
    var c = vec2<f32>(1.0);
    var s = vec2<f32>(0.0);
    if P.rotate != 0u {
        let row = (P.rotate - 1u) * P.n + i;
        c = vec2<f32>(T[row * P.head_dim + p], T[row * P.head_dim + p + 1u]);
        s = vec2<f32>(T[row * P.head_dim + half + p], T[row * P.head_dim + half + p + 1u]);
    }
    if h < P.q_heads {
        if P.rotate != 0u {
            let a = (i * P.q_heads + h) * P.head_dim + p;
            let x1 = vec2<f32>(Q[a], Q[a + 1u]);
            let x2 = vec2<f32>(Q[a + half], Q[a + half + 1u]);
            let y1 = x1 * c - x2 * s;
            let y2 = x2 * c + x1 * s;
            Q[a] = y1.x;
            Q[a + 1u] = y1.y;
            Q[a + half] = y2.x;
            Q[a + half + 1u] = y2.y;
        }
        return;
    }
    let kh = h - P.q_heads;
    let kv_dim = P.kv_heads * P.head_dim;
    let a = i * kv_dim + kh * P.head_dim + p;
    var k1 = vec2<f32>(K[a], K[a + 1u]);
    var k2 = vec2<f32>(K[a + half], K[a + half + 1u]);
    if P.rotate != 0u {
        let x1 = k1;
        let x2 = k2;
        k1 = x1 * c - x2 * s;
        k2 = x2 * c + x1 * s;
        K[a] = k1.x;
        K[a + 1u] = k1.y;
        K[a + half] = k2.x;
        K[a + half + 1u] = k2.y;
    }
    if P.write_kv != 0u {
        let row = Rows[i];
        let at = (row.x * P.context + row.y) * kv_dim + kh * P.head_dim + p;
        put_KC(at, k1);
        put_KC(at + half, k2);
        put_VC(at, vec2<f32>(V[a], V[a + 1u]));
        put_VC(at + half, vec2<f32>(V[a + half], V[a + half + 1u]));
    }
}
