//! The engine's prefill on the wgmma GEMMs (`cuda/moe_gemm_wgmma.cu`): a prompt long enough that the model's dense
//! GEMMs (more than 32 rows) and its routed experts (tokens x top-k at least 32 per expert: the aligner's 64-slot
//! tiles) take the prefill tile, against the CPU reference (tests/engine.rs's logit rule) and, on the interpreter, bit
//! for bit against the same prefill on the mma.sync kernels; with bf16 experts and with nvfp4 experts (the 4-bit
//! wgmma kernel; attention stays bf16). And the prefill's MLA attention on its wgmma kernel
//! (`cuda/mla_attention_wgmma.cu`) against the reference and, bit for bit, against its mma.sync kernel.

mod common;

use std::sync::Arc;

use small4::device::sim::SimBackend;
use small4::device::Device;
use small4::kernels::attention::MlaPrefillKernel;
use small4::kernels::moe_wgmma::PrefillGemm;
use small4::model::checkpoint::{Checkpoint, Layout};
use small4::model::config::ModelConfig;
use small4::model::engine::{DeviceModel, Engine, EngineOptions, Shard};
use small4::model::synthetic::{load_reference_weights, write_checkpoint};
use small4::quant::WeightFormat;
use small4::reference::model::{ForwardOptions, ReferenceModel, ReferenceWeights};

/// tests/engine.rs: |engine - reference| <= 0.08 + 0.03 |reference| per logit.
const LOGIT_ABS: f32 = 0.08;
const LOGIT_REL: f32 = 0.03;

/// One layer of the tiny preset (16 experts, top-4) in bf16: a 136-token prompt gives 544 routed pairs, so the
/// grouping uses 64-slot tiles (34 pairs per expert: the 64-slot kernels), and every dense GEMM has 136 rows (the wide
/// kernels: one block of 192 rows). The prefill launches the wgmma kernels for both kinds of GEMM (grouped: activation
/// rows gathered; dense: TMA tile loads, the third 64-slot tile's rows 136..191 zero-filled); its logits equal the mma.sync prefill's bit for bit at every position, and the reference's at every
/// position not on a router near-tie. (The GEMMs with a row finisher or the query RoPE epilogue included.)
#[test]
fn one_layer_prefill_on_wgmma_matches_reference_and_mma_sync() {
    one_layer_prefill(WeightFormat::Bf16);
}

/// [`one_layer_prefill_on_wgmma_matches_reference_and_mma_sync`] with nvfp4 experts: the routed expert GEMMs run
/// `moe_gemm_nvfp4_wgmma` and the shared expert's (dense) `moe_gemm_nvfp4_wide_wgmma_dense` (its per-row global
/// divisor in the epilogue), the attention's bf16 GEMMs `moe_gemm_bf16_wide_wgmma_dense`.
#[test]
fn one_layer_nvfp4_prefill_on_wgmma_matches_reference_and_mma_sync() {
    one_layer_prefill(WeightFormat::Nvfp4);
}

