//! The Hopper probe program (`tests/fixtures/hopper.cu` built with `-DPROBE_MAIN`) on the interpreter, and the
//! comparison that settles what ../shared/HOPPER-ASYNC.md marks UNVERIFIED with its dumps.
//!
//! On a GPU, `hopper-probe DIR` launches the probe kernels on fixed inputs and writes one `hopper_gpu_*.bin` dump per
//! [`Probe`]. [`simulate`] writes the same files from the same inputs with the interpreter (the PTX nvcc produced for
//! the probe), so tools/gpu/run.sh's rehearsal on `--backend sim` exercises the whole path. [`settle`] reads a folder
//! of dumps, reruns every probe on the interpreter with the dump's inputs under the interpreter's models and compares
//! the results bit for bit: one [`Verdict`] per probe, saying which model the hardware follows. The arithmetic probes
//! (random fp8 and bf16 data, where the models part) run under both `TensorArith` models; every other probe is
//! arithmetic-neutral (small integers, raw words) and runs once.
//!
//! Inputs (identical in hopper.cu's `main`): the small-integer probes take `A[m][k] = (7m + 3k) % 9 - 4` and
//! `B[k][n] = (5k + 11n) % 7 - 3` (exact in bf16 and e4m3, so every accumulation order agrees); the TMA probes a
//! tensor of u32 words `k + 1`; the random probes draw their codes from a xorshift32 sequence and store them at the
//! front of their dump, so the comparison uses exactly what the GPU read.

use std::path::Path;

use crate::float::{self, TensorArith};
use crate::ir::Rnd;
use crate::tensor_map::{encode_tiled, DataType, Interleave, L2Promotion, OobFill, Swizzle};
use crate::{Counters, Machine, Module, SimError};

/// One probe of the program: a kernel launch (or a series of them) on fixed inputs and the dump it writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// TMA tile loads of a 40 x 10 u32 tensor, the four swizzle modes, boxes inside and partly outside the tensor.
    Tma,
    /// TMA tile loads whose box rows (`boxDim[0]` x 4 bytes) are narrower than the swizzle span.
    TmaNarrow,
    /// bf16 wgmma m64n64k16, both operands K-major with the 128-byte swizzle, four K-steps.
    Wgmma,
    /// The same with B N-major (`imm-trans-b`).
    WgmmaTransB,
    /// A in registers, B K-major with the 32-byte swizzle.
    WgmmaRs,
    /// `elect.sync` with the whole warp and with lanes 5..31.
    Elect,
    /// The shared-window addresses of a static array and of the dynamic segment (declared 128-byte aligned).
    DynSmem,
    /// The warp-specialised TMA + mbarrier + wgmma pipeline (K = 256 over a 2-stage ring).
    WsGemm,
    /// fp8 e4m3 wgmma m64n64k32, A and B in shared memory, small integers.
    WgmmaFp8,
    /// fp8 e4m3 wgmma m64n64k32, A in registers, small integers.
    WgmmaFp8Rs,
    /// The fp8 shared-memory probe on random finite e4m3 codes: the accumulation's kept bits.
    WgmmaFp8Random,
    /// The bf16 probe on random bf16 values with a wide exponent spread: the accumulation's kept bits.
    WgmmaBf16Random,
}

impl Probe {
    /// Every probe, in the order the GPU program runs them.
    pub const ALL: [Probe; 12] = [
        Probe::Tma,
        Probe::Wgmma,
        Probe::WgmmaTransB,
        Probe::WgmmaRs,
        Probe::Elect,
        Probe::WsGemm,
        Probe::WgmmaFp8,
        Probe::WgmmaFp8Rs,
        Probe::WgmmaFp8Random,
        Probe::WgmmaBf16Random,
        Probe::TmaNarrow,
        Probe::DynSmem,
    ];

