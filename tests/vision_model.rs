//! The vision tower on the kernels (`model::vision::DeviceVisionTower`) and multimodal prompts through the engine,
//! against the CPU reference (`reference::vision`, `ReferenceModel::generate_greedy_with_images`) over the same
//! checkpoint with bf16 activations.
//!
//! Feature tolerance: |device - reference| <= 0.05 + 0.05 |reference|. The two compute the same bf16 rounding points
//! but sum in other orders (GEMM tiles, online softmax), so their bf16 chains drift apart by a few bf16 ulps over the
//! tower's two layers and the projector (measured: max 0.022 for features of magnitude up to ~2).

mod common;

/// The engine tests' one logit tolerance (tests/common/forced.rs says why).
use common::forced::{LOGIT_ABS, LOGIT_REL};

use small4::device::Device;
use small4::model::checkpoint::{Checkpoint, Layout};
use small4::model::config::ModelConfig;
use small4::model::engine::{DeviceModel, Engine, EngineOptions, Request, Sampling, Shard};
use small4::model::synthetic::{load_reference_weights, write_checkpoint};
use small4::model::vision::DeviceVisionTower;
use small4::quant::WeightFormat;
use small4::reference::model::{ForwardOptions, ReferenceModel, ReferenceWeights};
use small4::reference::vision::{PixelImage, VisionTower};
use small4::Error;

const FEATURE_ABS: f32 = 0.05;
const FEATURE_REL: f32 = 0.05;
const SEED: u64 = 23;

/// A deterministic pseudo-random normalised image of `width x height`.
fn pixels(width: usize, height: usize, seed: u32) -> PixelImage {
    let data = (0..3 * width * height).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) % 1000) as f32 / 500.0 - 1.0).collect();
    PixelImage { width, height, channels: 3, data }
}

/// Two images of different sizes and aspect ratios: 56x28 (4x2 patches, 2x1 features), 28x84 (2x6, 1x3).
fn two_images() -> Vec<PixelImage> {
    vec![pixels(56, 28, 1), pixels(28, 84, 2)]
}

/// The `[IMG]` / `[IMG_BREAK]` / `[IMG_END]` block of an image (Pixtral's layout: a break after each merged row, the
/// end token after the last).
fn image_tokens(image: &PixelImage, c: &ModelConfig) -> Vec<u32> {
    let v = c.vision.as_ref().unwrap();
    let block = v.patch_size * v.spatial_merge_size;
    let (rows, cols) = (image.height / block, image.width / block);
    let mut out = Vec::new();
    for r in 0..rows {
        out.extend(std::iter::repeat_n(v.image_token_id, cols));
        out.push(if r + 1 == rows { v.image_end_token_id } else { v.image_break_token_id });
    }
    out
}

/// Text, the first image, text, the second image, text.
fn multimodal_prompt(images: &[PixelImage], c: &ModelConfig) -> Vec<u32> {
    let text = |salt: u32, len: u32| (0..len).map(move |i| 100 + (i * 389 + salt * 97) % (c.vocab as u32 - 100));
    let mut prompt: Vec<u32> = vec![1];
    prompt.extend(text(1, 3));
    prompt.extend(image_tokens(&images[0], c));
    prompt.extend(text(2, 2));
    prompt.extend(image_tokens(&images[1], c));
    prompt.extend(text(3, 4));
    prompt
}

