//! The vision tower and projector of the CPU reference, piece by piece against naive computations written from the
//! spec (conv as explicit loops, 2D RoPE from the complex frequency table, unfold, masked attention), then whole:
//! images of different sizes in one prompt, features that change the output, checkpoints in both layouts, the CLI.

use std::sync::OnceLock;

use small4::model::checkpoint::{Checkpoint, Layout};
use small4::model::synthetic::{load_reference_weights, write_checkpoint, HF_MISTRAL3_PREFIX};
use small4::model::ModelConfig;
use small4::quant::WeightFormat;
use small4::reference::linear::matmul_nt;
use small4::reference::model::{AttentionForm, ForwardOptions, ReferenceModel, ReferenceWeights, RoundingMode};
use small4::reference::moe::softmax;
use small4::reference::vision::{apply_rope_2d, block_diagonal_attention, merge_patches, rope_2d_inv_freq, unfold_patches, PixelImage, VisionTower};
use small4::tokenizer::image::load_pixels;
use small4::tokenizer::{ChatRequest, SpecialTokenPolicy, Tokenizer};
use small4::Error;

const SEED: u64 = 9;

fn tiny_weights() -> &'static ReferenceWeights {
    static WEIGHTS: OnceLock<ReferenceWeights> = OnceLock::new();
    WEIGHTS.get_or_init(|| ReferenceWeights::random(&ModelConfig::tiny(), SEED).unwrap())
}

fn model(rounding: RoundingMode) -> ReferenceModel {
    ReferenceModel::new(tiny_weights().clone(), ForwardOptions { rounding, attention: AttentionForm::Absorbed, fp8_activations: false, prefill_fp8_act: false })
        .unwrap()
}

/// A deterministic pseudo-random normalised image of `width x height`.
fn pixels(width: usize, height: usize, seed: u32) -> PixelImage {
    let data = (0..3 * width * height).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) % 1000) as f32 / 500.0 - 1.0).collect();
    PixelImage { width, height, channels: 3, data }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn patch_conv_as_unfold_and_matmul_equals_the_explicit_convolution() {
    let (p, hidden) = (14, 5);
    let image = pixels(42, 28, 1);
    let conv: Vec<f32> = (0..hidden * 3 * p * p).map(|i| ((i * 37 % 101) as f32 - 50.0) / 200.0).collect();
    let got = matmul_nt(&unfold_patches(&image, p), &conv, 3 * 2, 3 * p * p, hidden);
    // out[gy, gx, o] = sum_{c, ky, kx} w[o, c, ky, kx] * img[c, gy*p + ky, gx*p + kx]
    let mut want = vec![0.0f64; 6 * hidden];
    for gy in 0..2 {
        for gx in 0..3 {
            for o in 0..hidden {
                for c in 0..3 {
                    for ky in 0..p {
                        for kx in 0..p {
                            let w = conv[((o * 3 + c) * p + ky) * p + kx] as f64;
                            let x = image.data[(c * 28 + gy * p + ky) * 42 + gx * p + kx] as f64;
                            want[(gy * 3 + gx) * hidden + o] += w * x;
                        }
                    }
                }
            }
        }
    }
    let want: Vec<f32> = want.into_iter().map(|v| v as f32).collect();
    assert!(max_abs_diff(&got, &want) < 1e-4, "{}", max_abs_diff(&got, &want));
}