    /// The dump's file name.
    pub fn file(self) -> &'static str {
        match self {
            Probe::Tma => "hopper_gpu_tma.bin",
            Probe::TmaNarrow => "hopper_gpu_tma_narrow.bin",
            Probe::Wgmma => "hopper_gpu_wgmma.bin",
            Probe::WgmmaTransB => "hopper_gpu_wgmma_trans_b.bin",
            Probe::WgmmaRs => "hopper_gpu_wgmma_rs.bin",
            Probe::Elect => "hopper_gpu_elect.bin",
            Probe::DynSmem => "hopper_gpu_dyn_smem.bin",
            Probe::WsGemm => "hopper_gpu_ws_gemm.bin",
            Probe::WgmmaFp8 => "hopper_gpu_wgmma_fp8.bin",
            Probe::WgmmaFp8Rs => "hopper_gpu_wgmma_fp8_rs.bin",
            Probe::WgmmaFp8Random => "hopper_gpu_wgmma_fp8_random.bin",
            Probe::WgmmaBf16Random => "hopper_gpu_wgmma_bf16_random.bin",
        }
    }

    /// What the probe settles, with its place in HOPPER-ASYNC.md.
    pub fn question(self) -> &'static str {
        match self {
            Probe::Tma => "TMA tile loads: the four swizzle modes, out-of-bounds zero fill, and complete_tx counting the whole box of a partly out-of-bounds load (§2.2, §2.3; §8.4 item 3)",
            Probe::TmaNarrow => "TMA boxes narrower than the swizzle span (§2.3; §8.4 item 2)",
            Probe::Wgmma => "bf16 wgmma, 128-byte-swizzled K-major descriptors with K-advance, and the accumulator fragment (§1.2-§1.5)",
            Probe::WgmmaTransB => "bf16 wgmma with a transposed (N-major) B (§1.3)",
            Probe::WgmmaRs => "bf16 wgmma with A in registers and a 32-byte-swizzled B: the A fragment (§1.5)",
            Probe::Elect => "the lane elect.sync picks (§8.4 item 6)",
            Probe::DynSmem => "where static and dynamic shared memory start, the dynamic segment declared only 128-byte aligned (§1.4; §8.4 item 7)",
            Probe::WsGemm => "a warp-specialised TMA + mbarrier + wgmma pipeline over a reused 2-stage ring (§9)",
            Probe::WgmmaFp8 => "fp8 e4m3 wgmma from shared memory: 8-bit descriptors and K-advance (§1.4)",
            Probe::WgmmaFp8Rs => "fp8 e4m3 wgmma with A in registers: the 8-bit A fragment (§1.5)",
            Probe::WgmmaFp8Random => "fp8 e4m3 wgmma accumulation, the kept bits (§1.6; §8.4 item 5: terms aligned to 13 fraction bits, f32 results kept to 13)",
            Probe::WgmmaBf16Random => "bf16 wgmma accumulation, the kept bits (§1.6; §8.4 item 5: terms aligned to 25 fraction bits, truncated to f32)",
        }
    }

    /// The interpreter's model this probe is compared with, in words.
    pub fn model(self) -> &'static str {
        match self {
            Probe::Tma => "dense box, absolute-address XOR swizzle, zeros out of bounds, the whole box counted",
            Probe::TmaNarrow => "the dense box layout, then the absolute-address XOR across box rows",
            Probe::Elect => "the lowest active lane",
            Probe::DynSmem => {
                "static shared from address 0, the dynamic segment after it at the largest alignment of the module's extern declarations (1024 here)"
            }
            Probe::WgmmaFp8Random => "TensorArith::HopperTruncated: 13 fraction bits",
            Probe::WgmmaBf16Random => "TensorArith::HopperTruncated: 25 fraction bits, RZ to f32",
            _ => "HOPPER-ASYNC.md §1.4-§1.5 addressing and fragments, exact products",
        }
    }

    /// Whether the result depends on the tensor-core arithmetic (random data): then both models run.
    pub fn is_arithmetic(self) -> bool {
        matches!(self, Probe::WgmmaFp8Random | Probe::WgmmaBf16Random)
    }

    /// Bytes of inputs at the front of the dump (the random probes' A and B).
    fn input_bytes(self) -> usize {
        if self.is_arithmetic() {
            2 * 8192
        } else {
            0
        }
    }

    /// The random probes' A and B as the GPU program draws them; empty for the others.
    pub fn inputs(self) -> Vec<u8> {
        match self {
            Probe::WgmmaFp8Random => {
                // Finite e4m3 codes: 0x7f / 0xff are NaN.
                let mut x = Xorshift32(0x9e37_79b9);
                (0..2 * 8192)
                    .map(|_| loop {
                        let v = x.next_u32();
                        if v & 0x7f != 0x7f {
                            break v as u8;
                        }
                    })
                    .collect()
            }
            Probe::WgmmaBf16Random => {
                // bf16 with a random sign and mantissa and exponents 2^-8 .. 2^7: products spread over 2^30, so the
                // alignment to the largest term drops bits and the models part.
                let mut x = Xorshift32(0x2545_f491);
                (0..2 * 64 * 64)
                    .flat_map(|_| {
                        let v = x.next_u32();
                        let bits = (v >> 31) << 15 | (119 + (v >> 8) % 16) << 7 | (v & 0x7f);
                        (bits as u16).to_le_bytes()
                    })
                    .collect()
            }
            _ => Vec::new(),
        }
    }

    /// Runs the probe on the interpreter under `arith` with `inputs` (see [`Probe::inputs`]): the bytes of its dump and
    /// the counters of its last launch.
    pub fn run(self, module: &Module, arith: TensorArith, inputs: &[u8]) -> Result<(Vec<u8>, Counters), SimError> {
        if inputs.len() != self.input_bytes() {
            return Err(SimError::host(format!("{}: {} input bytes, expected {}", self.file(), inputs.len(), self.input_bytes())));
        }
        let mut m = Machine::new();
        m.tensor_arith = arith;
        let (words, counters) = match self {
            Probe::Tma | Probe::TmaNarrow => {
                let (mut all, mut counters) = (Vec::new(), Counters::default());
                for case in tma_cases(self) {
                    let (words, c) = tma_probe(&mut m, module, &case)?;
                    all.extend(words);
                    counters = c;
                }
                (all, counters)
            }
            Probe::Wgmma => {
                let a = bf16_matrix(64, 64, a_val);
                let b = bf16_matrix(64, 64, |n, k| b_val(k, n));
                wgmma_ss(&mut m, module, "wgmma_probe", &a, &b, bf16_sw128_map)?
            }
            Probe::WgmmaTransB => {
                let a = bf16_matrix(64, 64, a_val);
                let bt = bf16_matrix(64, 64, b_val); // row k holds B[k][0..64]: N-major
                wgmma_ss(&mut m, module, "wgmma_trans_b_probe", &a, &bt, bf16_sw128_map)?
            }
            Probe::WgmmaRs => {
                let a = upload(&mut m, &bf16_matrix(64, 16, a_val));
                let b = upload(&mut m, &bf16_matrix(64, 16, |n, k| b_val(k, n)));
                let map = encode_tiled(DataType::Bfloat16 as u32, 2, b, &[16, 64], &[32], &[16, 64], &[1, 1], 0, Swizzle::B32 as u32, 0, 0)?;
                launch_for_accumulators(&mut m, module, "wgmma_rs_probe", [128, 1, 1], 0, |out| pointer_then_map(a, &map, out))?
            }
            Probe::Elect => {
                let out = poisoned(&mut m, 64 * 4);
                let counters = m.launch(module, "elect_probe", [1, 1, 1], [32, 1, 1], 0, &out.to_le_bytes())?;
                (download_words(&m, out, 64)?, counters)
            }
            Probe::WsGemm => ws_gemm(&mut m, module, false)?,
            Probe::DynSmem => {
                let out = poisoned(&mut m, 16);
                let counters = m.launch(module, "dyn_smem_probe", [1, 1, 1], [128, 1, 1], 128, &out.to_le_bytes())?;
                (download_words(&m, out, 4)?, counters)
            }
            Probe::WgmmaFp8 | Probe::WgmmaFp8Rs => {
                let a = e4m3_matrix(64, 128, a_val);
                let b = e4m3_matrix(64, 128, |n, k| b_val(k, n));
                if self == Probe::WgmmaFp8 {
                    wgmma_ss(&mut m, module, "wgmma_fp8_probe", &a, &b, e4m3_sw128_map)?
                } else {
                    let a = upload(&mut m, &a);
                    let map = e4m3_sw128_map(upload(&mut m, &b))?;
                    launch_for_accumulators(&mut m, module, "wgmma_fp8_rs_probe", [128, 1, 1], 0, |out| pointer_then_map(a, &map, out))?
                }
            }
            Probe::WgmmaFp8Random => wgmma_ss(&mut m, module, "wgmma_fp8_probe", &inputs[..8192], &inputs[8192..], e4m3_sw128_map)?,
            Probe::WgmmaBf16Random => wgmma_ss(&mut m, module, "wgmma_probe", &inputs[..8192], &inputs[8192..], bf16_sw128_map)?,
        };
        let mut dump = inputs.to_vec();
        dump.extend(words.iter().flat_map(|w| w.to_le_bytes()));
        Ok((dump, counters))
    }
}