fn tower_features_equal_the_reference(device: &Device) {
    let c = ModelConfig::tiny();
    let weights = ReferenceWeights::random(&c, SEED).unwrap();
    let (v, w) = (c.vision.as_ref().unwrap(), weights.vision.as_ref().unwrap());
    let tower = DeviceVisionTower::upload(device, w, v, c.dim).unwrap();
    let images = two_images();
    let got = tower.encode_to_host(&images).unwrap();
    let want = VisionTower { weights: w, config: v, text_dim: c.dim, round_bf16: true }.encode(&images).unwrap();
    assert_eq!(got.len(), 2);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.len(), images[i].feature_count(v) * c.dim);
        common::assert_close(&format!("image {i} features"), g, w, FEATURE_ABS, FEATURE_REL);
    }
    // Each image alone gives its features of the pair (block-diagonal attention).
    let alone = tower.encode_to_host(&images[1..]).unwrap();
    common::assert_close("image 1 alone", &alone[0], &got[1], 1e-6, 0.0);

    // Bad images are typed errors: a side that is not a multiple of 28, wrong channels, no images at all.
    assert!(matches!(tower.encode(&[pixels(42, 28, 3)]), Err(Error::Shape { .. })));
    let mut gray = pixels(28, 28, 4);
    gray.channels = 1;
    assert!(matches!(tower.encode(&[gray]), Err(Error::Shape { .. })));
    assert!(matches!(tower.encode(&[]), Err(Error::InvalidArgument(_))));
}

fn two_images_through_the_tiny_model(device: &Device) {
    let c = ModelConfig::tiny();
    let weights = ReferenceWeights::random(&c, SEED).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &weights, &Layout::Native, WeightFormat::Bf16, 1 << 20).unwrap();
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let reference = ReferenceModel::new(load_reference_weights(&checkpoint).unwrap(), ForwardOptions::default()).unwrap();
    let images = two_images();
    let prompt = multimodal_prompt(&images, &c);
    let tokens = 3;

    let model = DeviceModel::load(device, &checkpoint, Shard::SINGLE).unwrap();
    // The tower inside the loaded model computes the reference's features.
    let tower = model.vision().expect("the tiny model has a vision tower");
    let got = tower.encode_to_host(&images).unwrap();
    for (i, (g, w)) in got.iter().zip(reference.encode_images(&images).unwrap()).enumerate() {
        common::assert_close(&format!("image {i} features"), g, &w, FEATURE_ABS, FEATURE_REL);
    }

    let options = EngineOptions { page_size: 16, num_pages: 8, eos: None, keep_logits: true, ..EngineOptions::default() };
    let mut engine = Engine::new(model, options, None).unwrap();
    // Typed errors before anything runs: one [IMG] too few for the images, an image of a bad size.
    let short: Vec<u32> = prompt.iter().copied().skip_while(|&t| t != c.vision.as_ref().unwrap().image_token_id).skip(1).collect();
    let request = |prompt: Vec<u32>| Request { prompt, max_tokens: tokens, sampling: Sampling::Greedy };
    assert!(matches!(engine.add_with_images(request(short), images.clone()), Err(Error::Shape { .. })));
    assert!(matches!(engine.add_with_images(request(prompt.clone()), vec![pixels(56, 28, 1), pixels(30, 84, 2)]), Err(Error::Shape { .. })));
    assert_eq!(engine.active(), 0);

    engine.add_with_images(request(prompt.clone()), images.clone()).unwrap();
    let mut steps = Vec::new();
    while engine.active() > 0 {
        steps.extend(engine.step().unwrap());
    }
    let generated: Vec<u32> = steps.iter().map(|s| s.token).collect();

    let want = reference.generate_greedy_with_images(&prompt, &images, tokens, |_| {}).unwrap().generated;
    assert_eq!(generated, want, "greedy tokens of the engine and the reference");
    // The first token's logits (the prefill's last row) against the reference's, and they depend on the images.
    let mut cache = reference.new_cache();
    let vocab = c.vocab;
    let with_images = reference.forward_with_images(&prompt, &images, &mut cache).unwrap();
    let first = steps[0].logits.as_ref().unwrap();
    common::assert_close("prefill logits", first, &with_images[with_images.len() - vocab..], LOGIT_ABS, LOGIT_REL);
    let mut cache = reference.new_cache();
    let text_only = reference.forward(&prompt, &mut cache).unwrap();
    let moved = first.iter().zip(&text_only[text_only.len() - vocab..]).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(moved > 10.0 * LOGIT_ABS, "the image features barely move the logits ({moved})");
}

backend_tests!(tower_features_equal_the_reference, two_images_through_the_tiny_model);