fn one_layer_prefill(format: WeightFormat) {
    let config = ModelConfig { n_layers: 1, ..ModelConfig::tiny() };
    let tokens: Vec<u32> = (0..136u32).map(|i| (i * 389 + 100) % config.vocab as u32).collect();
    assert_eq!(small4::kernels::moe::moe_tile_m(tokens.len(), config.experts_per_token, config.experts), 64, "prefill tiles");
    assert_eq!(config.shared_experts, 1, "a shared expert: dense GEMMs in the experts' format");

    let model = OneLayerModel::new(&config, format, 5, &tokens);
    let prefill = |choice: PrefillGemm| model.engine_prefill(&tokens, 16, |forward| choice.run(forward));
    let (wgmma, wgmma_kernels) = prefill(PrefillGemm::Wgmma);
    let count = |kernels: &[String], suffix: &str| kernels.iter().filter(|k| k.starts_with("moe_gemm_") && k.ends_with(suffix)).count();
    let format_name = if format == WeightFormat::Nvfp4 { "nvfp4" } else { "bf16" };
    let expert_kernel = format!("moe_gemm_{format_name}_wgmma");
    let launches_of = |name: &str| wgmma_kernels.iter().filter(|k| *k == name).count();
    // Routed up and down (grouped: the gather kernels), and the dense GEMMs (the TMA kernels; those that finish their
    // rows or rotate the query too).
    let (grouped, dense) = (count(&wgmma_kernels, "_wgmma"), count(&wgmma_kernels, "_wgmma_dense"));
    assert!(grouped >= 2 && dense >= 1 && grouped + dense >= 8, "prefill launches: {wgmma_kernels:?}");
    assert!(launches_of(&expert_kernel) >= 2, "the experts' up and down on {expert_kernel}: {wgmma_kernels:?}");
    // The shared expert: a dense up and down of 136 rows in the experts' format, on TMA, 192 rows a block.
    let shared_kernel = format!("moe_gemm_{format_name}_wide_wgmma_dense");
    assert!(launches_of(&shared_kernel) >= 2, "the shared expert on {shared_kernel}: {wgmma_kernels:?}");
    assert_eq!(count(&wgmma_kernels, "_tiled"), 0, "prefill launches: {wgmma_kernels:?}");

    let (mma_sync, mma_kernels) = prefill(PrefillGemm::MmaSync);
    assert_eq!(count(&mma_kernels, "_wgmma") + count(&mma_kernels, "_wgmma_dense"), 0, "the switch keeps wgmma out");
    // Only the GEMMs follow the GEMM switch: the attention runs the kernel `MlaPrefillKernel` picks in both prefills.
    let renamed: Vec<String> = wgmma_kernels
        .iter()
        .map(|k| if k.starts_with("moe_gemm_") { k.replace("_wide_", "_").replace("_wgmma_dense", "_tiled").replace("_wgmma", "_tiled") } else { k.clone() })
        .collect();
    assert_eq!(mma_kernels, renamed, "one kernel for the other, launch for launch");
    let differ = wgmma.iter().zip(&mma_sync).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(differ, 0, "{differ} of {} logits differ between the wgmma and mma.sync prefills", wgmma.len());
    // Against the reference, the positions whose router is not within the bf16 noise of a tie (tests/engine.rs: two
    // bf16 chains' gaps between the 4th and 5th router logits differ by up to 0.025): in one layer a flipped expert
    // choice moves only its own position's logits (by ~0.5), and the kernels are held to each other there anyway.
    model.assert_close_off_router_ties("prefill logits on wgmma", &wgmma, 100);
}

/// One layer of the tiny preset (4 heads, latent 256 + rope 64) on a 40-token prompt, a cache of 8 pages of 16 tokens
/// (at most 128 keys: one KV split on either kernel; the prefill's attention takes the wgmma kernel by default): the
/// logits with `mla_attention_wgmma_bf16` equal those with `mla_attention_bf16` bit for bit at every position, and the
/// reference's at every position not on a router near-tie.
#[test]
fn one_layer_prefill_with_the_wgmma_mla_attention_matches_reference_and_mma_sync() {
    let config = ModelConfig { n_layers: 1, ..ModelConfig::tiny() };
    let tokens: Vec<u32> = (0..40u32).map(|i| (i * 389 + 100) % config.vocab as u32).collect();
    let model = OneLayerModel::new(&config, WeightFormat::Bf16, 9, &tokens);
    let prefill = |choice: MlaPrefillKernel| {
        let (logits, kernels) = model.engine_prefill(&tokens, 8, |forward| choice.run(forward));
        (logits, kernels.into_iter().filter(|k| k.starts_with("mla_attention")).collect::<Vec<_>>())
    };
    let (wgmma, wgmma_kernels) = prefill(MlaPrefillKernel::Wgmma);
    assert_eq!(wgmma_kernels, ["mla_attention_wgmma_bf16"], "the prefill's attention launches");
    let (mma_sync, mma_kernels) = prefill(MlaPrefillKernel::MmaSync);
    assert_eq!(mma_kernels, ["mla_attention_bf16"], "the prefill's attention launches");
    let differ = wgmma.iter().zip(&mma_sync).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(differ, 0, "{differ} of {} logits differ between the wgmma and mma.sync attention", wgmma.len());
    // The reference at the positions clear of router near-ties (one_layer_prefill's rule).
    model.assert_close_off_router_ties("prefill logits, wgmma MLA attention", &wgmma, 30);
}

