//! The Hopper kernels of the GEMMs' prefill tile (`cuda/moe_gemm_wgmma.cu`: wgmma with the weights in registers,
//! mbarrier pipeline, one producer warp and two consumer warpgroups) for bf16, int4 and nvfp4 weights, and the switch
//! that picks them over the mma.sync kernels (`moe_gemm_{bf16,int4,nvfp4}_tiled` in `cuda/moe_gemm.cu`). Each pair
//! takes the same parameters and computes the same rows, so [`super::moe`]'s launcher only swaps the kernel, the block
//! size and the shared memory; decode tiles, the fp8 formats and the W8A8 kernels keep mma.sync.

use std::cell::Cell;

use super::modules::MOE_GEMM_WGMMA;
use crate::device::{Dim3, Kernel};
use crate::error::{Error, Result};
use crate::quant::repack::tile_bytes;
use crate::quant::WeightFormat;

/// The environment variable that sets the process default of [`PrefillGemm`]: `wgmma` (or unset) or `mma_sync`.
pub const PREFILL_GEMM_ENV: &str = "SMALL4_PREFILL_GEMM";

/// Which kernel runs the prefill tile (128 output features x 64 rows) of the grouped expert GEMMs and of the dense
/// GEMM (more than 32 rows) with bf16, int4 or nvfp4 weights (the 4-bit kernels dequantise to bf16 in registers, as
/// the mma.sync ones do, and issue the same bf16 wgmmas).
///
/// The default is [`PrefillGemm::Wgmma`]; the environment's `SMALL4_PREFILL_GEMM=mma_sync` ([`PREFILL_GEMM_ENV`])
/// selects the mma.sync kernel for the process, and [`PrefillGemm::run`] for one closure on the calling thread.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::dense;
/// use small4::kernels::moe::DeviceWeights;
/// use small4::kernels::moe_wgmma::PrefillGemm;
/// use small4::quant::{repack::repack_linear, QuantizedMatrix, WeightFormat};
///
/// let device = simulator();
/// // W [2, 64] with y0 = x0 and y1 = 2 x1; 40 rows take the prefill tile.
/// let mut w = vec![0.0f32; 2 * 64];
/// (w[0], w[64 + 1]) = (1.0, 2.0);
/// let w = DeviceWeights::upload(&device, &repack_linear(&[(&QuantizedMatrix::quantize(WeightFormat::Bf16, &w, 2, 64)?).into()])?)?;
/// let x: Vec<bf16> = (0..40 * 64).map(|i| bf16::from_f32(if i % 64 < 2 { (i / 64) as f32 } else { 0.0 })).collect();
/// let x = DeviceBuffer::from_slice(&device, &x)?;
/// let run = |kernel: PrefillGemm| -> small4::Result<Vec<bf16>> {
///     let y = DeviceBuffer::<bf16>::alloc(&device, 40 * 2)?;
///     kernel.run(|| dense::linear(&w, x.view([40, 64])?, y.view([40, 2])?))?;
///     y.to_vec()
/// };
/// let (wgmma, mma_sync) = (run(PrefillGemm::Wgmma)?, run(PrefillGemm::MmaSync)?);
/// assert_eq!(wgmma, mma_sync);
/// assert_eq!((wgmma[2 * 39].to_f32(), wgmma[2 * 39 + 1].to_f32()), (39.0, 78.0));
/// assert_eq!(device.last_launch_counters().unwrap().kernel, "moe_gemm_bf16_tiled");
/// // The choice holds inside `run` only, on this thread:
/// assert_eq!(PrefillGemm::MmaSync.run(PrefillGemm::current)?, PrefillGemm::MmaSync);
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillGemm {
    /// `moe_gemm_{bf16,int4,nvfp4}_wgmma`: wgmma m64n64k16 with the weights as the register operand,
    /// warp-specialised.
    Wgmma,
    /// `moe_gemm_{bf16,int4,nvfp4}_tiled`: mma.sync m16n8k16 with a cp.async ring.
    MmaSync,
}

thread_local! {
    /// [`PrefillGemm::run`]'s choice for the calling thread, over the environment's.
    static OVERRIDE: Cell<Option<PrefillGemm>> = const { Cell::new(None) };
}

impl PrefillGemm {
    /// The choice in force on this thread: [`PrefillGemm::run`]'s, else the environment's (`SMALL4_PREFILL_GEMM`),
    /// else [`PrefillGemm::Wgmma`]. `Error::InvalidArgument` for an environment value other than `wgmma` and
    /// `mma_sync`.
    pub fn current() -> Result<Self> {
        if let Some(choice) = OVERRIDE.get() {
            return Ok(choice);
        }
        match std::env::var(PREFILL_GEMM_ENV) {
            Err(_) => Ok(Self::Wgmma),
            Ok(v) if v == "wgmma" => Ok(Self::Wgmma),
            Ok(v) if v == "mma_sync" => Ok(Self::MmaSync),
            Ok(v) => Err(Error::InvalidArgument(format!("{PREFILL_GEMM_ENV}={v}: expected wgmma or mma_sync"))),
        }
    }

    /// Runs `f` with this choice on the calling thread (launches are issued on the thread that calls the wrapper),
    /// restoring the previous choice afterwards, also when `f` panics.
    pub fn run<R>(self, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<PrefillGemm>);
        impl Drop for Restore {
            fn drop(&mut self) {
                OVERRIDE.set(self.0);
            }
        }
        let _restore = Restore(OVERRIDE.replace(Some(self)));
        f()
    }
}

/// Threads per block: two consumer warpgroups and the producer warp.
const THREADS: u32 = 9 * 32;
/// One stage's gathered activation rows: 64 slots of 64 bf16.
const X_STAGE_BYTES: u32 = 64 * 64 * 2;

/// Dynamic shared memory (`Ring<F>::kSharedBytes` in moe_gemm_wgmma.cu) for `format` weights: as many stages of the
/// 8 warps' weight tiles (16 x 64 weights each: 2 KiB bf16, 512 bytes 4-bit) and the activation rows as fit in
/// 96 KiB, at most 8 (bf16 4, 4-bit 8), two mbarriers per stage, the 64 slots' pairs.
fn shared_bytes(format: WeightFormat) -> u32 {
    let stage = 8 * tile_bytes(format) as u32 + X_STAGE_BYTES;
    let stages = (96 * 1024 / stage).min(8);
    stages * stage + 2 * stages * 8 + 64 * 4
}

/// The wgmma kernel, its block and its shared memory for a prefill-tile launch of `format` weights (with bf16 inputs
/// unless `e4m3_input`), when it applies and is chosen; None: the mma.sync kernel runs.
pub(crate) fn prefill_kernel(format: WeightFormat, e4m3_input: bool) -> Result<Option<(Kernel, Dim3, u32)>> {
    let entry = match format {
        WeightFormat::Bf16 => "moe_gemm_bf16_wgmma",
        WeightFormat::Int4 { .. } => "moe_gemm_int4_wgmma",
        WeightFormat::Nvfp4 => "moe_gemm_nvfp4_wgmma",
        WeightFormat::Fp8PerTensor | WeightFormat::Fp8Block128 => return Ok(None),
    };
    if e4m3_input || PrefillGemm::current()? != PrefillGemm::Wgmma {
        return Ok(None);
    }
    Ok(Some((Kernel { module: MOE_GEMM_WGMMA, entry }, Dim3::x(THREADS), shared_bytes(format))))
}
