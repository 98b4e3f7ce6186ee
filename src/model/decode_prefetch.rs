//! The decode step's cross-kernel L2 prefetch plan ([`crate::kernels::prefetch`]): which latency-bound launch of a
//! layer pulls which later GEMM's weights into L2.
//!
//! A layer's decode launches, in order: latent projection, wq_b (DRAM-bound, 11 and 8.4 MB in bf16), W_UK absorption,
//! MLA, W_UV absorption (latency-bound: 1-3 MB each, HBM mostly idle), wo (DRAM-bound, 33.5 MB bf16), router
//! (latency-bound, 1 MB), the experts' up and down projections (DRAM-bound). So:
//! - the W_UK absorption, the attention and the W_UV absorption take consecutive k-block runs of wo
//!   ([`ABSORPTION_BYTES`], [`ATTENTION_BYTES`], [`ABSORPTION_BYTES`]);
//! - the router takes the shared expert's gate/up ([`ROUTER_BYTES`]), the one expert known before routing (it runs
//!   in the up projection's launch, beside the routed experts).
//!
//! Budgets: what each window can stream without outlasting itself, from the timing model's predicted times of those
//! launches as graph nodes with programmatic launch on an H100 SXM (docs/perf.md "The decode step as a replayed graph":
//! absorption ~1.7 µs each, MLA 3.7 µs at a short context to ~4.7 µs at 4k, routing 2.5 µs) at the model's
//! achievable 2.96 TB/s: ~5, 11-14 and ~7.4 MB. PREDICTED sizes, to be tuned on a GPU (`small4 bench --no-l2-prefetch`
//! gives the step without it).

use crate::error::Result;
use crate::kernels::moe::DeviceWeights;
use crate::kernels::prefetch::L2Prefetch;

/// Each absorption launch's share of wo.
pub const ABSORPTION_BYTES: u64 = 4 << 20;
/// The attention launch's share of wo.
pub const ATTENTION_BYTES: u64 = 12 << 20;
/// The router's share of the shared expert's gate/up.
pub const ROUTER_BYTES: u64 = 8 << 20;
/// Steps of at most this many tokens prefetch: the decode kernels' rows (the absorption GEMMs run the decode kernel
/// up to 8 rows; larger steps are prefill-sized and not latency-bound).
pub const MAX_TOKENS: usize = 8;

/// What one layer's latency-bound decode launches prefetch, in launch order.
#[derive(Clone, Copy, Debug, Default)]
pub struct LayerPrefetch {
    /// The W_UK absorption launch: wo's first k blocks.
    pub absorb_query: L2Prefetch,
    /// The attention launch: wo's next k blocks.
    pub attention: L2Prefetch,
    /// The W_UV absorption launch: wo's next k blocks.
    pub absorb_output: L2Prefetch,
    /// The router: the shared expert's gate/up.
    pub router: L2Prefetch,
}

impl LayerPrefetch {
    /// The plan for a layer with output projection `wo` and, if it has one, the shared expert's gate/up weights.
    /// `Error::InvalidArgument` when either holds more than one matrix.
    pub fn plan(wo: &DeviceWeights, shared_gate_up: Option<&DeviceWeights>) -> Result<Self> {
        let [absorb_query, attention, absorb_output] = L2Prefetch::consecutive(wo, [ABSORPTION_BYTES, ATTENTION_BYTES, ABSORPTION_BYTES])?;
        let router = match shared_gate_up {
            Some(w) => L2Prefetch::consecutive(w, [ROUTER_BYTES])?[0],
            None => L2Prefetch::NONE,
        };
        Ok(LayerPrefetch { absorb_query, attention, absorb_output, router })
    }

    /// Bytes the layer's launches prefetch.
    pub fn bytes(&self) -> u64 {
        [self.absorb_query, self.attention, self.absorb_output, self.router].iter().map(L2Prefetch::bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::simulator;
    use crate::kernels::prefetch::tests::weights;
    use crate::quant::repack::{repack_gate_up, repack_linear};
    use crate::quant::{QuantizedMatrix, WeightFormat};

    #[test]
    fn wo_is_handed_out_in_consecutive_k_blocks_within_the_budgets() {
        // wo [4096, 4096] bf16: 256 tiles x 2 KiB = 512 KiB a k block of 64.
        let wo = weights(WeightFormat::Bf16, 4096, 4096);
        let plan = LayerPrefetch::plan(&wo, None).unwrap();
        let k_block = 512 * 1024;
        assert_eq!(plan.absorb_query.bytes(), 8 * k_block);
        assert_eq!(plan.attention.bytes(), 24 * k_block);
        assert_eq!(plan.absorb_output.bytes(), 8 * k_block);
        assert_eq!(plan.router.bytes(), 0);
        assert_eq!(plan.bytes(), 40 * k_block);
        // The runs are consecutive: their union is wo's k blocks 0..40.
        assert_eq!(plan.bytes(), L2Prefetch::k_blocks(&wo, 0..40).unwrap().bytes());
    }

    #[test]
    fn a_small_wo_is_prefetched_whole_and_the_later_launches_get_nothing() {
        // [128, 256] bf16: 4 k blocks of 16 KiB; the first budget covers it all.
        let wo = weights(WeightFormat::Bf16, 128, 256);
        let plan = LayerPrefetch::plan(&wo, None).unwrap();
        assert_eq!(plan.absorb_query.bytes(), wo.data.bytes() as u64);
        assert_eq!((plan.attention.bytes(), plan.absorb_output.bytes()), (0, 0));
    }

    #[test]
    fn the_router_takes_the_shared_experts_gate_up_with_its_scales() {
        // nvfp4 gate/up of one expert [2 x 256, 1024]: weights 512 B and scales 64 B a tile and k block.
        let (hidden, dim) = (256, 1024);
        let gate = QuantizedMatrix::quantize(WeightFormat::Nvfp4, &vec![0.5; hidden * dim], hidden, dim).unwrap();
        let packed = repack_gate_up(&[((&gate).into(), (&gate).into())]).unwrap();
        let shared = DeviceWeights::upload(&simulator(), &packed).unwrap();
        let wo = weights(WeightFormat::Bf16, 128, 256);
        let plan = LayerPrefetch::plan(&wo, Some(&shared)).unwrap();
        let scales = shared.fp4_scales.as_ref().unwrap().bytes() as u64;
        assert_eq!(plan.router.bytes(), shared.data.bytes() as u64 + scales);
    }

    #[test]
    fn stacked_matrices_are_refused() {
        let w = QuantizedMatrix::quantize(WeightFormat::Bf16, &vec![0.5; 128 * 64], 128, 64).unwrap();
        let stacked = DeviceWeights::upload(&simulator(), &repack_linear(&[(&w).into(), (&w).into()]).unwrap()).unwrap();
        assert!(matches!(LayerPrefetch::plan(&stacked, None), Err(crate::Error::InvalidArgument(_))));
    }
}
