//! wgmma on the interpreter: known-answer m64nNk8 (tf32), m64nNk16 (f16/bf16) and m64nNk32 (e4m3/e5m2, any mix)
//! products with operands loaded by TMA in every swizzle mode (K-major, and N-major B with imm-trans-b for 16-bit
//! inputs), the K-advance of the descriptor's start address inside a swizzle row (the DeepGEMM / fast.cu recipe), A
//! from registers, f16 and f32 accumulators, scale-d (immediate and predicate, false in mid-chain), negated inputs;
//! fp8 special values (subnormals, the largest finite values, NaN and infinity codes); and the hazard checks:
//! overwriting a wgmma's shared operand or touching its registers before the wait_group that retires it, a generic
//! store read by the wgmma without fence.proxy.async, and a missing wgmma.fence. The reference rounds each
//! instruction's exact sum once, as the interpreter's default model does (its data keeps every sum exact in f64), or
//! follows an f64 transliteration of MMA-Sim for `TensorArith::HopperTruncated` (random fp8 data).

mod common;

use common::*;
use half::{bf16, f16};
use ptxsim::tensor_map::{encode_tiled, DataType, Swizzle};
use ptxsim::{Counters, Machine, Module, SimError, TensorArith};

/// Operand layouts in shared memory, as TMA writes them.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Layout {
    /// K-major without swizzle: 8-row x 16-byte core matrices (a 3-d TMA box of 16-byte K-chunks), LBO = the
    /// distance between K-chunks (rows * 16), SBO = 128; each k-step advances the start by two chunks.
    KMajorInterleave,
    /// K-major with a swizzle: rows of `span` bytes (= K * element bytes), SBO = 8 rows; each k-step advances the
    /// start by 32 bytes inside the swizzle row.
    KMajor(Swizzle),
    /// N-major (imm-trans = 1) with the 128-byte swizzle: rows of 64 N elements per k, SBO = 8 k-rows (16-bit only).
    MnMajor128,
}

/// Input element types.
#[derive(Clone, Copy, PartialEq, Debug)]
enum In {
    Tf32,
    Bf16,
    F16,
    E4m3,
    E5m2,
}

impl In {
    fn name(self) -> &'static str {
        match self {
            In::Tf32 => "tf32",
            In::Bf16 => "bf16",
            In::F16 => "f16",
            In::E4m3 => "e4m3",
            In::E5m2 => "e5m2",
        }
    }
    fn bytes(self) -> u32 {
        match self {
            In::Tf32 => 4,
            In::Bf16 | In::F16 => 2,
            In::E4m3 | In::E5m2 => 1,
        }
    }
    /// Exact value of an encoding (an fp8 decoder written from the OCP definitions, independent of the interpreter).
    fn value(self, bits: u32) -> f64 {
        let (man_bits, bias) = match self {
            // The tensor cores ignore the low 13 bits of a tf32 operand.
            In::Tf32 => return f32::from_bits(bits & !0x1fff) as f64,
            In::Bf16 => return bf16::from_bits(bits as u16).to_f64(),
            In::F16 => return f16::from_bits(bits as u16).to_f64(),
            In::E4m3 => (3, 7),
            In::E5m2 => (2, 15),
        };
        let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
        let (exp, man) = ((bits >> man_bits) & ((1 << (7 - man_bits)) - 1), bits & ((1 << man_bits) - 1));
        match (self, exp, man) {
            (In::E4m3, 15, 7) => f64::NAN,
            (In::E5m2, 31, 0) => sign * f64::INFINITY,
            (In::E5m2, 31, _) => f64::NAN,
            (_, 0, _) => sign * man as f64 * 2f64.powi(1 - bias - man_bits),
            _ => sign * (1.0 + man as f64 / (1 << man_bits) as f64) * 2f64.powi(exp as i32 - bias),
        }
    }
    /// The encoding of a small integer (exact in every type).
    fn int(self, v: f32) -> u32 {
        match self {
            // Junk in the 13 bits the tensor cores ignore (a zero becomes an f32 subnormal that reads as 0).
            In::Tf32 => v.to_bits() | 0x0abc,
            In::Bf16 => bf16::from_f32(v).to_bits() as u32,
            In::F16 => f16::from_f32(v).to_bits() as u32,
            _ => (0..256).find(|&c| self.value(c) == v as f64).expect("small integers are exact in fp8"),
        }
    }
    /// TMA element type of the operand.
    fn tma(self) -> u32 {
        match self {
            In::Tf32 => DataType::Float32 as u32,
            In::Bf16 => DataType::Bfloat16 as u32,
            In::F16 => DataType::Float16 as u32,
            _ => DataType::Uint8 as u32,
        }
    }
    /// Codes of fp8 special values: (smallest subnormal, largest subnormal, largest finite, a NaN, infinity or the
    /// other NaN).
    fn specials(self) -> [u32; 5] {
        match self {
            In::E4m3 => [0x01, 0x07, 0x7e, 0x7f, 0xff],
            In::E5m2 => [0x01, 0x03, 0x7b, 0x7e, 0x7c],
            _ => unreachable!("fp8 only"),
        }
    }
}