#[test]
fn rope_2d_follows_the_complex_frequency_table() {
    // mistral-inference precompute_freqs_cis_2d: freqs = theta^(-arange(0, dim, 2)/dim); the table at (row, col)
    // is cat(row * freqs[0::2], col * freqs[1::2]); each entry rotates one interleaved pair as a complex factor.
    let (head_dim, theta) = (64usize, 1e4f64);
    let freqs: Vec<f64> = (0..head_dim / 2).map(|j| theta.powf(-((2 * j) as f64) / head_dim as f64)).collect();
    let inv_freq = rope_2d_inv_freq(head_dim, theta as f32);
    let x: Vec<f32> = (0..head_dim).map(|i| ((i * 13 % 17) as f32 - 8.0) / 4.0).collect();
    for (row, col) in [(0, 0), (3, 0), (0, 5), (7, 109), (109, 2)] {
        let angles: Vec<f64> = freqs.iter().step_by(2).map(|f| row as f64 * f).chain(freqs.iter().skip(1).step_by(2).map(|f| col as f64 * f)).collect();
        let want: Vec<f32> = x
            .chunks(2)
            .zip(&angles)
            .flat_map(|(pair, &a)| {
                let (re, im) = (pair[0] as f64, pair[1] as f64);
                [(re * a.cos() - im * a.sin()) as f32, (re * a.sin() + im * a.cos()) as f32]
            })
            .collect();
        let mut got = x.clone();
        apply_rope_2d(&mut got, &inv_freq, row, col);
        assert!(max_abs_diff(&got, &want) < 1e-5, "({row}, {col}): {}", max_abs_diff(&got, &want));
    }
}

#[test]
fn patch_merger_input_is_torch_unfold_order() {
    // F.unfold(x[1, d, H, W], 2, stride 2)[0, c*4 + di*2 + dj, L] = x[c, 2*(L / (W/2)) + di, 2*(L % (W/2)) + dj].
    let (rows, cols, d, m) = (4, 6, 3, 2);
    let grid: Vec<f32> = (0..rows * cols * d).map(|i| i as f32).collect(); // [rows, cols, d] (token-major)
    let merged = merge_patches(&grid, rows, cols, d, m);
    let blocks = (rows / m) * (cols / m);
    assert_eq!(merged.len(), blocks * d * m * m);
    for l in 0..blocks {
        for c in 0..d {
            for di in 0..m {
                for dj in 0..m {
                    let (y, x) = (m * (l / (cols / m)) + di, m * (l % (cols / m)) + dj);
                    assert_eq!(merged[l * d * m * m + c * m * m + di * m + dj], grid[(y * cols + x) * d + c]);
                }
            }
        }
    }
}

