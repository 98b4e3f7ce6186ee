//! TMA on the interpreter: the tensor-map encoder's driver rules, tile loads of rank 1..5 with element strides,
//! out-of-bounds zero fill and every swizzle mode (checked against the PTX ISA §5.5.7 swizzle tables, written here
//! independently of the interpreter's XOR), tile stores with clipping, non-tensor bulk copies and bulk groups, and
//! the checks: reading a TMA destination before its mbarrier phase completed, a transaction count that never
//! completes, and a TMA store of generic stores without fence.proxy.async.

mod common;

use common::*;
use ptxsim::tensor_map::{encode_tiled, DataType, Interleave, L2Promotion, OobFill, Swizzle, TensorMap};
use ptxsim::{Machine, Module, SimError};

const WAIT: &str = "{ .reg .pred P1; LAB_WAIT: mbarrier.try_wait.parity.shared::cta.b64 P1, [%bar], 0; @P1 bra DONE; bra LAB_WAIT; DONE: }";

/// A kernel with a tensor map parameter: thread 0 initialises the mbarrier, `{issue}` runs on thread 0 (`%p`),
/// every thread runs `{wait}` then `{after}` and stores `%v`. `in` holds the coordinates c0..c4 and the expected
/// transaction bytes.
fn kernel(issue: &str, wait: &str, after: &str) -> String {
    format!(
        r#"
.version 8.0
.target sm_90a
.address_size 64
.visible .entry k(.param .u64 out, .param .u64 in, .param .align 128 .b8 tmap[128])
{{
  .reg .b64 %out, %in, %off, %map, %g;
  .reg .b32 %tid, %v, %t, %u, %dst, %bar, %c0, %c1, %c2, %c3, %c4, %bytes;
  .reg .pred %p, %q;
  .shared .align 1024 .b8 smem[4096];
  .shared .align 8 .b8 mbar[8];
  mov.u32 %tid, %tid.x;
  ld.param.u64 %out, [out];
  ld.param.u64 %in, [in];
  mov.b64 %map, tmap;
  cvta.param.u64 %map, %map;
  mov.u32 %dst, smem;
  mov.u32 %bar, mbar;
  ld.global.u32 %c0, [%in];
  ld.global.u32 %c1, [%in+4];
  ld.global.u32 %c2, [%in+8];
  ld.global.u32 %c3, [%in+12];
  ld.global.u32 %c4, [%in+16];
  ld.global.u32 %bytes, [%in+20];
  ld.global.u64 %g, [%in+24];
  mov.u32 %v, 0;
  setp.eq.u32 %p, %tid, 0;
  @%p mbarrier.init.shared::cta.b64 [%bar], 1;
  fence.mbarrier_init.release.cluster;
  bar.sync 0;
  {issue}
  {wait}
  shl.b32 %t, %tid, 2;
  add.u32 %t, %t, %dst;
  {after}
  mul.wide.u32 %off, %tid, 4;
  add.s64 %out, %out, %off;
  st.global.u32 [%out], %v;
  ret;
}}
"#
    )
}

fn coords_operand(rank: usize) -> String {
    (0..rank).map(|i| format!("%c{i}")).collect::<Vec<_>>().join(", ")
}

fn load_issue(rank: usize) -> String {
    format!(
        "@%p prefetch.tensormap [%map];\n  @%p mbarrier.arrive.expect_tx.shared::cta.b64 _, [%bar], %bytes;\n  \
         @%p cp.async.bulk.tensor.{rank}d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%dst], [%map, {{{}}}], [%bar];",
        coords_operand(rank)
    )
}

/// A tensor of `rank` u32 elements for the tests: dims, byte strides of dims 1.., box, element strides.
struct Tensor {
    dims: Vec<u64>,
    strides: Vec<u64>,
    boxd: Vec<u32>,
    es: Vec<u32>,
    swizzle: Swizzle,
}