/// ws_gemm with K = 256 (4 k-tiles over the 2-stage ring, 32 KiB of dynamic shared memory): the consumer warpgroup's
/// accumulators. `early_release` plants the bug of releasing a stage before the wait_group that retires its wgmmas.
pub fn ws_gemm(m: &mut Machine, module: &Module, early_release: bool) -> Result<(Vec<u32>, Counters), SimError> {
    let k = 256;
    let a = upload(m, &bf16_matrix(64, k, a_val));
    let b = upload(m, &bf16_matrix(64, k, |n, kk| b_val(kk, n)));
    let map = |g| encode_tiled(DataType::Bfloat16 as u32, 2, g, &[k as u64, 64], &[2 * k as u64], &[64, 64], &[1, 1], 0, Swizzle::B128 as u32, 0, 0);
    let (ma, mb) = (map(a)?, map(b)?);
    launch_for_accumulators(m, module, "ws_gemm", [256, 1, 1], 32768, |out| {
        let mut params = two_maps_then_pointer(&ma, &mb, out);
        params.extend_from_slice(&((k / 64) as i32).to_le_bytes());
        params.extend_from_slice(&(early_release as i32).to_le_bytes());
        params
    })
}

/// `A[m][k]` of the small-integer probes.
pub fn a_val(m: usize, k: usize) -> f32 {
    ((m * 7 + k * 3) % 9) as f32 - 4.0
}