#[test]
fn block_diagonal_attention_equals_masked_full_attention() {
    let (heads, head_dim, tokens) = (2, 4, 7);
    let segments = [0..3, 3..7];
    let gen = |salt: usize| -> Vec<f32> { (0..tokens * heads * head_dim).map(|i| (((i + salt) * 29 % 23) as f32 - 11.0) / 7.0).collect() };
    let (q, k, v) = (gen(1), gen(2), gen(3));
    let got = block_diagonal_attention(&q, &k, &v, &segments, heads, head_dim);
    let width = heads * head_dim;
    for i in 0..tokens {
        for h in 0..heads {
            // Full scores with -inf across images.
            let scores: Vec<f32> = (0..tokens)
                .map(|j| {
                    let same = segments.iter().any(|s| s.contains(&i) && s.contains(&j));
                    let dot: f32 = (0..head_dim).map(|e| q[i * width + h * head_dim + e] * k[j * width + h * head_dim + e]).sum();
                    if same {
                        dot / (head_dim as f32).sqrt()
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect();
            let probs = softmax(&scores);
            for e in 0..head_dim {
                let want: f32 = (0..tokens).map(|j| probs[j] * v[j * width + h * head_dim + e]).sum();
                assert!((got[i * width + h * head_dim + e] - want).abs() < 1e-5, "token {i} head {h} elem {e}");
            }
        }
    }
}

#[test]
fn images_are_encoded_independently_and_in_token_order() {
    let w = tiny_weights();
    let config = w.config.vision.as_ref().unwrap();
    let tower = VisionTower { weights: w.vision.as_ref().unwrap(), config, text_dim: w.config.dim, round_bf16: false };
    let (a, b) = (pixels(56, 28, 1), pixels(28, 84, 2));
    let both = tower.encode(&[a.clone(), b.clone()]).unwrap();
    assert_eq!(both[0].len(), 2 * w.config.dim, "56x28: 2x1 merged tokens");
    assert_eq!(both[1].len(), 3 * w.config.dim, "28x84: 1x3 merged tokens");
    // Block-diagonal attention: the same features as each image alone.
    let alone = [tower.encode(&[a]).unwrap().remove(0), tower.encode(&[b]).unwrap().remove(0)];
    assert!(max_abs_diff(&both[0], &alone[0]) < 1e-5 && max_abs_diff(&both[1], &alone[1]) < 1e-5);
    // Features are O(1) and not constant.
    assert!(both.iter().flatten().all(|v| v.is_finite()));
    assert!(max_abs_diff(&both[1][..w.config.dim], &both[1][w.config.dim..2 * w.config.dim]) > 1e-2);
    // Typed errors: a side that is not whole 28-pixel blocks, wrong pixel count.
    let odd = PixelImage { width: 42, ..pixels(42, 28, 3) };
    assert!(matches!(tower.encode(&[odd]), Err(Error::Shape { .. })));
    let short = PixelImage { data: vec![0.0; 10], ..pixels(28, 28, 3) };
    assert!(matches!(tower.encode(&[short]), Err(Error::Shape { .. })));
}

/// The tiny tokenizer's prompt with two images of different sizes (written as PNG files) and their pixels.
fn two_image_prompt(dir: &std::path::Path, shift: u8) -> (Vec<u32>, Vec<PixelImage>, Vec<std::path::PathBuf>) {
    let tokenizer = Tokenizer::stand_in_truncated(ModelConfig::tiny().vocab, 1000).unwrap();
    let paths = [dir.join("a.png"), dir.join("b.png")];
    image::RgbImage::from_fn(60, 30, |x, y| image::Rgb([(x * 4) as u8 ^ shift, (y * 8) as u8, 99])).save(&paths[0]).unwrap();
    image::RgbImage::from_fn(20, 70, |x, y| image::Rgb([7, (x * 9) as u8, (y * 3) as u8 ^ shift])).save(&paths[1]).unwrap();
    let urls: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let prompt = tokenizer.encode_chat(&ChatRequest::single_turn(None, "Compare them.", &urls, None)).unwrap();
    let config = &tokenizer.image_encoder().unwrap().config;
    let images = paths.iter().map(|p| load_pixels(p, config).unwrap()).collect();
    (prompt.ids, images, paths.to_vec())
}

#[test]
fn two_images_of_different_sizes_in_one_prompt_drive_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let (ids, images, _) = two_image_prompt(dir.path(), 0);
    let v = ModelConfig::tiny().vision.unwrap();
    // Layout: 60x30 -> 3 cols x 2 rows, 20x70 -> 1 col x 3 rows: rows of [IMG]s ended by [IMG_BREAK], last [IMG_END].
    let (img, brk, end) = (v.image_token_id, v.image_break_token_id, v.image_end_token_id);
    let layout: Vec<u32> = ids.iter().copied().filter(|&t| [img, brk, end].contains(&t)).collect();
    assert_eq!(layout, [img, img, img, brk, img, img, img, end, img, brk, img, brk, img, end]);
    assert_eq!(images.iter().map(|i| (i.width, i.height, i.feature_count(&v))).collect::<Vec<_>>(), [(84, 56, 6), (28, 84, 3)]);

    let m = model(RoundingMode::Bf16Activations);
    let vocab = m.config().vocab;
    let last = |logits: Vec<f32>| logits[logits.len() - vocab..].to_vec();
    let with_images = last(m.forward_with_images(&ids, &images, &mut m.new_cache()).unwrap());
    let text_only = last(m.forward(&ids, &mut m.new_cache()).unwrap());
    let (_, other_pixels, _) = two_image_prompt(dir.path(), 0x55);
    let with_other = last(m.forward_with_images(&ids, &other_pixels, &mut m.new_cache()).unwrap());
    assert!(max_abs_diff(&with_images, &text_only) > 1e-2, "the features replace the [IMG] embeddings");
    assert!(max_abs_diff(&with_images, &with_other) > 1e-2, "other pixels, other logits");
    // Only the [IMG] rows change: a prefix before the first image is untouched.
    let first = ids.iter().position(|&t| t == img).unwrap();
    let prefix = |logits: Vec<f32>| logits[..first * vocab].to_vec();
    assert_eq!(prefix(m.forward_with_images(&ids, &images, &mut m.new_cache()).unwrap()), prefix(m.forward(&ids, &mut m.new_cache()).unwrap()));

    // Greedy generation: prefill with images then decode equals the step-by-step logits.
    let stats = m.generate_greedy_with_images(&ids, &images, 3, |_| {}).unwrap();
    assert_eq!(stats.generated.len(), 3);
    assert_eq!(stats.generated[0], small4::reference::model::argmax(&with_images));

    // The images must cover the [IMG] tokens exactly; a model without a tower says so.
    assert!(matches!(m.forward_with_images(&ids, &images[..1], &mut m.new_cache()), Err(Error::Shape { .. })));
    let text_model = ReferenceModel::new(ReferenceWeights { vision: None, ..tiny_weights().clone() }, m.options()).unwrap();
    assert!(matches!(text_model.forward_with_images(&ids, &images, &mut text_model.new_cache()), Err(Error::Config(_))));
    let text_config = ModelConfig { vision: None, ..ModelConfig::tiny() };
    let text_only_config = ReferenceModel::new(ReferenceWeights { vision: None, config: text_config, ..tiny_weights().clone() }, m.options()).unwrap();
    assert!(matches!(text_only_config.forward_with_images(&ids, &images, &mut text_only_config.new_cache()), Err(Error::Config(_))));
}

#[test]
fn vision_weights_round_trip_through_both_checkpoint_layouts() {
    let weights = tiny_weights();
    let images = [pixels(56, 56, 4), pixels(28, 56, 5)];
    let reference = model(RoundingMode::F32).encode_images(&images).unwrap();
    let hf = Layout::HuggingFace { prefix: HF_MISTRAL3_PREFIX.to_string() };
    let mut stored_wq = Vec::new();
    for layout in [Layout::Native, hf] {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), weights, &layout, WeightFormat::Fp8PerTensor, 4 << 20).unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        let names = ck.stored_names();
        let (tower, projector) = match layout {
            Layout::Native => ("vision_encoder.transformer.layers.1.attention.wq.weight", "vision_language_adapter.w_out.weight"),
            Layout::HuggingFace { .. } => ("model.vision_tower.transformer.layers.1.attention.q_proj.weight", "model.multi_modal_projector.linear_2.weight"),
        };
        assert!(names.contains(&tower) && names.contains(&projector), "{layout:?}: {names:?}");
        stored_wq.push(ck.stored(tower).unwrap().data.to_vec());
        let loaded = load_reference_weights(&ck).unwrap();
        let (got, want) = (loaded.vision.as_ref().unwrap(), weights.vision.as_ref().unwrap());
        // The tower stays bf16 whatever the expert format: exactly the weights written.
        assert_eq!(got.layers[1].wq, want.layers[1].wq, "{layout:?} wq back in native row order");
        assert_eq!(got.layers[0].wk, want.layers[0].wk);
        assert_eq!((&got.patch_conv, &got.merging_layer, &got.w_out), (&want.patch_conv, &want.merging_layer, &want.w_out));
        let m = ReferenceModel::new(
            loaded,
            ForwardOptions { rounding: RoundingMode::F32, attention: AttentionForm::Absorbed, fp8_activations: false, prefill_fp8_act: false },
        )
        .unwrap();
        assert_eq!(m.encode_images(&images).unwrap(), reference, "{layout:?}");
    }
    assert_ne!(stored_wq[0], stored_wq[1], "HF stores wq permuted for rotate-half RoPE");
}

