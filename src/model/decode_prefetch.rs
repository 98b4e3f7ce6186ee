//! The decode step's cross-kernel L2 prefetch plan ([`crate::kernels::prefetch`]): which latency-bound launch of a
//! layer pulls which later GEMM's weights into L2.
//!
//! A layer's decode launches, in order: latent projection, wq_b (DRAM-bound, 11 and 8.4 MB in bf16), W_UK absorption,
//! MLA, W_UV absorption (latency-bound: 1-3 MB each, HBM mostly idle), wo (DRAM-bound, 33.5 MB bf16), router
//! (latency-bound, 1 MB), the experts' up and down projections (DRAM-bound). So:
//! - the W_UK absorption, the attention and the W_UV absorption take consecutive k-block runs of wo
//!   ([`ABSORPTION_BYTES`], [`ATTENTION_BYTES`], [`ABSORPTION_BYTES`]);
//! - the router takes the shared expert's gate/up ([`ROUTER_BYTES`], none at present), the one expert known before
//!   routing (it runs in the up projection's launch, beside the routed experts).
//!
//! Budgets: what each window can stream without outlasting itself. The timing model (interpreter L2 residency,
//! H100 SXM) prices a prefetch as DRAM bytes of the launch that issues it, so a window's share costs nothing while
//! its DRAM time stays under the launch's own critical path and lengthens the launch past that. From its figures
//! for these launches as graph nodes with programmatic launch (docs/perf.md "Cross-kernel L2 prefetch"): each
//! absorption launch is a ~1.2 µs chain reading 1-2 MB, room for ~2 MB more at 2.96 TB/s; MLA at 4k context ~4 µs
//! reading 2.6 MB, room for ~8 MB. The first budgets tried (4, 12, 4 and 8 MiB for the router) lengthened the
//! absorption launches and the router by 2 and 1 µs a layer, as much as wo gained; the router's 4 MiB of the shared
//! expert cost it 0.9 µs a layer and the experts' launch gained nothing in the model (its time is not set by those
//! bytes), so the router takes none (its kernel still can: tests/l2_prefetch.rs).
//! PREDICTED sizes, to be tuned on a GPU (`small4 bench --no-l2-prefetch` gives the step without it).
//!
//! The engine plans it for steps of at most [`crate::kernels::gemm::DECODE_MAX_ROWS`] tokens, the decode kernel's
//! rows (the absorption GEMMs run the decode kernel up to that many rows; larger steps are prefill-sized and not
//! latency-bound).

use crate::error::Result;
use crate::kernels::gemm::DeviceWeights;
use crate::kernels::prefetch::L2Prefetch;

/// Each absorption launch's share of wo.
pub const ABSORPTION_BYTES: u64 = 2 << 20;
/// The attention launch's share of wo.
pub const ATTENTION_BYTES: u64 = 8 << 20;
/// The router's share of the shared expert's gate/up: none (the module's comment says why).
pub const ROUTER_BYTES: u64 = 0;

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
        assert_eq!(plan.absorb_query.bytes(), 4 * k_block);
        assert_eq!(plan.attention.bytes(), 16 * k_block);
        assert_eq!(plan.absorb_output.bytes(), 4 * k_block);
        assert_eq!(plan.router.bytes(), 0);
        assert_eq!(plan.bytes(), 24 * k_block);
        // The runs are consecutive: their union is wo's k blocks 0..24.
        assert_eq!(plan.bytes(), L2Prefetch::k_blocks(&wo, 0..24).unwrap().bytes());
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
    fn the_router_takes_none_of_the_shared_expert() {
        // nvfp4 gate/up of one expert [2 x 256, 1024]; the plan gives the router nothing (ROUTER_BYTES 0), whatever
        // the shared expert.
        let (hidden, dim) = (256, 1024);
        let gate = QuantizedMatrix::quantize(WeightFormat::Nvfp4, &vec![0.5; hidden * dim], hidden, dim).unwrap();
        let packed = repack_gate_up(&[((&gate).into(), (&gate).into())]).unwrap();
        let shared = DeviceWeights::upload(&simulator(), &packed).unwrap();
        let wo = weights(WeightFormat::Bf16, 128, 256);
        let plan = LayerPrefetch::plan(&wo, Some(&shared)).unwrap();
        assert_eq!(plan.router.bytes(), 0);
        assert_eq!(plan.bytes(), wo.data.bytes() as u64);
    }

    #[test]
    fn stacked_matrices_are_refused() {
        let w = QuantizedMatrix::quantize(WeightFormat::Bf16, &vec![0.5; 128 * 64], 128, 64).unwrap();
        let stacked = DeviceWeights::upload(&simulator(), &repack_linear(&[(&w).into(), (&w).into()]).unwrap()).unwrap();
        assert!(matches!(LayerPrefetch::plan(&stacked, None), Err(crate::Error::InvalidArgument(_))));
    }
}
