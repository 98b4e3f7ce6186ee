//! wgmma on the interpreter: known-answer m64nNk16 products with operands loaded by TMA in every swizzle mode
//! (K-major, and N-major B with imm-trans-b), the K-advance of the descriptor's start address inside a swizzle row
//! (the DeepGEMM / fast.cu recipe), A from registers, f16 and f32 accumulators, scale-d and negated inputs; and the
//! hazard checks: overwriting a wgmma's shared operand or touching its registers before the wait_group that
//! retires it, a generic store read by the wgmma without fence.proxy.async, and a missing wgmma.fence. Small-integer data, so every accumulation order gives the same exact result.

mod common;

use common::*;
use half::{bf16, f16};
use ptxsim::tensor_map::{encode_tiled, DataType, Swizzle};
use ptxsim::{Machine, Module, SimError};

/// Operand layouts in shared memory, as TMA writes them.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Layout {
    /// K-major without swizzle: 8-row x 16-byte core matrices (a 3-d TMA box), LBO = 1024, SBO = 128.
    KMajorInterleave,
    /// K-major with a swizzle: rows of `span` bytes (= K * 2), SBO = 8 rows.
    KMajor(Swizzle),
    /// N-major (imm-trans = 1) with the 128-byte swizzle: rows of 64 N elements per k, SBO = 8 k-rows.
    MnMajor128,
}

struct Case {
    n: u32,
    k: u32,
    f16_inputs: bool,
    f16_acc: bool,
    a: Layout,
    b: Layout,
    a_in_regs: bool,
    neg_b: bool,
}

fn a_val(m: u32, k: u32) -> f32 {
    ((m * 7 + k * 3) % 9) as f32 - 4.0
}
fn b_val(k: u32, n: u32) -> f32 {
    ((k * 5 + n * 11) % 7) as f32 - 3.0
}

fn bits16(v: f32, f16_inputs: bool) -> u16 {
    if f16_inputs {
        f16::from_f32(v).to_bits()
    } else {
        bf16::from_f32(v).to_bits()
    }
}

const SA: u32 = 0; // shared offsets of the A and B buffers (declared first, 1024-aligned)
const SB: u32 = 8192;

/// Descriptor: start, LBO, SBO (bytes) and the layout type (0 none, 1 128B, 2 64B, 3 32B).
fn desc(start: u32, lbo: u32, sbo: u32, layout: u64) -> u64 {
    ((start >> 4) & 0x3fff) as u64 | (((lbo >> 4) & 0x3fff) as u64) << 16 | (((sbo >> 4) & 0x3fff) as u64) << 32 | layout << 62
}

fn layout_code(s: Swizzle) -> u64 {
    match s {
        Swizzle::None => 0,
        Swizzle::B128 => 1,
        Swizzle::B64 => 2,
        Swizzle::B32 => 3,
    }
}

/// The tensor map (over a row-major global matrix of `rows` x `cols` 16-bit elements) and the descriptor of k-step
/// `ks` for an operand with `mn` rows (K-major: global rows are mn, cols k; N-major: rows k, cols n).
fn operand(layout: Layout, mn: u32, k: u32, base: u64, buf: u32, ks: u32, f16_inputs: bool) -> ([u8; 128], u64) {
    let dt = if f16_inputs { DataType::Float16 } else { DataType::Bfloat16 } as u32;
    match layout {
        Layout::KMajorInterleave => {
            assert_eq!(k, 16);
            let map = encode_tiled(dt, 3, base, &[8, mn as u64, 2], &[k as u64 * 2, 16], &[8, mn, 2], &[1, 1, 1], 0, 0, 0, 0).unwrap();
            (map, desc(buf, mn * 16, 128, 0))
        }
        Layout::KMajor(s) => {
            let span = 16u32 << s as u32;
            assert_eq!(k * 2, span);
            let map = encode_tiled(dt, 2, base, &[k as u64, mn as u64], &[k as u64 * 2], &[k, mn], &[1, 1], 0, s as u32, 0, 0).unwrap();
            (map, desc(buf + 32 * ks, 16, 8 * span, layout_code(s)))
        }
        Layout::MnMajor128 => {
            assert_eq!(mn, 64);
            let map = encode_tiled(dt, 2, base, &[64, k as u64], &[128], &[64, k], &[1, 1], 0, Swizzle::B128 as u32, 0, 0).unwrap();
            (map, desc(buf + 2048 * ks, 8192, 1024, 1))
        }
    }
}