#[derive(Clone, Copy)]
struct Case {
    n: u32,
    k: u32,
    a_ty: In,
    b_ty: In,
    f16_acc: bool,
    a: Layout,
    b: Layout,
    a_in_regs: bool,
    neg_a: bool,
    neg_b: bool,
    /// The k-step whose scale-d is a false predicate (discarding the steps before it).
    zero_c_at: Option<u32>,
    /// fp8 special values planted in some rows of A and columns of B.
    special: bool,
    /// Random finite fp8 codes instead of small integers (for the Hopper model, whose reference is MMA-Sim's).
    random: bool,
    /// The tensor-core arithmetic model.
    model: TensorArith,
}

impl Case {
    /// K per instruction: 32 bytes of K per row.
    fn k_step(&self) -> u32 {
        32 / self.a_ty.bytes()
    }
}

fn a_val(m: u32, k: u32) -> f32 {
    ((m * 7 + k * 3) % 9) as f32 - 4.0
}
fn b_val(k: u32, n: u32) -> f32 {
    ((k * 5 + n * 11) % 7) as f32 - 3.0
}

/// Encoding of A[m][k]. The special data: row 1 has the smallest and largest subnormal at k = 0, 1; row 2 the
/// largest finite value at k = 3; row 3 a NaN at k = 5; row 4 the infinity (e5m2) or the negative NaN (e4m3) at k = 6;
/// row 5 the negative largest value at k = 7.
fn a_bits(c: &Case, m: u32, k: u32) -> u32 {
    if c.random {
        return random_code(c, c.a_ty, m * 1000 + k);
    }
    if c.special {
        let s = c.a_ty.specials();
        match (m, k) {
            (1, 0) => return s[0],
            (1, 1) => return s[1],
            (2, 3) => return s[2],
            (3, 5) => return s[3],
            (4, 6) => return s[4],
            (5, 7) => return s[2] | 0x80,
            _ => {}
        }
    }
    c.a_ty.int(a_val(m, k))
}

/// Encoding of B[k][n]. The special data: column 1 has the smallest subnormal at k = 0 (so D[1][1] holds a
/// subnormal-times-subnormal product) and the largest subnormal at k = 2; column 2 the largest finite value at k = 4
/// (D[2][2]: the largest product).
fn b_bits(c: &Case, k: u32, n: u32) -> u32 {
    if c.random {
        return random_code(c, c.b_ty, 1_000_000 + k * 1000 + n);
    }
    if c.special {
        let s = c.b_ty.specials();
        match (k, n) {
            (0, 1) => return s[0],
            (2, 1) => return s[1],
            (4, 2) => return s[2],
            _ => {}
        }
    }
    c.b_ty.int(b_val(k, n))
}

/// A finite fp8 code picked by a hash of `at`; with an f16 accumulator at most 8 in magnitude (so that the sums stay
/// in f16's range).
fn random_code(c: &Case, ty: In, at: u32) -> u32 {
    let limit = if c.f16_acc { 8.0 } else { f64::INFINITY };
    let mut h = at.wrapping_mul(0x9e37_79b9) ^ 0x5bd1_e995;
    loop {
        h ^= h >> 15;
        h = h.wrapping_mul(0x2c1b_3c6d);
        h ^= h >> 12;
        let code = h & 0xff;
        if ty.value(code).is_finite() && ty.value(code).abs() <= limit {
            return code;
        }
    }
}

/// The encodings of A ([64][K]) and B ([K][N]).
fn codes(c: &Case) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    ((0..64).map(|m| (0..c.k).map(|k| a_bits(c, m, k)).collect()).collect(), (0..c.k).map(|k| (0..c.n).map(|n| b_bits(c, k, n)).collect()).collect())
}