impl Tensor {
    /// Counts loaded along each dimension (element stride of dim 0 ignored, as the driver documents).
    fn counts(&self) -> Vec<u32> {
        self.boxd.iter().zip(&self.es).enumerate().map(|(i, (&b, &e))| if i == 0 { b } else { b.div_ceil(e) }).collect()
    }
    fn box_bytes(&self) -> u32 {
        4 * self.counts().iter().product::<u32>()
    }
    /// The global word of the tensor's element at x (the allocation holds word k = k + 1).
    fn value(&self, x: &[i64]) -> u32 {
        let byte = x[0] as u64 * 4 + x[1..].iter().zip(&self.strides).map(|(&xi, &s)| xi as u64 * s).sum::<u64>();
        (byte / 4) as u32 + 1
    }
    fn alloc_words(&self) -> usize {
        let mut last = (self.dims[0] - 1) * 4;
        for i in 1..self.dims.len() {
            last += (self.dims[i] - 1) * self.strides[i - 1];
        }
        (last / 4 + 1) as usize
    }
    fn map(&self, base: u64) -> Result<[u8; 128], SimError> {
        encode_tiled(
            DataType::Uint32 as u32,
            self.dims.len() as u32,
            base,
            &self.dims,
            &self.strides,
            &self.boxd,
            &self.es,
            Interleave::None as u32,
            self.swizzle as u32,
            L2Promotion::None as u32,
            OobFill::None as u32,
        )
    }
    /// Where the dense box byte `lin` lies in shared memory (buffer 1024-aligned), from the PTX ISA §5.5.7 tables:
    /// in 128-byte row r, 16-byte chunk c holds chunk c ^ (r mod 2 / 4 / 8) for the 32 / 64 / 128-byte swizzles.
    fn swizzled(&self, lin: usize) -> usize {
        let period = match self.swizzle {
            Swizzle::None => return lin,
            Swizzle::B32 => 2,
            Swizzle::B64 => 4,
            Swizzle::B128 => 8,
        };
        let (row, chunk, within) = (lin / 128, lin % 128 / 16, lin % 16);
        row * 128 + (chunk ^ (row % period)) * 16 + within
    }
    /// The shared-memory words a tile load at `c` leaves (independent of the interpreter's code).
    fn expected_smem(&self, c: &[i64]) -> Vec<u32> {
        let n = self.counts();
        let total: u32 = n.iter().product();
        let mut out = vec![0u32; total as usize];
        for idx in 0..total as usize {
            let (mut rest, mut x, mut inside) = (idx, Vec::new(), true);
            for i in 0..n.len() {
                let j = (rest % n[i] as usize) as i64;
                rest /= n[i] as usize;
                let step = if i == 0 { 1 } else { self.es[i] as i64 };
                let xi = c[i] + j * step;
                inside &= xi >= 0 && (xi as u64) < self.dims[i];
                x.push(xi);
            }
            out[self.swizzled(idx * 4) / 4] = if inside { self.value(&x) } else { 0 };
        }
        out
    }
}

/// Runs a kernel with `threads` threads, the tensor's map and global words, coordinates `c` and `bytes`; returns %v.
fn launch(src: &str, t: &Tensor, c: &[i64], bytes: u32, threads: u32, extra_global: u64) -> Result<(Vec<u32>, Machine, u64), SimError> {
    let module = Module::parse(src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    let mut m = Machine::new();
    let words: Vec<u32> = (0..t.alloc_words() as u32).map(|k| k + 1).collect();
    let base = upload(&mut m, &words);
    let mut input = [0u32; 8];
    for (i, &ci) in c.iter().enumerate() {
        input[i] = ci as i32 as u32;
    }
    input[5] = bytes;
    input[6] = extra_global as u32;
    input[7] = (extra_global >> 32) as u32;
    let inp = upload(&mut m, &input);
    let out = poisoned(&mut m, threads as usize * 4);
    let mut params = Params::new().ptr(out).ptr(inp).0;
    params.resize(128, 0);
    params.extend_from_slice(&t.map(base).expect("valid map"));
    m.launch(&module, "k", [1, 1, 1], [threads, 1, 1], 0, &params)?;
    Ok((download(&m, out, threads as usize), m, base))
}

fn failure<T>(r: Result<T, SimError>) -> SimError {
    match r {
        Ok(_) => panic!("the kernel must fail"),
        Err(e) => e,
    }
}

fn load_and_check(t: &Tensor, c: &[i64]) {
    let bytes = t.box_bytes();
    let src = kernel(&load_issue(t.dims.len()), WAIT, "ld.shared.u32 %v, [%t];");
    let (got, _, _) = launch(&src, t, c, bytes, bytes / 4, 0).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got, t.expected_smem(c), "rank {} swizzle {:?} at {c:?}", t.dims.len(), t.swizzle);
}