/// `B[k][n]` of the small-integer probes.
pub fn b_val(k: usize, n: usize) -> f32 {
    ((k * 5 + n * 11) % 7) as f32 - 3.0
}

/// A row-major `rows x cols` bf16 matrix of `f(row, col)`, as little-endian bytes.
pub fn bf16_matrix(rows: usize, cols: usize, f: impl Fn(usize, usize) -> f32) -> Vec<u8> {
    (0..rows * cols).flat_map(|i| (float::encode(f(i / cols, i % cols) as f64, float::BF16, Rnd::Rn, false) as u16).to_le_bytes()).collect()
}

/// A row-major `rows x cols` matrix of e4m3 codes of `f(row, col)`.
pub fn e4m3_matrix(rows: usize, cols: usize, f: impl Fn(usize, usize) -> f32) -> Vec<u8> {
    (0..rows * cols).map(|i| float::encode(f(i / cols, i % cols) as f64, float::E4M3, Rnd::Rn, false) as u8).collect()
}

/// The GPU program's xorshift32 (13, 17, 5).
struct Xorshift32(u32);

impl Xorshift32 {
    fn next_u32(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }
}

/// One TMA probe launch: a `box0 x rows` box of u32 at `coords` of a `40 x height` tensor under `swizzle`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TmaCase {
    pub swizzle: u32,
    pub box0: u32,
    pub rows: u32,
    pub height: u64,
    pub coords: [i32; 2],
}

impl TmaCase {
    /// The box's bytes: what the probe expects on its barrier and copies out.
    pub fn bytes(&self) -> u32 {
        self.box0 * self.rows * 4
    }
}