#[test]
fn the_cli_generates_from_a_png_and_a_jpeg_on_the_reference_and_the_interpreter() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("wide.png");
    let jpg = dir.path().join("tall.jpg");
    image::RgbImage::from_fn(90, 40, |x, y| image::Rgb([(x * 2) as u8, (y * 6) as u8, 40])).save(&png).unwrap();
    image::RgbImage::from_fn(30, 60, |x, y| image::Rgb([200, (x * 8) as u8, (y * 4) as u8])).save(&jpg).unwrap();
    let seed = SEED.to_string();
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--max-tokens", "4", "--seed", &seed, "--prompt", "Describe.", "--image"];
        args.push(png.to_str().unwrap());
        args.extend(["--image", jpg.to_str().unwrap()]);
        args.extend(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_small4")).args(&args).output().unwrap()
    };
    let out = run(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "generate failed: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    // The same prompt, pixels and weights in-process give the text it printed.
    let tokenizer = Tokenizer::stand_in_truncated(ModelConfig::tiny().vocab, 1000).unwrap();
    let urls = [png.display().to_string(), jpg.display().to_string()];
    let ids = tokenizer.encode_chat(&ChatRequest::single_turn(None, "Describe.", &urls, None)).unwrap().ids;
    let config = &tokenizer.image_encoder().unwrap().config;
    let images = [load_pixels(&png, config).unwrap(), load_pixels(&jpg, config).unwrap()];
    let lines: Vec<&str> = stdout.lines().collect();
    let shown: Vec<String> = ids.iter().map(u32::to_string).collect();
    assert!(lines[0].ends_with(&format!("prompt: [{}]", shown.join(","))), "{}", lines[0]);
    let m = model(RoundingMode::Bf16Activations);
    let generated = m.generate_greedy_with_images(&ids, &images, 4, |_| {}).unwrap().generated;
    let text = tokenizer.decode(&generated, SpecialTokenPolicy::Ignore).unwrap();
    assert_eq!(lines[1..lines.len() - 1].join("\n").trim_end(), text.trim_end());

    // A chat request names its images in image_url chunks: the same prompt and the same output.
    let chat = dir.path().join("chat.json");
    let request = serde_json::json!({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": urls[0]}, {"type": "image_url", "image_url": {"url": format!("file://{}", urls[1])}},
        {"type": "text", "text": "Describe."}]}]});
    std::fs::write(&chat, request.to_string()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_small4"))
        .args(["generate", "--max-tokens", "4", "--seed", &seed, "--chat", chat.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let chat_stdout = String::from_utf8_lossy(&out.stdout);
    let chat_lines: Vec<&str> = chat_stdout.lines().collect();
    // Same prompt ids, same generated text (the last line is timings).
    assert_eq!(chat_lines[0].rsplit_once("prompt: ").unwrap().1, lines[0].rsplit_once("prompt: ").unwrap().1);
    assert_eq!(chat_lines[1..chat_lines.len() - 1], lines[1..lines.len() - 1], "--chat with image_url chunks");

    // The engine on the interpreter (the tower on the kernels) prints the same text; unreadable images are named.
    let out = run(&["--backend", "sim"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sim_stdout = String::from_utf8_lossy(&out.stdout);
    let sim_lines: Vec<&str> = sim_stdout.lines().collect();
    assert_eq!(sim_lines[0].rsplit_once("prompt: ").unwrap().1, lines[0].rsplit_once("prompt: ").unwrap().1);
    assert_eq!(sim_lines[1..sim_lines.len() - 1], lines[1..lines.len() - 1], "--backend sim with images");
    std::fs::write(&jpg, b"not an image").unwrap();
    let out = run(&[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tall.jpg"), "{stderr}");
}