#[test]
fn tile_loads_in_every_swizzle_mode_with_out_of_bounds_fill() {
    for swizzle in [Swizzle::None, Swizzle::B32, Swizzle::B64, Swizzle::B128] {
        let box0 = if swizzle == Swizzle::None { 32 } else { 8 << (swizzle as u32 - 1) };
        let t = Tensor { dims: vec![40, 10], strides: vec![160], boxd: vec![box0, 8], es: vec![1, 1], swizzle };
        for c in [[0i64, 0], [24, 6], [-4, -3], [36, 9]] {
            load_and_check(&t, &c);
        }
    }
}

#[test]
fn tile_loads_of_rank_1_3_and_5_with_element_strides() {
    let t = Tensor { dims: vec![100], strides: vec![], boxd: vec![64], es: vec![1], swizzle: Swizzle::None };
    load_and_check(&t, &[60]);
    // Non-monotonic strides (dim 2's is smaller than dim 1's, as fast.cu's 3-d trick) and an element stride of 2.
    let t = Tensor { dims: vec![8, 6, 4], strides: vec![128, 32], boxd: vec![8, 4, 2], es: vec![1, 2, 1], swizzle: Swizzle::B32 };
    load_and_check(&t, &[0, 1, 3]);
    let t = Tensor { dims: vec![4, 2, 2, 2, 3], strides: vec![16, 32, 64, 128], boxd: vec![4, 2, 2, 2, 2], es: vec![1, 1, 1, 1, 1], swizzle: Swizzle::B64 };
    load_and_check(&t, &[0, 1, 0, 1, -1]);
    load_and_check(&t, &[0, 0, 1, 0, 2]);
}

fn tensor_2d(swizzle: Swizzle) -> Tensor {
    Tensor { dims: vec![40, 10], strides: vec![160], boxd: vec![32, 8], es: vec![1, 1], swizzle }
}

#[test]
fn reading_a_tma_destination_before_its_phase_completes_is_reported() {
    let t = tensor_2d(Swizzle::B128);
    let src = kernel(&load_issue(2), "", "ld.shared.u32 %v, [%t];");
    let e = failure(launch(&src, &t, &[0, 0], t.box_bytes(), 256, 0));
    assert!(e.message.contains("before the TMA / bulk copy writing it landed"), "{e}");
    // Waiting on the barrier of another phase parity (the loop exits at once) is the same bug.
    let src = kernel(&load_issue(2), &WAIT.replace("], 0;", "], 1;"), "ld.shared.u32 %v, [%t];");
    let e = failure(launch(&src, &t, &[0, 0], t.box_bytes(), 256, 0));
    assert!(e.message.contains("before the TMA / bulk copy writing it landed"), "{e}");
}

#[test]
fn an_expect_tx_larger_than_the_box_deadlocks_naming_the_barrier() {
    let t = tensor_2d(Swizzle::None);
    let src = kernel(&load_issue(2), WAIT, "ld.shared.u32 %v, [%t];");
    let e = failure(launch(&src, &t, &[0, 0], 2 * t.box_bytes(), 256, 0));
    assert!(e.message.contains("deadlock") && e.message.contains("mbarrier at shared offset 0x1000"), "{e}");
    assert!(e.message.contains("1024 transaction bytes outstanding"), "{e}");
}