/// The launches of a TMA probe, in the GPU program's order.
pub fn tma_cases(probe: Probe) -> Vec<TmaCase> {
    let mut cases = Vec::new();
    if probe == Probe::Tma {
        for swizzle in 0..4u32 {
            let box0 = if swizzle == 0 { 32 } else { 8 << (swizzle - 1) };
            for coords in [[0, 0], [24, 6], [-4, -3], [36, 9]] {
                cases.push(TmaCase { swizzle, box0, rows: 8, height: 10, coords });
            }
        }
    } else if probe == Probe::TmaNarrow {
        // Box rows of 16 bytes up to half the span; 32 rows (1-2 KiB) so the XOR's whole 8-line period is covered.
        for (swizzle, box0) in [(1, 4), (2, 4), (2, 8), (3, 4), (3, 8), (3, 16)] {
            for coords in [[0, 0], [24, 40]] {
                cases.push(TmaCase { swizzle, box0, rows: 32, height: 64, coords });
            }
        }
    }
    cases
}

/// tma_probe (256 threads) on a `40 x height` tensor holding word k = k + 1: the raw shared words after the load.
fn tma_probe(m: &mut Machine, module: &Module, case: &TmaCase) -> Result<(Vec<u32>, Counters), SimError> {
    let words = 40 * case.height as u32;
    let tensor = upload(m, &(1..=words).flat_map(|w| w.to_le_bytes()).collect::<Vec<_>>());
    let out = poisoned(m, 4096);
    let map = encode_tiled(
        DataType::Uint32 as u32,
        2,
        tensor,
        &[40, case.height],
        &[160],
        &[case.box0, case.rows],
        &[1, 1],
        Interleave::None as u32,
        case.swizzle,
        L2Promotion::None as u32,
        OobFill::None as u32,
    )?;
    let mut params = map.to_vec();
    params.extend_from_slice(&out.to_le_bytes());
    params.extend_from_slice(&case.coords[0].to_le_bytes());
    params.extend_from_slice(&case.coords[1].to_le_bytes());
    params.extend_from_slice(&case.bytes().to_le_bytes());
    let counters = m
        .launch(module, "tma_probe", [1, 1, 1], [256, 1, 1], 0, &params)
        .map_err(|e| SimError::host(format!("tma_probe, swizzle {} box {} x {} at {:?}: {e}", case.swizzle, case.box0, case.rows, case.coords)))?;
    Ok((download_words(m, out, case.bytes() as usize / 4)?, counters))
}

/// The 128-byte-swizzled map of a 64 x 64 bf16 operand.
fn bf16_sw128_map(g: u64) -> Result<[u8; 128], SimError> {
    encode_tiled(DataType::Bfloat16 as u32, 2, g, &[64, 64], &[128], &[64, 64], &[1, 1], 0, Swizzle::B128 as u32, 0, 0)
}

/// The 128-byte-swizzled map of a 64 x 128 e4m3 operand (loaded as bytes).
fn e4m3_sw128_map(g: u64) -> Result<[u8; 128], SimError> {
    encode_tiled(DataType::Uint8 as u32, 2, g, &[128, 64], &[128], &[128, 64], &[1, 1], 0, Swizzle::B128 as u32, 0, 0)
}

/// A probe with both operands loaded by TMA (`kernel(ma, mb, out)`), A and B as bytes, one warpgroup.
fn wgmma_ss(
    m: &mut Machine,
    module: &Module,
    kernel: &str,
    a: &[u8],
    b: &[u8],
    map: fn(u64) -> Result<[u8; 128], SimError>,
) -> Result<(Vec<u32>, Counters), SimError> {
    let (ga, gb) = (upload(m, a), upload(m, b));
    let (ma, mb) = (map(ga)?, map(gb)?);
    launch_for_accumulators(m, module, kernel, [128, 1, 1], 0, |out| two_maps_then_pointer(&ma, &mb, out))
}