/// The kernel: TMA both operands, wait, `{before}`, K/16 wgmmas (descriptors from `in`), commit, `{between}`, wait, store D.
fn source(c: &Case, before: &str, between: &str) -> String {
    let d_regs = if c.f16_acc { c.n / 4 } else { c.n / 2 };
    let dlist = (0..d_regs).map(|i| format!("%d{i}")).collect::<Vec<_>>().join(", ");
    let (ty_d, ty_ab) = (if c.f16_acc { "f16" } else { "f32" }, if c.f16_inputs { "f16" } else { "bf16" });
    let dims = |l: Layout| if l == Layout::KMajorInterleave { 3 } else { 2 };
    let coords = |l: Layout| if l == Layout::KMajorInterleave { "{%z, %z, %z}" } else { "{%z, %z}" };
    let mut steps = String::new();
    for ks in 0..c.k / 16 {
        let scale_d = if ks == 0 { "0" } else { "%pk" };
        let (trans_a, trans_b) = (0, (c.b == Layout::MnMajor128) as u32);
        let neg_b = if c.neg_b { -1 } else { 1 };
        steps += &format!("  ld.global.u64 %da, [%in+{}];\n  ld.global.u64 %db, [%in+{}];\n", 16 * ks, 16 * ks + 8);
        if c.a_in_regs {
            steps += &format!(
                "  mul.wide.u32 %off, %tid, 16;\n  add.s64 %g, %in, %off;\n  ld.global.v4.u32 {{{a}}}, [%g+{}];\n  wgmma.fence.sync.aligned;\n  \
                 wgmma.mma_async.sync.aligned.m64n{}k16.{ty_d}.{ty_ab}.{ty_ab} {{{dlist}}}, {{{a}}}, %db, {scale_d}, 1, {neg_b}, {trans_b};\n",
                64 + 2048 * ks,
                c.n,
                // Each k-step its own registers: A registers stay in flight until the wait_group.
                a = (4 * ks..4 * ks + 4).map(|r| format!("%a{r}")).collect::<Vec<_>>().join(", ")
            );
        } else {
            steps += &format!(
                "  wgmma.mma_async.sync.aligned.m64n{}k16.{ty_d}.{ty_ab}.{ty_ab} {{{dlist}}}, %da, %db, {scale_d}, 1, {neg_b}, {trans_a}, {trans_b};\n",
                c.n
            );
        }
    }
    let stores = (0..d_regs).map(|i| format!("  st.global.b32 [%out+{}], %d{i};\n", 4 * i)).collect::<String>();
    format!(
        r#"
.version 8.0
.target sm_90a
.address_size 64
.visible .entry k(.param .u64 out, .param .u64 in, .param .align 128 .b8 tmap_a[128], .param .align 128 .b8 tmap_b[128])
{{
  .shared .align 1024 .b8 sa[8192];
  .shared .align 1024 .b8 sb[32768];
  .shared .align 8 .b8 mbar[8];
  .reg .b64 %out, %in, %off, %ma, %mb, %da, %db, %g;
  .reg .b32 %tid, %t, %z, %bar, %dsta, %dstb, %bytes, %a<16>;
  .reg .{ty_d} %d<{d_regs}>;
  .reg .pred %p, %pk;
  mov.u32 %tid, %tid.x;
  mov.u32 %z, 0;
  ld.param.u64 %out, [out];
  ld.param.u64 %in, [in];
  mov.b64 %ma, tmap_a;
  cvta.param.u64 %ma, %ma;
  mov.b64 %mb, tmap_b;
  cvta.param.u64 %mb, %mb;
  mov.u32 %dsta, sa;
  mov.u32 %dstb, sb;
  mov.u32 %bar, mbar;
  ld.global.u32 %bytes, [%in+32000];
  setp.eq.u32 %p, %tid, 0;
  setp.ne.u32 %pk, %tid, 1000;
  @%p mbarrier.init.shared::cta.b64 [%bar], 1;
  bar.sync 0;
  @%p mbarrier.arrive.expect_tx.shared::cta.b64 _, [%bar], %bytes;
  @%p cp.async.bulk.tensor.{da}d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%dsta], [%ma, {ca}], [%bar];
  @%p cp.async.bulk.tensor.{db}d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%dstb], [%mb, {cb}], [%bar];
  {{ .reg .pred P1; LAB_WAIT: mbarrier.try_wait.parity.shared::cta.b64 P1, [%bar], 0; @P1 bra DONE; bra LAB_WAIT; DONE: }}
  {before}
  wgmma.fence.sync.aligned;
{steps}  wgmma.commit_group.sync.aligned;
  {between}
  wgmma.wait_group.sync.aligned 0;
  mul.wide.u32 %off, %tid, {dbytes};
  add.s64 %out, %out, %off;
{stores}  ret;
}}
"#,
        da = dims(c.a),
        db = dims(c.b),
        ca = coords(c.a),
        cb = coords(c.b),
        dbytes = 4 * d_regs,
    )
}

/// Runs a case; returns D as [64][n] f32.
fn run_case(c: &Case, before: &str, between: &str) -> Result<Vec<Vec<f32>>, SimError> {
    run_source(c, &source(c, before, between), true)
}