/// A one-layer checkpoint on disk and the CPU reference's prefill of a prompt on it: logits and router margins.
struct OneLayerModel {
    vocab: usize,
    _dir: tempfile::TempDir,
    checkpoint: Checkpoint,
    /// `[prompt, vocab]` the reference's logits, and each position's router margin (its smallest k-th to (k+1)-th router logit gap).
    want: Vec<f32>,
    margins: Vec<f32>,
    sim: Arc<SimBackend>,
}

impl OneLayerModel {
    /// `config`'s random weights from `seed`, written in `format`, and the reference's prefill of `prompt`.
    fn new(config: &ModelConfig, format: WeightFormat, seed: u64, prompt: &[u32]) -> Self {
        let weights = ReferenceWeights::random(config, seed).unwrap();
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &weights, &Layout::Native, format, 1 << 20).unwrap();
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        let reference = ReferenceModel::new(load_reference_weights(&checkpoint).unwrap(), ForwardOptions::default()).unwrap();
        let mut cache = reference.new_cache();
        let want = reference.prefill(prompt, &mut cache).unwrap();
        let margins = cache.router_margins().to_vec();
        OneLayerModel { vocab: config.vocab, _dir: dir, checkpoint, want, margins, sim: Arc::new(SimBackend::new()) }
    }

    /// The engine's prefill of `prompt` on the interpreter (a cache of `num_pages` 16-token pages), run inside
    /// `switch` (a kernel choice's `run`): its logits and the kernels it launched.
    fn engine_prefill<S>(&self, prompt: &[u32], num_pages: usize, switch: S) -> (Vec<f32>, Vec<String>)
    where
        S: FnOnce(&mut dyn FnMut() -> small4::Result<Vec<f32>>) -> small4::Result<Vec<f32>>,
    {
        let device: Device = self.sim.clone();
        let model = DeviceModel::load(&device, &self.checkpoint, Shard::SINGLE).unwrap();
        let options = EngineOptions { page_size: 16, num_pages, eos: None, keep_logits: true, ..EngineOptions::default() };
        let mut engine = Engine::new(model, options, None).unwrap();
        let seq = engine.new_sequence();
        self.sim.record_launches(true);
        let logits = switch(&mut || engine.forward_logits(&[(seq, prompt.to_vec())])).unwrap();
        let kernels = self.sim.take_recorded().into_iter().map(|l| l.kernel).collect();
        self.sim.record_launches(false);
        (logits, kernels)
    }

    /// `got` within tests/engine.rs's logit rule of the reference at the positions whose router is not within the bf16
    /// noise of a tie (two bf16 chains' gaps between the 4th and 5th router logits differ by up to 0.025), at least
    /// `min_clear` of them: in one layer a flipped expert choice moves only its own position's logits (by ~0.5).
    fn assert_close_off_router_ties(&self, what: &str, got: &[f32], min_clear: usize) {
        let (vocab, positions) = (self.vocab, self.margins.len());
        let clear: Vec<usize> = (0..positions).filter(|&p| self.margins[p] >= 0.025).collect();
        assert!(clear.len() >= min_clear, "only {} of {positions} positions away from router ties", clear.len());
        let rows = |logits: &[f32]| -> Vec<f32> { clear.iter().flat_map(|&p| logits[p * vocab..][..vocab].to_vec()).collect() };
        common::assert_close(&format!("{what} ({} of {positions} positions)", clear.len()), &rows(got), &rows(&self.want), LOGIT_ABS, LOGIT_REL);
    }
}