/// Launches one block of `kernel` with the parameters `params(out)` builds around a poisoned output of one warpgroup's
/// accumulators (128 threads x 32 words); returns those words and the launch's counters.
fn launch_for_accumulators(
    m: &mut Machine,
    module: &Module,
    kernel: &str,
    block: [u32; 3],
    dynamic_shared: u32,
    params: impl FnOnce(u64) -> Vec<u8>,
) -> Result<(Vec<u32>, Counters), SimError> {
    let out = poisoned(m, 128 * 32 * 4);
    let counters =
        m.launch(module, kernel, [1, 1, 1], block, dynamic_shared, &params(out)).map_err(|e| SimError { message: format!("{kernel}: {}", e.message), ..e })?;
    Ok((download_words(m, out, 128 * 32)?, counters))
}

/// `(map, map, pointer)` parameters.
fn two_maps_then_pointer(ma: &[u8; 128], mb: &[u8; 128], out: u64) -> Vec<u8> {
    let mut params = ma.to_vec();
    params.extend_from_slice(mb);
    params.extend_from_slice(&out.to_le_bytes());
    params
}

/// `(pointer, map at offset 128, pointer)` parameters.
fn pointer_then_map(a: u64, map: &[u8; 128], out: u64) -> Vec<u8> {
    let mut params = a.to_le_bytes().to_vec();
    params.resize(128, 0);
    params.extend_from_slice(map);
    params.extend_from_slice(&out.to_le_bytes());
    params
}

fn upload(m: &mut Machine, bytes: &[u8]) -> u64 {
    let a = m.alloc(bytes.len().max(1));
    m.write(a, bytes).expect("a fresh allocation holds its bytes");
    a
}

/// An output buffer poisoned with 0xff bytes.
fn poisoned(m: &mut Machine, bytes: usize) -> u64 {
    let a = m.alloc(bytes);
    m.memset(a, 0xff, bytes).expect("a fresh allocation holds its bytes");
    a
}

fn download_words(m: &Machine, addr: u64, n: usize) -> Result<Vec<u32>, SimError> {
    let mut bytes = vec![0u8; 4 * n];
    m.read(addr, &mut bytes)?;
    Ok(words(&bytes))
}

/// Little-endian u32 words of a dump.
pub fn words(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Writes every probe's dump into `dir`, computed on the interpreter under `arith` from the GPU program's inputs.
pub fn simulate(module: &Module, arith: TensorArith, dir: &Path) -> Result<(), SimError> {
    std::fs::create_dir_all(dir).map_err(|e| SimError::host(format!("{}: {e}", dir.display())))?;
    for probe in Probe::ALL {
        let (dump, _) = probe.run(module, arith, &probe.inputs())?;
        let path = dir.join(probe.file());
        std::fs::write(&path, dump).map_err(|e| SimError::host(format!("{}: {e}", path.display())))?;
    }
    Ok(())
}

/// The name of a `TensorArith` model in verdicts.
pub fn model_name(model: TensorArith) -> &'static str {
    match model {
        TensorArith::ExactRoundOnce => "ExactRoundOnce",
        TensorArith::HopperTruncated => "HopperTruncated",
    }
}

/// One model's run compared with a dump.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Comparison {
    pub model: TensorArith,
    /// Result words equal bit for bit.
    pub equal: usize,
    /// The first word that differs: (index, the dump's word, the model's word).
    pub first_difference: Option<(usize, u32, u32)>,
}

/// How one dump compares with the interpreter.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub probe: Probe,
    /// Result words compared (the dump's inputs excluded).
    pub words: usize,
    /// One comparison per model run, the interpreter's model first.
    pub models: Vec<Comparison>,
    /// Why there is nothing to compare (no dump, wrong size), or the interpreter's error on the dump's inputs.
    pub problem: Option<String>,
}

/// The outcome of a verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every word equals the interpreter's model.
    Matches,
    /// The dump differs from the interpreter's model (it may match the other model).
    Differs,
    /// Nothing could be compared.
    NotCompared,
}