/// Runs the kernel `src` made for case `c`; returns D as [64][n] f32.
fn run_source(c: &Case, src: &str, wgmma_fence_check: bool) -> Result<Vec<Vec<f32>>, SimError> {
    let (n, k) = (c.n, c.k);
    let module = Module::parse(src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    let mut m = Machine::new();
    m.wgmma_fence_check = wgmma_fence_check;
    let a_global: Vec<u16> = (0..64).flat_map(|r| (0..k).map(move |kk| (r, kk))).map(|(r, kk)| bits16(a_val(r, kk), c.f16_inputs)).collect();
    let b_global: Vec<u16> = if c.b == Layout::MnMajor128 {
        (0..k).flat_map(|kk| (0..n).map(move |nn| (kk, nn))).map(|(kk, nn)| bits16(b_val(kk, nn), c.f16_inputs)).collect()
    } else {
        (0..n).flat_map(|nn| (0..k).map(move |kk| (kk, nn))).map(|(kk, nn)| bits16(b_val(kk, nn), c.f16_inputs)).collect()
    };
    let (ga, gb) = (upload(&mut m, &a_global), upload(&mut m, &b_global));
    let mut words = vec![0u32; 8192];
    let mut maps = Vec::new();
    for ks in 0..k / 16 {
        let (map_a, da) = operand(c.a, 64, k, ga, SA, ks, c.f16_inputs);
        let (map_b, db) = operand(c.b, n, k, gb, SB, ks, c.f16_inputs);
        words[4 * ks as usize] = da as u32;
        words[4 * ks as usize + 1] = (da >> 32) as u32;
        words[4 * ks as usize + 2] = db as u32;
        words[4 * ks as usize + 3] = (db >> 32) as u32;
        maps = vec![map_a, map_b];
        // A in registers: thread t of warp w holds rows 16w + g (+8), columns 2q (+1) (+8) of this k-step.
        for t in 0..128u32 {
            let (wr, l) = (t / 32, t % 32);
            let (g, q) = (l / 4, l % 4);
            for i in 0..8u32 {
                let (row, col) = (16 * wr + g + 8 * ((i >> 1) & 1), 2 * q + (i & 1) + 8 * (i >> 2));
                let word = (16 + 512 * ks + 4 * t + (i >> 1)) as usize;
                words[word] |= (bits16(a_val(row, 16 * ks + col), c.f16_inputs) as u32) << (16 * (i & 1));
            }
        }
    }
    words[32000 / 4] = 2 * 64 * k + 2 * n * k;
    let inp = upload(&mut m, &words);
    let d_regs = if c.f16_acc { n / 4 } else { n / 2 };
    let out = poisoned(&mut m, (128 * d_regs * 4) as usize);
    let mut params = Params::new().ptr(out).ptr(inp).0;
    params.resize(128, 0);
    params.extend_from_slice(&maps[0]);
    params.extend_from_slice(&maps[1]);
    m.launch(&module, "k", [1, 1, 1], [128, 1, 1], 0, &params)?;
    let raw: Vec<u32> = download(&m, out, (128 * d_regs) as usize);
    // Accumulator fragment: element i of thread t is D[16w + g + 8((i>>1)&1)][8(i>>2) + 2q + (i&1)].
    let mut d = vec![vec![f32::NAN; n as usize]; 64];
    for t in 0..128u32 {
        let (wr, l) = (t / 32, t % 32);
        let (g, q) = (l / 4, l % 4);
        for i in 0..n / 2 {
            let (row, col) = (16 * wr + g + 8 * ((i >> 1) & 1), 8 * (i >> 2) + 2 * q + (i & 1));
            let v = if c.f16_acc {
                f16::from_bits((raw[(t * d_regs + i / 2) as usize] >> (16 * (i & 1))) as u16).to_f32()
            } else {
                f32::from_bits(raw[(t * d_regs + i) as usize])
            };
            d[row as usize][col as usize] = v;
        }
    }
    Ok(d)
}

fn check(c: Case) {
    let d = run_case(&c, "", "").unwrap_or_else(|e| panic!("{e}"));
    let sign = if c.neg_b { -1.0 } else { 1.0 };
    for m in 0..64 {
        for n in 0..c.n {
            let want: f32 = sign * (0..c.k).map(|k| a_val(m, k) * b_val(k, n)).sum::<f32>();
            assert_eq!(d[m as usize][n as usize], want, "D[{m}][{n}] (n{} k{} {:?}/{:?} regs {})", c.n, c.k, c.a, c.b, c.a_in_regs);
        }
    }
}

fn case(n: u32, k: u32, a: Layout, b: Layout) -> Case {
    Case { n, k, f16_inputs: false, f16_acc: false, a, b, a_in_regs: false, neg_b: false }
}

#[test]
fn wgmma_k_major_without_swizzle() {
    check(case(64, 16, Layout::KMajorInterleave, Layout::KMajorInterleave));
}

#[test]
fn wgmma_k_major_32b_and_64b_swizzle_with_k_advance() {
    check(case(8, 16, Layout::KMajor(Swizzle::B32), Layout::KMajor(Swizzle::B32)));
    check(Case { f16_inputs: true, ..case(64, 32, Layout::KMajor(Swizzle::B64), Layout::KMajor(Swizzle::B64)) });
    check(Case { f16_inputs: true, f16_acc: true, neg_b: true, ..case(32, 32, Layout::KMajor(Swizzle::B64), Layout::KMajor(Swizzle::B64)) });
}

#[test]
fn wgmma_k_major_128b_swizzle_n256() {
    check(case(256, 64, Layout::KMajor(Swizzle::B128), Layout::KMajor(Swizzle::B128)));
}

#[test]
fn wgmma_transposed_b_and_a_from_registers() {
    check(case(64, 64, Layout::KMajor(Swizzle::B128), Layout::MnMajor128));
    check(Case { a_in_regs: true, ..case(64, 64, Layout::KMajor(Swizzle::B128), Layout::KMajor(Swizzle::B128)) });
}

#[test]
fn planted_wgmma_hazards_are_reported() {
    let c = case(64, 16, Layout::KMajor(Swizzle::B32), Layout::KMajor(Swizzle::B32));
    // Thread 0 overwrites part of B while the wgmma that reads it is not retired.
    let e = run_case(&c, "", "@%p st.shared.u16 [sb+64], %z;").unwrap_err();
    assert!(e.message.contains("which an unretired wgmma.mma_async still reads"), "{e}");
    // Reading an accumulator register before the wait_group.
    let e = run_case(&c, "", "mov.b32 %t, %d3;").unwrap_err();
    assert!(e.message.contains("of an unfinished wgmma.mma_async") && e.message.contains("before the wgmma.wait_group"), "{e}");
    // After the wait, both are fine.
    let d = run_case(&c, "", "wgmma.wait_group.sync.aligned 0;\n  mov.b32 %t, %d3;\n  @%p st.shared.u16 [sb+64], %z;").unwrap();
    assert_eq!(d[0][0], (0..16).map(|k| a_val(0, k) * b_val(k, 0)).sum::<f32>());
    // Thread 0 rewrites an element of B (the same value) with a generic store: without fence.proxy.async the wgmma
    // (async proxy) may not see it. With the fence (and the barrier that orders it before the other warps' wgmmas),
    // the product is unchanged.
    let rewrite = "{ .reg .b16 %h; @%p ld.shared.u16 %h, [sb+64]; @%p st.shared.u16 [sb+64], %h; }";
    let e = run_case(&c, &format!("{rewrite} bar.sync 0;"), "").unwrap_err();
    assert!(e.message.contains("wgmma.mma_async (async proxy) reads shared offset 0x2040") && e.message.contains("no fence.proxy.async"), "{e}");
    let d = run_case(&c, &format!("{rewrite} fence.proxy.async.shared::cta; bar.sync 0;"), "").unwrap();
    assert_eq!(d[63][63], (0..16).map(|k| a_val(63, k) * b_val(k, 63)).sum::<f32>());
    // An accumulator written after the fence (the C7515 pattern), and a wgmma with no fence at all.
    let late_write = source(&c, "", "").replace("wgmma.fence.sync.aligned;\n", "wgmma.fence.sync.aligned;\n  mov.f32 %d1, 0f00000000;\n");
    let e = run_source(&c, &late_write, true).unwrap_err();
    assert!(e.message.contains("written by another instruction after the last wgmma.fence"), "{e}");
    assert_eq!(run_source(&c, &late_write, false).unwrap()[5][5], (0..16).map(|k| a_val(5, k) * b_val(k, 5)).sum::<f32>());
    let e = run_source(&c, &source(&c, "", "").replace("wgmma.fence.sync.aligned;\n", ""), true).unwrap_err();
    assert!(e.message.contains("before any wgmma.fence"), "{e}");
    // A descriptor that differs between lanes.
    let skewed = source(&c, "", "")
        .replace("  wgmma.fence.sync.aligned;\n", "  wgmma.fence.sync.aligned;\n  @%p add.s64 %da, %da, 2;\n")
        .replace("  ld.global.u64 %da, [%in+0];\n", "");
    let e = run_source(&c, &skewed.replacen("wgmma.fence.sync.aligned;", "ld.global.u64 %da, [%in+0];\n  wgmma.fence.sync.aligned;", 1), true).unwrap_err();
    assert!(e.message.contains("differs between lanes 0 and 1"), "{e}");
}