/// Little-endian bytes of elements of `eb` bytes.
fn bytes_of(codes: impl Iterator<Item = u32>, eb: u32) -> Vec<u8> {
    codes.flat_map(|c| c.to_le_bytes().into_iter().take(eb as usize)).collect()
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

/// The tensor map (over a row-major global matrix of `ty` elements: K-major, rows are mn and columns k; N-major,
/// rows k and columns n) and the descriptor of k-step `ks` for an operand with `mn` rows.
fn operand(layout: Layout, mn: u32, k: u32, base: u64, buf: u32, ks: u32, ty: In) -> ([u8; 128], u64) {
    let (dt, eb) = (ty.tma(), ty.bytes());
    match layout {
        Layout::KMajorInterleave => {
            let (t, chunks) = (16 / eb, k * eb / 16);
            let map =
                encode_tiled(dt, 3, base, &[t as u64, mn as u64, chunks as u64], &[(k * eb) as u64, 16], &[t, mn, chunks], &[1, 1, 1], 0, 0, 0, 0).unwrap();
            (map, desc(buf + 2 * ks * mn * 16, mn * 16, 128, 0))
        }
        Layout::KMajor(s) => {
            let span = 16u32 << s as u32;
            assert_eq!(k * eb, span);
            let map = encode_tiled(dt, 2, base, &[k as u64, mn as u64], &[(k * eb) as u64], &[k, mn], &[1, 1], 0, s as u32, 0, 0).unwrap();
            (map, desc(buf + 32 * ks, 16, 8 * span, layout_code(s)))
        }
        Layout::MnMajor128 => {
            assert_eq!((mn, eb), (64, 2));
            let map = encode_tiled(dt, 2, base, &[64, k as u64], &[128], &[64, k], &[1, 1], 0, Swizzle::B128 as u32, 0, 0).unwrap();
            (map, desc(buf + 2048 * ks, 8192, 1024, 1))
        }
    }
}

/// The kernel: TMA both operands, wait, `{before}`, one wgmma per k-step (descriptors from `in`), commit,
/// `{between}`, wait, store D.
fn source(c: &Case, before: &str, between: &str) -> String {
    let d_regs = if c.f16_acc { c.n / 4 } else { c.n / 2 };
    let dlist = (0..d_regs).map(|i| format!("%d{i}")).collect::<Vec<_>>().join(", ");
    let ty_d = if c.f16_acc { "f16" } else { "f32" };
    let types = format!("{ty_d}.{}.{}", c.a_ty.name(), c.b_ty.name());
    let sixteen_bit = c.a_ty.bytes() == 2;
    let dims = |l: Layout| if l == Layout::KMajorInterleave { 3 } else { 2 };
    let coords = |l: Layout| if l == Layout::KMajorInterleave { "{%z, %z, %z}" } else { "{%z, %z}" };
    let mut steps = String::new();
    for ks in 0..c.k / c.k_step() {
        // scale-d: an immediate 0 first, then the immediate 1 and a true predicate, or a false one.
        let scale_d = match ks {
            0 => "0",
            _ if c.zero_c_at == Some(ks) => "%pz",
            1 => "1",
            _ => "%pk",
        };
        let (neg_a, neg_b) = (if c.neg_a { -1 } else { 1 }, if c.neg_b { -1 } else { 1 });
        // Only 16-bit inputs have the imm-trans operands.
        let trans_b = (c.b == Layout::MnMajor128) as u32;
        let trans = if !sixteen_bit {
            String::new()
        } else if c.a_in_regs {
            format!(", {trans_b}")
        } else {
            format!(", 0, {trans_b}")
        };
        steps += &format!("  ld.global.u64 %da, [%in+{}];\n  ld.global.u64 %db, [%in+{}];\n", 16 * ks, 16 * ks + 8);
        let shape = format!("m64n{}k{}", c.n, c.k_step());
        if c.a_in_regs {
            steps += &format!(
                "  mul.wide.u32 %off, %tid, 16;\n  add.s64 %g, %in, %off;\n  ld.global.v4.u32 {{{a}}}, [%g+{}];\n  wgmma.fence.sync.aligned;\n  \
                 wgmma.mma_async.sync.aligned.{shape}.{types} {{{dlist}}}, {{{a}}}, %db, {scale_d}, {neg_a}, {neg_b}{trans};\n",
                64 + 2048 * ks,
                // Each k-step its own registers: A registers stay in flight until the wait_group.
                a = (4 * ks..4 * ks + 4).map(|r| format!("%a{r}")).collect::<Vec<_>>().join(", ")
            );
        } else {
            steps += &format!("  wgmma.mma_async.sync.aligned.{shape}.{types} {{{dlist}}}, %da, %db, {scale_d}, {neg_a}, {neg_b}{trans};\n");
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
  .reg .pred %p, %pk, %pz;
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
  setp.eq.u32 %pz, %tid, 1000;
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
    Ok(run_source(c, &source(c, before, between), true)?.0.iter().map(|row| row.iter().map(|&x| to_f32(c, x)).collect()).collect())
}

/// The value of an accumulator element's bits.
fn to_f32(c: &Case, bits: u32) -> f32 {
    if c.f16_acc {
        f16::from_bits(bits as u16).to_f32()
    } else {
        f32::from_bits(bits)
    }
}

/// Runs the kernel `src` made for case `c`; returns the bits of D as [64][n] (f32, or f16 in the low half) and the
/// launch's counters.
fn run_source(c: &Case, src: &str, wgmma_fence_check: bool) -> Result<(Vec<Vec<u32>>, Counters), SimError> {
    let (n, k) = (c.n, c.k);
    let module = Module::parse(src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    let mut m = Machine::new();
    m.wgmma_fence_check = wgmma_fence_check;
    m.tensor_arith = c.model;
    let (ea, eb) = (c.a_ty.bytes(), c.b_ty.bytes());
    let (ac, bc) = codes(c);
    let a_global = bytes_of((0..64).flat_map(|r| (0..k).map(move |kk| (r, kk))).map(|(r, kk)| ac[r as usize][kk as usize]), ea);
    let b_global = if c.b == Layout::MnMajor128 {
        bytes_of((0..k).flat_map(|kk| (0..n).map(move |nn| (kk, nn))).map(|(kk, nn)| bc[kk as usize][nn as usize]), eb)
    } else {
        bytes_of((0..n).flat_map(|nn| (0..k).map(move |kk| (kk, nn))).map(|(kk, nn)| bc[kk as usize][nn as usize]), eb)
    };
    let (ga, gb) = (upload(&mut m, &a_global), upload(&mut m, &b_global));
    let mut words = vec![0u32; 8192];
    let mut maps = Vec::new();
    let k_step = c.k_step();
    for ks in 0..k / k_step {
        let (map_a, da) = operand(c.a, 64, k, ga, SA, ks, c.a_ty);
        let (map_b, db) = operand(c.b, n, k, gb, SB, ks, c.b_ty);
        words[4 * ks as usize] = da as u32;
        words[4 * ks as usize + 1] = (da >> 32) as u32;
        words[4 * ks as usize + 2] = db as u32;
        words[4 * ks as usize + 3] = (db >> 32) as u32;
        maps = vec![map_a, map_b];
        // A in registers (HOPPER-ASYNC.md §1.5), thread t of warp w, lane g * 4 + q: tf32 element i in register i at
        // row 16w + g + 8(i & 1), column q + 4(i >> 1); 16-bit element i in register
        // i / 2 at row 16w + g + 8((i >> 1) & 1), column 2q + (i & 1) + 8(i >> 2); 8-bit element i in register i / 4
        // (byte i & 3) at row 16w + g + 8((i >> 2) & 1), column 4q + (i & 3) + 16(i >> 3).
        for t in 0..128u32 {
            let (wr, l) = (t / 32, t % 32);
            let (g, q) = (l / 4, l % 4);
            for i in 0..16 / ea {
                let (reg, shift, row, col) = if ea == 4 {
                    (i, 0, 16 * wr + g + 8 * (i & 1), q + 4 * (i >> 1))
                } else if ea == 2 {
                    (i >> 1, 16 * (i & 1), 16 * wr + g + 8 * ((i >> 1) & 1), 2 * q + (i & 1) + 8 * (i >> 2))
                } else {
                    (i >> 2, 8 * (i & 3), 16 * wr + g + 8 * ((i >> 2) & 1), 4 * q + (i & 3) + 16 * (i >> 3))
                };
                let word = (16 + 512 * ks + 4 * t + reg) as usize;
                words[word] |= ac[row as usize][(k_step * ks + col) as usize] << shift;
            }
        }
    }
    words[32000 / 4] = ea * 64 * k + eb * n * k;
    let inp = upload(&mut m, &words);
    let d_regs = if c.f16_acc { n / 4 } else { n / 2 };
    let out = poisoned(&mut m, (128 * d_regs * 4) as usize);
    let mut params = Params::new().ptr(out).ptr(inp).0;
    params.resize(128, 0);
    params.extend_from_slice(&maps[0]);
    params.extend_from_slice(&maps[1]);
    let counters = m.launch(&module, "k", [1, 1, 1], [128, 1, 1], 0, &params)?;
    let raw: Vec<u32> = download(&m, out, (128 * d_regs) as usize);
    // Accumulator fragment: element i of thread t is D[16w + g + 8((i>>1)&1)][8(i>>2) + 2q + (i&1)].
    let mut d = vec![vec![0u32; n as usize]; 64];
    for t in 0..128u32 {
        let (wr, l) = (t / 32, t % 32);
        let (g, q) = (l / 4, l % 4);
        for i in 0..n / 2 {
            let (row, col) = (16 * wr + g + 8 * ((i >> 1) & 1), 8 * (i >> 2) + 2 * q + (i & 1));
            d[row as usize][col as usize] =
                if c.f16_acc { (raw[(t * d_regs + i / 2) as usize] >> (16 * (i & 1))) & 0xffff } else { raw[(t * d_regs + i) as usize] };
        }
    }
    Ok((d, counters))
}

/// D[m][n] as bits: each instruction's C (+0 where scale-d is false) and K products combined as `c.model` says (the
/// exact sum rounded once: the data keep every sum exact in f64; or MMA-Sim's Hopper model); NaN as the canonical NaN.
fn reference(c: &Case, (ac, bc): &(Vec<Vec<u32>>, Vec<Vec<u32>>), m: u32, n: u32) -> u32 {
    let sign = if c.neg_a != c.neg_b { -1.0 } else { 1.0 };
    let k_step = c.k_step();
    let mut d = 0f64;
    for ks in 0..c.k / k_step {
        let c_in = if ks == 0 || c.zero_c_at == Some(ks) { 0.0 } else { d };
        let ks_range = ks * k_step..(ks + 1) * k_step;
        let a: Vec<f64> = ks_range.clone().map(|kk| sign * c.a_ty.value(ac[m as usize][kk as usize])).collect();
        let b: Vec<f64> = ks_range.map(|kk| c.b_ty.value(bc[kk as usize][n as usize])).collect();
        d = match c.model {
            TensorArith::ExactRoundOnce => {
                let mut sum = c_in;
                for (x, y) in a.iter().zip(&b) {
                    let (term, next) = (x * y, sum + x * y);
                    // TwoSum: the reference's data must keep every addition exact.
                    let t = next - sum;
                    assert!(!next.is_finite() || (sum - (next - t)) + (term - t) == 0.0, "inexact reference sum at D[{m}][{n}]");
                    sum = next;
                }
                if c.f16_acc {
                    f16::from_f64(sum).to_f64()
                } else {
                    sum as f32 as f64
                }
            }
            _ => {
                // Stored as the accumulator type (exact, or infinity beyond its range).
                let v = mma_sim_hopper(c_in, &a, &b, c.a_ty.bytes() == 1, c.f16_acc, min_exponent(c.a_ty), min_exponent(c.b_ty));
                if c.f16_acc {
                    f16::from_f64(v).to_f64()
                } else {
                    v as f32 as f64
                }
            }
        };
    }
    match (c.f16_acc, d.is_nan()) {
        (true, true) => 0x7fff,
        (true, false) => f16::from_f64(d).to_bits() as u32,
        (false, true) => 0x7fff_ffff,
        (false, false) => (d as f32).to_bits(),
    }
}

/// The smallest normal exponent of an input type.
fn min_exponent(ty: In) -> i32 {
    match ty {
        In::Tf32 | In::Bf16 => -126,
        In::F16 | In::E5m2 => -14,
        In::E4m3 => -6,
    }
}

fn check(c: Case) -> Counters {
    let (d, counters) = run_source(&c, &source(&c, "", ""), true).unwrap_or_else(|e| panic!("{e}"));
    let codes = codes(&c);
    for m in 0..64 {
        for n in 0..c.n {
            let want = reference(&c, &codes, m, n);
            let got = d[m as usize][n as usize];
            assert_eq!(
                got,
                want,
                "D[{m}][{n}] = {} (bits {got:#x}), want {} ({want:#x}) (n{} k{} {:?}x{:?} {:?}/{:?} regs {} f16 D {})",
                to_f32(&c, got),
                to_f32(&c, want),
                c.n,
                c.k,
                c.a_ty,
                c.b_ty,
                c.a,
                c.b,
                c.a_in_regs,
                c.f16_acc
            );
        }
    }
    counters
}

fn case(n: u32, k: u32, a: Layout, b: Layout) -> Case {
    Case {
        n,
        k,
        a_ty: In::Bf16,
        b_ty: In::Bf16,
        f16_acc: false,
        a,
        b,
        a_in_regs: false,
        neg_a: false,
        neg_b: false,
        zero_c_at: None,
        special: false,
        random: false,
        model: TensorArith::ExactRoundOnce,
    }
}

fn fp8(n: u32, k: u32, a_ty: In, b_ty: In, layout: Layout) -> Case {
    Case { a_ty, b_ty, ..case(n, k, layout, layout) }
}

#[test]
fn wgmma_k_major_without_swizzle() {
    check(case(64, 16, Layout::KMajorInterleave, Layout::KMajorInterleave));
}

#[test]
fn wgmma_k_major_32b_and_64b_swizzle_with_k_advance() {
    check(case(8, 16, Layout::KMajor(Swizzle::B32), Layout::KMajor(Swizzle::B32)));
    check(Case { a_ty: In::F16, b_ty: In::F16, ..case(64, 32, Layout::KMajor(Swizzle::B64), Layout::KMajor(Swizzle::B64)) });
    check(Case { a_ty: In::F16, b_ty: In::F16, f16_acc: true, neg_b: true, ..case(32, 32, Layout::KMajor(Swizzle::B64), Layout::KMajor(Swizzle::B64)) });
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
    assert_eq!(f32::from_bits(run_source(&c, &late_write, false).unwrap().0[5][5]), (0..16).map(|k| a_val(5, k) * b_val(k, 5)).sum::<f32>());
    let e = run_source(&c, &source(&c, "", "").replace("wgmma.fence.sync.aligned;\n", ""), true).unwrap_err();
    assert!(e.message.contains("before any wgmma.fence"), "{e}");
    // A descriptor that differs between lanes.
    let skewed = source(&c, "", "")
        .replace("  wgmma.fence.sync.aligned;\n", "  wgmma.fence.sync.aligned;\n  @%p add.s64 %da, %da, 2;\n")
        .replace("  ld.global.u64 %da, [%in+0];\n", "");
    let e = run_source(&c, &skewed.replacen("wgmma.fence.sync.aligned;", "ld.global.u64 %da, [%in+0];\n  wgmma.fence.sync.aligned;", 1), true).unwrap_err();
    assert!(e.message.contains("differs between lanes 0 and 1"), "{e}");
}

#[test]
fn fp8_k_major_without_swizzle_with_k_advance() {
    // Two k-steps: the second starts two 16-byte K-chunks (2 LBO) further.
    check(fp8(64, 64, In::E4m3, In::E4m3, Layout::KMajorInterleave));
    check(Case { f16_acc: true, ..fp8(8, 64, In::E5m2, In::E4m3, Layout::KMajorInterleave) });
    check(Case { a_in_regs: true, ..fp8(256, 128, In::E4m3, In::E5m2, Layout::KMajorInterleave) });
}

#[test]
fn fp8_32b_and_64b_swizzle() {
    check(fp8(8, 32, In::E4m3, In::E5m2, Layout::KMajor(Swizzle::B32)));
    check(Case { f16_acc: true, neg_a: true, ..fp8(64, 32, In::E5m2, In::E5m2, Layout::KMajor(Swizzle::B32)) });
    // Two k-steps inside the 64-byte swizzle row (start + 32 bytes).
    check(Case { neg_a: true, ..fp8(128, 64, In::E5m2, In::E5m2, Layout::KMajor(Swizzle::B64)) });
    check(Case { f16_acc: true, neg_b: true, ..fp8(256, 64, In::E4m3, In::E4m3, Layout::KMajor(Swizzle::B64)) });
}

#[test]
fn fp8_128b_swizzle_every_type_mix_and_the_kernel_shapes() {
    // Four k-steps inside the 128-byte swizzle row (start + 32, 64, 96), the second with an immediate scale-d of 1.
    let sw = Layout::KMajor(Swizzle::B128);
    for (a_ty, b_ty) in [(In::E4m3, In::E4m3), (In::E4m3, In::E5m2), (In::E5m2, In::E4m3), (In::E5m2, In::E5m2)] {
        for n in [8, 64, 128, 256] {
            check(fp8(n, 128, a_ty, b_ty, sw));
        }
        check(Case { f16_acc: true, ..fp8(64, 128, a_ty, b_ty, sw) });
    }
    // The counters: 4 warps x 4 k-steps, 2 * 16 * N * 32 flops per warp instruction.
    let counters = check(fp8(128, 128, In::E4m3, In::E4m3, sw));
    assert_eq!(counters.tensor_ops, 16);
    assert_eq!(counters.tensor_flops, 16 * 2 * 16 * 128 * 32);
}

#[test]
fn fp8_a_from_registers() {
    let sw = Layout::KMajor(Swizzle::B128);
    for (a_ty, b_ty) in [(In::E4m3, In::E4m3), (In::E4m3, In::E5m2), (In::E5m2, In::E4m3), (In::E5m2, In::E5m2)] {
        for n in [8, 64, 128, 256] {
            check(Case { a_in_regs: true, ..fp8(n, 128, a_ty, b_ty, sw) });
        }
    }
    check(Case { a_in_regs: true, f16_acc: true, neg_a: true, ..fp8(64, 64, In::E4m3, In::E4m3, Layout::KMajor(Swizzle::B64)) });
    check(Case { a_in_regs: true, neg_b: true, ..fp8(64, 32, In::E5m2, In::E4m3, Layout::KMajor(Swizzle::B32)) });
}

#[test]
fn fp8_scale_d_false_in_mid_chain_and_negated_inputs() {
    // The third of four k-steps has a false scale-d predicate: D is the last two steps' products only.
    let sw = Layout::KMajor(Swizzle::B128);
    check(Case { zero_c_at: Some(2), neg_a: true, ..fp8(64, 128, In::E4m3, In::E4m3, sw) });
    check(Case { zero_c_at: Some(2), neg_b: true, f16_acc: true, a_in_regs: true, ..fp8(128, 128, In::E5m2, In::E4m3, sw) });
    check(Case { neg_a: true, neg_b: true, ..fp8(64, 128, In::E4m3, In::E5m2, sw) });
}

#[test]
fn fp8_subnormals_largest_values_nan_and_infinity() {
    for (a_ty, b_ty) in [(In::E4m3, In::E4m3), (In::E5m2, In::E5m2), (In::E4m3, In::E5m2), (In::E5m2, In::E4m3)] {
        for f16_acc in [false, true] {
            for a_in_regs in [false, true] {
                let c = Case { special: true, f16_acc, a_in_regs, neg_b: f16_acc, ..fp8(64, 64, a_ty, b_ty, Layout::KMajor(Swizzle::B64)) };
                check(c);
                // What the special data lands on: a subnormal product in D[1][1], NaN in row 3, and for f16 D with
                // e5m2 the largest product overflows to infinity.
                let d = run_case(&c, "", "").unwrap();
                assert!(d[3].iter().all(|x| x.is_nan()));
                assert!(d[0].iter().all(|x| x.is_finite()));
                if f16_acc && a_ty == In::E5m2 && b_ty == In::E5m2 {
                    assert_eq!(d[2][2], f32::NEG_INFINITY);
                }
            }
        }
    }
}

#[test]
fn fp8_planted_operand_overwrite_is_reported() {
    let c = fp8(64, 64, In::E4m3, In::E4m3, Layout::KMajor(Swizzle::B64));
    // Thread 0 overwrites one byte of B while the wgmma that reads it is not retired.
    let e = run_case(&c, "", "@%p st.shared.u8 [sb+65], %z;").unwrap_err();
    assert!(e.message.contains("which an unretired wgmma.mma_async still reads"), "{e}");
    // The same store after the wait_group is fine.
    check_after_wait(&c, "@%p st.shared.u8 [sb+65], %z;");
    // A generic store read by the async proxy without fence.proxy.async, and an A register touched too early.
    let rewrite = "{ .reg .b16 %h; @%p ld.shared.u8 %h, [sb+65]; @%p st.shared.u8 [sb+65], %h; }";
    let e = run_case(&c, &format!("{rewrite} bar.sync 0;"), "").unwrap_err();
    assert!(e.message.contains("no fence.proxy.async"), "{e}");
    let rs = Case { a_in_regs: true, ..c };
    let e = run_case(&rs, "", "mov.b32 %t, %a1;").unwrap_err();
    assert!(e.message.contains("of an unfinished wgmma.mma_async"), "{e}");
}

/// Runs `c` with `after` placed after the wait_group, and checks D.
fn check_after_wait(c: &Case, after: &str) {
    let src = source(c, "", "").replace("  wgmma.wait_group.sync.aligned 0;\n", &format!("  wgmma.wait_group.sync.aligned 0;\n  {after}\n"));
    let (d, _) = run_source(c, &src, true).unwrap_or_else(|e| panic!("{e}"));
    let codes = codes(c);
    for m in 0..64 {
        for n in 0..c.n {
            assert_eq!(d[m as usize][n as usize], reference(c, &codes, m, n), "D[{m}][{n}]");
        }
    }
}

#[test]
fn fp8_wrong_forms_are_parse_errors() {
    let c = fp8(64, 32, In::E4m3, In::E4m3, Layout::KMajor(Swizzle::B32));
    let good = source(&c, "", "");
    assert!(Module::parse(&good).is_ok());
    // fp8 has no imm-trans operands: the 16-bit operand count is refused.
    let e = Module::parse(&good.replace(", 0, 1, 1;", ", 0, 1, 1, 0, 0;")).unwrap_err().to_string();
    assert!(e.contains("expected 6 operands (d, a-desc, b-desc, scale-d, imm-scale-a, imm-scale-b), found 8"), "{e}");
    let rs = source(&Case { a_in_regs: true, ..c }, "", "");
    assert!(Module::parse(&rs).is_ok());
    let e = Module::parse(&rs.replace(", 0, 1, 1;", ", 0, 1, 1, 0;")).unwrap_err().to_string();
    assert!(e.contains("expected 6 operands (d, a, b-desc, scale-d, imm-scale-a, imm-scale-b), found 7"), "{e}");
    // fp8 needs k32, and an f32 or f16 accumulator.
    let e = Module::parse(&good.replace("m64n64k32", "m64n64k16")).unwrap_err().to_string();
    assert!(e.contains("need the k32 shape"), "{e}");
    let e = Module::parse(&good.replace("k32.f32.e4m3", "k32.bf16.e4m3")).unwrap_err().to_string();
    assert!(e.contains("an f32 or f16 accumulator"), "{e}");
    // imm-scale must be 1 or -1.
    let e = Module::parse(&good.replace(", 0, 1, 1;", ", 0, 2, 1;")).unwrap_err().to_string();
    assert!(e.contains("must be one of [1, -1]"), "{e}");
}

#[test]
fn hopper_model_matches_mma_sim_on_random_fp8_and_agrees_on_small_integers() {
    let sw = Layout::KMajor(Swizzle::B128);
    let hopper = TensorArith::HopperTruncated;
    // Random finite codes (subnormals and, with f32 D, the largest values included), chained over four k-steps: the
    // interpreter's integer implementation against the f64 transliteration of MMA-Sim.
    for (a_ty, b_ty) in [(In::E4m3, In::E4m3), (In::E5m2, In::E4m3), (In::E5m2, In::E5m2)] {
        for f16_acc in [false, true] {
            let c = Case { random: true, model: hopper, f16_acc, ..fp8(64, 128, a_ty, b_ty, sw) };
            check(c);
            check(Case { a_in_regs: true, neg_a: true, ..c });
        }
    }
    // The models differ on such data (the check above is not the exact model in disguise).
    let c = Case { random: true, ..fp8(64, 128, In::E4m3, In::E4m3, sw) };
    let (exact, _) = run_source(&c, &source(&c, "", ""), true).unwrap();
    let (truncated, _) = run_source(&Case { model: hopper, ..c }, &source(&c, "", ""), true).unwrap();
    let differ = exact.iter().flatten().zip(truncated.iter().flatten()).filter(|(x, y)| x != y).count();
    assert!(differ > 0, "no element differs between the exact and the Hopper model");
    // Small integers: both models give the exact product, for fp8 and bf16, SS and RS.
    check(Case { model: hopper, ..fp8(128, 128, In::E4m3, In::E5m2, sw) });
    check(Case { model: hopper, a_in_regs: true, f16_acc: true, ..fp8(64, 128, In::E5m2, In::E5m2, sw) });
    check(Case { model: hopper, ..case(256, 64, sw, sw) });
    check(Case { model: hopper, a_in_regs: true, ..case(64, 64, sw, sw) });
}

#[test]
fn tf32_k8_with_the_low_13_bits_ignored() {
    // tf32 words carry junk in their low 13 bits (f32 bits of small integers | 0xabc): the products ignore it.
    for layout in [Layout::KMajorInterleave, Layout::KMajor(Swizzle::B32), Layout::KMajor(Swizzle::B64), Layout::KMajor(Swizzle::B128)] {
        let k = match layout {
            Layout::KMajor(s) => 4 << s as u32,
            _ => 16,
        };
        let c = Case { a_ty: In::Tf32, b_ty: In::Tf32, ..case(64, k, layout, layout) };
        check(c);
        check(Case { a_in_regs: true, neg_a: true, ..c });
    }
    let sw = Layout::KMajor(Swizzle::B128);
    let c = Case { a_ty: In::Tf32, b_ty: In::Tf32, ..case(8, 32, sw, sw) };
    for n in [8, 128, 256] {
        check(Case { n, zero_c_at: Some(2), ..c });
    }
    let counters = check(Case { n: 256, model: TensorArith::HopperTruncated, ..c });
    assert_eq!(counters.tensor_flops, 16 * 2 * 16 * 256 * 8);
    // tf32 has only the f32 accumulator and no imm-trans operands.
    let good = source(&c, "", "");
    let e = Module::parse(&good.replace("k8.f32.tf32", "k8.f16.tf32")).unwrap_err().to_string();
    assert!(e.contains("tf32 inputs need the k8 shape and an f32 accumulator"), "{e}");
    let e = Module::parse(&good.replace(", 0, 1, 1;", ", 0, 1, 1, 0, 0;")).unwrap_err().to_string();
    assert!(e.contains("expected 6 operands"), "{e}");
}