#[test]
fn tile_store_clips_at_the_tensor_end_and_refuses_negative_coordinates() {
    // Every thread writes its word of the swizzled box (word tid = 1000 + tid), fences, and thread 0 stores the box.
    let t = tensor_2d(Swizzle::B128);
    let issue = "add.u32 %u, %tid, 1000;\n  st.shared.u32 [%t], %u;\n  fence.proxy.async.shared::cta;\n  bar.sync 0;\n  \
                 @%p cp.async.bulk.tensor.2d.global.shared::cta.tile.bulk_group [%map, {%c0, %c1}], [%dst];\n  \
                 @%p cp.async.bulk.commit_group;\n  @%p cp.async.bulk.wait_group.read 0;";
    let src = kernel(&("shl.b32 %t, %tid, 2;\n  add.u32 %t, %t, %dst;\n  ".to_owned() + issue), "", "");
    let (_, m, base) = launch(&src, &t, &[16, 4], 0, 256, 0).unwrap();
    let global: Vec<u32> = download(&m, base, t.alloc_words());
    for y in 0..10i64 {
        for x in 0..40i64 {
            let (j0, j1) = (x - 16, y - 4);
            let want =
                if (0..32).contains(&j0) && (0..8).contains(&j1) { 1000 + (t.swizzled(((j1 * 32 + j0) * 4) as usize) / 4) as u32 } else { t.value(&[x, y]) };
            assert_eq!(global[(y * 40 + x) as usize], want, "element ({x}, {y})");
        }
    }
    let e = failure(launch(&src, &t, &[-1, 4], 0, 256, 0));
    assert!(e.message.contains("TMA store with coordinate 0 = -1"), "{e}");
    // Without fence.proxy.async the generic stores are not visible to the TMA engine (async proxy) ...
    let unfenced = src.replace("fence.proxy.async.shared::cta;", "");
    let e = failure(launch(&unfenced, &t, &[16, 4], 0, 256, 0));
    assert!(e.message.contains("the TMA store (async proxy) reads shared offset") && e.message.contains("no fence.proxy.async"), "{e}");
    // ... unless the issuing thread fences after the barrier that orders the writes before it.
    let issuer_fences = unfenced.replace("@%p cp.async.bulk.tensor.2d.global", "@%p fence.proxy.async;\n  @%p cp.async.bulk.tensor.2d.global");
    launch(&issuer_fences, &t, &[16, 4], 0, 256, 0).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn bulk_copies_and_bulk_groups() {
    // 1 KiB global -> shared with cp.async.bulk (complete_tx on the barrier), then shared -> another buffer.
    let issue = "@%p mbarrier.arrive.expect_tx.shared::cta.b64 _, [%bar], 1024;\n  \
                 @%p cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%dst], [%g], 1024, [%bar];";
    let after = "ld.shared.u32 %v, [%t];\n  bar.sync 0;\n  @%p cp.async.bulk.global.shared::cta.bulk_group [%g+1024], [%dst], 1024;\n  \
                 @%p cp.async.bulk.commit_group;\n  @%p cp.async.bulk.wait_group 0;";
    let src = kernel(issue, WAIT, after);
    let module = Module::parse(&src).unwrap();
    let mut m = Machine::new();
    let words: Vec<u32> = (0..512u32).map(|k| k * 3).collect();
    let g = m.alloc(4096);
    m.write(g, bytemuck::cast_slice(&words[..256])).unwrap();
    let mut input = [0u32; 8];
    input[6] = g as u32;
    input[7] = (g >> 32) as u32;
    let inp = upload(&mut m, &input);
    let out = poisoned(&mut m, 256 * 4);
    let mut params = Params::new().ptr(out).ptr(inp).0;
    params.resize(256, 0);
    m.launch(&module, "k", [1, 1, 1], [256, 1, 1], 0, &params).unwrap();
    assert_eq!(download::<u32>(&m, out, 256), words[..256]);
    assert_eq!(download::<u32>(&m, g + 1024, 256), words[..256]);
}

#[test]
fn encoder_refuses_what_the_driver_refuses() {
    let ok = |dt: u32, rank: u32, addr: u64, dims: &[u64], strides: &[u64], boxd: &[u32], es: &[u32], il: u32, sw: u32, l2: u32, oob: u32| {
        encode_tiled(dt, rank, addr, dims, strides, boxd, es, il, sw, l2, oob)
    };
    let bf16 = DataType::Bfloat16 as u32;
    let good = ok(bf16, 2, 0x1000, &[64, 100], &[128], &[64, 32], &[1, 1], 0, 3, 2, 0).unwrap();
    let m = TensorMap::decode(&good);
    assert_eq!(
        (m.global_address, m.data_type, m.rank, m.global_dim[..2].to_vec(), m.global_strides[..2].to_vec()),
        (0x1000, bf16, 2, vec![64, 100], vec![2, 128])
    );
    assert_eq!((m.box_dim[..2].to_vec(), m.swizzle, m.l2_promotion), (vec![64, 32], 3, 2));
    assert_eq!(TensorMap::decode(&m.encode()), m);
    // All-zero bytes are a valid default map: rank 1, one u8 element.
    let z = TensorMap::decode(&[0; 128]);
    assert_eq!((z.rank, z.data_type, z.global_dim[0], z.box_dim[0], z.element_strides[0], z.swizzle), (1, 0, 1, 1, 1, 0));
    let refused = [
        ("data type 13", ok(13, 2, 0x1000, &[64, 100], &[128], &[64, 32], &[1, 1], 0, 0, 0, 0)),
        ("interleave 3", ok(bf16, 2, 0x1000, &[64, 100], &[128], &[64, 32], &[1, 1], 3, 0, 0, 0)),
        ("swizzle 4", ok(bf16, 2, 0x1000, &[64, 100], &[128], &[64, 32], &[1, 1], 0, 4, 0, 0)),
        ("l2Promotion 4", ok(bf16, 2, 0x1000, &[64, 100], &[128], &[64, 32], &[1, 1], 0, 0, 4, 0)),
        ("oobFill 2", ok(bf16, 2, 0x1000, &[64, 100], &[128], &[64, 32], &[1, 1], 0, 0, 0, 2)),
        ("tensorRank 6", ok(bf16, 6, 0x1000, &[1; 6], &[16; 5], &[8; 6], &[1; 6], 0, 0, 0, 0)),
        ("tensorRank 0", ok(bf16, 0, 0x1000, &[], &[], &[], &[], 0, 0, 0, 0)),
        ("needs rank >= 3", ok(bf16, 2, 0x1000, &[64, 100], &[128], &[64, 32], &[1, 1], 1, 0, 0, 0)),
        ("rank 2 needs", ok(bf16, 2, 0x1000, &[64], &[128], &[64, 32], &[1, 1], 0, 0, 0, 0)),
        ("not 16-byte aligned", ok(bf16, 2, 0x1008, &[64, 100], &[128], &[64, 32], &[1, 1], 0, 0, 0, 0)),
        ("not 32-byte aligned", ok(bf16, 3, 0x1010, &[64, 100, 2], &[128, 12800], &[64, 32, 1], &[1, 1, 1], 2, 1, 0, 0)),
        ("globalDim[1] = 0", ok(bf16, 2, 0x1000, &[64, 0], &[128], &[64, 32], &[1, 1], 0, 0, 0, 0)),
        ("globalDim[0] = 2147483649", ok(bf16, 2, 0x1000, &[(1 << 31) + 1, 2], &[1 << 32], &[64, 2], &[1, 1], 0, 0, 0, 0)),
        ("globalStrides[0] = 136", ok(bf16, 2, 0x1000, &[64, 100], &[136], &[64, 32], &[1, 1], 0, 0, 0, 0)),
        ("globalStrides[0] = 1099511627776", ok(bf16, 2, 0x1000, &[64, 100], &[1 << 40], &[64, 32], &[1, 1], 0, 0, 0, 0)),
        ("boxDim[1] = 257", ok(bf16, 2, 0x1000, &[64, 1000], &[128], &[64, 257], &[1, 1], 0, 0, 0, 0)),
        ("boxDim[1] = 0", ok(bf16, 2, 0x1000, &[64, 100], &[128], &[64, 0], &[1, 1], 0, 0, 0, 0)),
        ("= 20 bytes is not a multiple of 16", ok(bf16, 2, 0x1000, &[64, 100], &[128], &[10, 32], &[1, 1], 0, 0, 0, 0)),
        ("elementStrides[1] = 9", ok(bf16, 2, 0x1000, &[64, 100], &[128], &[64, 32], &[1, 9], 0, 0, 0, 0)),
        ("exceeds the 64-byte swizzle span", ok(bf16, 2, 0x1000, &[64, 100], &[128], &[64, 32], &[1, 1], 0, 2, 0, 0)),
        ("exceeds the 32-byte swizzle span", ok(bf16, 2, 0x1000, &[64, 100], &[128], &[32, 32], &[1, 1], 0, 1, 0, 0)),
        ("INTERLEAVE_32B requires SWIZZLE_32B", ok(bf16, 3, 0x1000, &[64, 100, 2], &[128, 12800], &[64, 32, 1], &[1, 1, 1], 2, 3, 0, 0)),
        ("needs a floating-point data type", ok(DataType::Int32 as u32, 2, 0x1000, &[64, 100], &[256], &[32, 32], &[1, 1], 0, 0, 0, 1)),
    ];
    for (rule, result) in refused {
        let e = result.expect_err(rule);
        assert!(e.message.contains(rule), "expected a refusal naming {rule:?}, got {e}");
    }
    // Accepted by the driver: strides that do not increase, element strides > 1, the NaN fill for a float type.
    ok(DataType::Float32 as u32, 3, 0x1000, &[64, 8, 4], &[512, 128], &[32, 8, 2], &[1, 2, 1], 0, 3, 0, 1).unwrap();
}