impl Verdict {
    pub fn outcome(&self) -> Outcome {
        match self.models.first() {
            _ if self.problem.is_some() => Outcome::NotCompared,
            Some(c) if c.equal == self.words => Outcome::Matches,
            Some(_) => Outcome::Differs,
            None => Outcome::NotCompared,
        }
    }

    /// `HopperTruncated 4096/4096, ExactRoundOnce 1234/4096` (the words equal bit for bit per model).
    pub fn counts(&self) -> String {
        if !self.probe.is_arithmetic() {
            return self.models.iter().map(|c| format!("{}/{}", c.equal, self.words)).collect::<Vec<_>>().join(", ");
        }
        self.models.iter().map(|c| format!("{} {}/{}", model_name(c.model), c.equal, self.words)).collect::<Vec<_>>().join(", ")
    }

    /// The verdict in words: "matches the interpreter's model (...)", or how it differs.
    pub fn conclusion(&self) -> String {
        let model = self.probe.model();
        match self.outcome() {
            Outcome::NotCompared => format!("NOT SETTLED: {}", self.problem.as_deref().unwrap_or("nothing compared")),
            Outcome::Matches => format!("matches the interpreter's model ({model})"),
            Outcome::Differs => {
                let first = |c: &Comparison| {
                    c.first_difference.map(|(i, got, want)| format!("first difference at word {i}: dump {got:#010x}, model {want:#010x}")).unwrap_or_default()
                };
                let other = self.models.iter().skip(1).find(|c| c.equal == self.words);
                match other {
                    Some(c) => format!(
                        "DIFFERS from the interpreter's model ({model}); matches TensorArith::{} bit for bit ({})",
                        model_name(c.model),
                        first(&self.models[0])
                    ),
                    None => format!("DIFFERS from the interpreter's model ({model}) and from every other model ({})", first(&self.models[0])),
                }
            }
        }
    }

    /// The verdict line: `<dump>: <question>: <counts> bit for bit: <conclusion>`.
    pub fn line(&self) -> String {
        let counts = if self.outcome() == Outcome::NotCompared { String::new() } else { format!("{} bit for bit: ", self.counts()) };
        format!("{}: {}: {counts}{}", self.probe.file(), self.probe.question(), self.conclusion())
    }
}

/// Compares every probe's dump in `dir` with the interpreter (see the module comment). A missing or malformed dump,
/// or an interpreter error on its inputs, is a verdict that settles nothing, not an error.
pub fn settle(module: &Module, dir: &Path) -> Vec<Verdict> {
    Probe::ALL.iter().map(|&probe| settle_one(module, probe, dir)).collect()
}

fn settle_one(module: &Module, probe: Probe, dir: &Path) -> Verdict {
    let mut verdict = Verdict { probe, words: 0, models: Vec::new(), problem: None };
    let path = dir.join(probe.file());
    let dump = match std::fs::read(&path) {
        Ok(dump) => dump,
        Err(e) => {
            verdict.problem = Some(format!("no dump {} ({e})", path.display()));
            return verdict;
        }
    };
    let models: &[TensorArith] =
        if probe.is_arithmetic() { &[TensorArith::HopperTruncated, TensorArith::ExactRoundOnce] } else { &[TensorArith::HopperTruncated] };
    let inputs = &dump[..probe.input_bytes().min(dump.len())];
    for &model in models {
        let want = match probe.run(module, model, inputs) {
            Ok((want, _)) => want,
            Err(e) => {
                verdict.problem = Some(format!("the interpreter on the dump's inputs: {e}"));
                return verdict;
            }
        };
        if want.len() != dump.len() {
            verdict.problem = Some(format!("{}: {} bytes, the probe writes {}", path.display(), dump.len(), want.len()));
            return verdict;
        }
        let (got, want) = (words(&dump[inputs.len()..]), words(&want[inputs.len()..]));
        verdict.words = got.len();
        let equal = got.iter().zip(&want).filter(|(g, w)| g == w).count();
        let first_difference = got.iter().zip(&want).position(|(g, w)| g != w).map(|i| (i, got[i], want[i]));
        verdict.models.push(Comparison { model, equal, first_difference });
    }
    verdict
}
