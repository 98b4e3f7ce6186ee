//! The wgmma kernel of the vision attention (`cuda/vision_attention_wgmma.cu`) against the CPU reference and the
//! mma.sync kernel it replaces (`vision_attention` in `cuda/vision.cu`), on several images of different sizes (query
//! tiles shared by images, key ranges that are not multiples of 64, ranges of more tiles than the stage ring holds),
//! several heads. On the interpreter each kernel sums every k-step of 16 exactly and rounds once, in the same k order,
//! with the same key tiles and the same softmax code (`cuda/include/vision_attention.cuh`), so the two outputs must be
//! identical bit for bit; on a GPU each is held to the reference with `tests/vision.rs`'s tolerance.
//!
//! The interpreter runs every check here (bounds, uninitialised reads, shared-memory races through mbarrier
//! happens-before, async-proxy fences, wgmma register and operand lifetimes, mbarrier misuse and deadlocks): the
//! tests refuse to run with the race detector switched off (`PTXSIM_RACE_CHECK=0`), and planted bugs show the checks
//! are live on this kernel.

mod common;

use std::ops::Range;
use std::sync::Arc;

use common::{
    assert_close, assert_reported, compare_wgmma_with_mma_sync, counter_cells, random_bf16, regex_free_replace, require_race_check, rng, to_f32,
    without_mbarrier_waits, without_proxy_fences, Planted,
};
use half::bf16;
use small4::device::{Device, DeviceBuffer};
use small4::kernels::vision::{vision_attention, TokenSegments, VisionAttentionKernel};
use small4::reference::vision::block_diagonal_attention;

/// Six images: 5 and 145 tokens share the first query tile, the 300-token one spans five query tiles and five key
/// tiles (the 3-stage ring wraps; its last key tile holds 44 keys), one image of a single token, and a last partial
/// query tile.
const SEGMENTS: [Range<usize>; 6] = [0..5, 5..150, 150..170, 170..470, 470..471, 471..560];

/// Runs the attention of random q, k, v (values in [-1.5, 1.5], `tests/vision.rs`'s) over `segments` with `kernel`;
/// returns the output and the reference. A launch's error is returned (the planted-bug test expects some).
fn run(device: &Device, kernel: VisionAttentionKernel, segments: &[Range<usize>], heads: usize) -> small4::Result<(Vec<f32>, Vec<f32>)> {
    let head_dim = 64;
    let tokens = segments.last().unwrap().end;
    let mut r = rng(17);
    let [q, k, v] = [0, 1, 2].map(|_| random_bf16(&mut r, tokens * heads * head_dim, 1.5));
    let upload = |x: &[bf16]| DeviceBuffer::from_slice(device, x).unwrap();
    let [q_dev, k_dev, v_dev] = [&q, &k, &v].map(|x| upload(x));
    // NaN (0xffff) everywhere, so unwritten elements show.
    let out = upload(&vec![bf16::from_bits(0xffff); tokens * heads * head_dim]);
    let token_segments = TokenSegments::upload(device, segments)?;
    let shape = [tokens, heads, head_dim];
    let scale = 1.0 / (head_dim as f32).sqrt();
    kernel.run(|| vision_attention(q_dev.view(shape)?, k_dev.view(shape)?, v_dev.view(shape)?, out.view(shape)?, &token_segments, scale))?;
    if let Some(counters) = device.last_launch_counters() {
        let entry = match kernel {
            VisionAttentionKernel::Wgmma => "vision_attention_wgmma",
            VisionAttentionKernel::MmaSync => "vision_attention",
        };
        assert_eq!(counters.kernel, entry, "the switch picked the kernel");
    }
    let want = block_diagonal_attention(&to_f32(&q), &to_f32(&k), &to_f32(&v), segments, heads, head_dim);
    Ok((to_f32(&out.to_vec()?), want))
}

fn wgmma_attention_matches_the_reference_and_mma_sync(device: &Device) {
    require_race_check(device);
    let heads = 3;
    let (wgmma, want) = run(device, VisionAttentionKernel::Wgmma, &SEGMENTS, heads).unwrap();
    let (mma_sync, _) = run(device, VisionAttentionKernel::MmaSync, &SEGMENTS, heads).unwrap();
    // tests/vision.rs's tolerance: outputs are averages of values below 1.5, f32 softmax, one bf16 rounding.
    assert_close("vision attention (wgmma)", &wgmma, &want, 2e-3, 8e-3);
    assert_close("vision attention (mma.sync)", &mma_sync, &want, 2e-3, 8e-3);
    compare_wgmma_with_mma_sync(device, "vision attention", &wgmma, &mma_sync);
}

backend_tests!(wgmma_attention_matches_the_reference_and_mma_sync);

/// The environment switch: `SMALL4_VISION_ATTENTION` picks the kernel for the process, `run` overrides it on the
/// thread, an unknown value is a typed error, and unset, the wgmma kernel runs. (The only test in this binary that
/// reads the variable; the others pin the choice with `run`, so its changes do not reach them.)
#[test]
fn the_environment_picks_the_kernel() {
    std::env::set_var("SMALL4_VISION_ATTENTION", "mma_sync");
    assert_eq!(VisionAttentionKernel::current().unwrap(), VisionAttentionKernel::MmaSync);
    assert_eq!(VisionAttentionKernel::Wgmma.run(VisionAttentionKernel::current).unwrap(), VisionAttentionKernel::Wgmma);
    std::env::set_var("SMALL4_VISION_ATTENTION", "wgmma");
    assert_eq!(VisionAttentionKernel::current().unwrap(), VisionAttentionKernel::Wgmma);
    std::env::set_var("SMALL4_VISION_ATTENTION", "tensor_cores");
    assert!(matches!(VisionAttentionKernel::current(), Err(small4::Error::InvalidArgument(_))));
    std::env::remove_var("SMALL4_VISION_ATTENTION");
    assert_eq!(VisionAttentionKernel::current().unwrap(), VisionAttentionKernel::Wgmma);
    // Unset, a plain call (the vision tower's) launches the wgmma kernel.
    let device = small4::device::simulator();
    let x = DeviceBuffer::from_slice(&device, &random_bf16(&mut rng(3), 70 * 64, 1.5)).unwrap();
    let out = DeviceBuffer::<bf16>::alloc(&device, 70 * 64).unwrap();
    let view = x.view([70, 1, 64]).unwrap();
    vision_attention(view, view, view, out.view([70, 1, 64]).unwrap(), &TokenSegments::upload(&device, std::slice::from_ref(&(0..70))).unwrap(), 0.125)
        .unwrap();
    assert_eq!(device.last_launch_counters().unwrap().kernel, "vision_attention_wgmma");
}

/// The PTX with the producer's wait on "empty" made a no-op: its try_wait is the one followed by the stage's cp.async
/// before any other try_wait.
fn producer_ignores_empty(ptx: &str) -> String {
    let lines: Vec<&str> = ptx.lines().collect();
    let waits: Vec<usize> = (0..lines.len()).filter(|&i| lines[i].contains("mbarrier.try_wait.parity")).collect();
    let producer = waits
        .iter()
        .enumerate()
        .find(|&(n, &i)| lines[i..waits.get(n + 1).copied().unwrap_or(lines.len())].iter().any(|l| l.contains("cp.async.cg.shared.global")))
        .map(|(_, &i)| i)
        .expect("the producer's wait on empty");
    lines.iter().enumerate().map(|(i, l)| if i == producer { "setp.eq.u32 P1, 1, 1;" } else { l }).collect::<Vec<_>>().join("\n")
}

/// The interpreter's checks are live on this kernel: each planted bug (an edit of the kernel's own PTX) makes the
/// attention fail with the hazard's report, where the unedited kernel passes.
#[test]
fn planted_bugs_in_the_wgmma_attention_are_reported() {
    let original = small4::kernels::modules::VISION_ATTENTION_WGMMA.ptx;
    let cases: [(&'static str, String, &str); 5] = [
        // The softmax reads S while its wgmmas are in flight: wait_group 2 instead of 1 leaves them unretired.
        ("wait_group_2", original.replace("wgmma.wait_group.sync.aligned 1;", "wgmma.wait_group.sync.aligned 2;"), "accessed before the wgmma.wait_group"),
        // Every barrier completes on one arrival: "empty" would release a stage when the first consumer warp is done
        // with it, while the other warps' wgmmas may still read it. The second warp's release arrives on a phase
        // nobody has observed yet.
        ("empty_after_one_warp", regex_free_replace(original, "mbarrier.init.shared::cta.b64 [", "], %r", "], 1;"), "the phase ran ahead"),
        // The producer refills a stage without waiting for its release (the consumers may still read the old tile):
        // its "full" arrival for the refill lands on a phase the consumers have not observed yet.
        ("producer_ignores_empty", producer_ignores_empty(original), "the phase ran ahead"),
        // The producer's cp.async tiles (and zero rows) reach wgmma (the async proxy) without fence.proxy.async.
        ("no_proxy_fence", without_proxy_fences(original), "no fence.proxy.async"),
        // Nobody waits on a barrier: the consumers read stages before anything landed there.
        ("no_waits", without_mbarrier_waits(original), "uninitialised shared memory"),
    ];
    let segments = [0..5, 5..150, 150..400];
    for (name, ptx, expected) in cases {
        let device = Planted::edited(small4::kernels::modules::VISION_ATTENTION_WGMMA, "vision_attention_wgmma", name, ptx);
        assert_reported(name, run(&device, VisionAttentionKernel::Wgmma, &segments, 1), expected);
    }
    let unedited = Planted::unedited(small4::kernels::modules::VISION_ATTENTION_WGMMA, "vision_attention_wgmma");
    let (got, want) = run(&unedited, VisionAttentionKernel::Wgmma, &segments, 1).unwrap();
    assert_close("vision attention (unedited)", &got, &want, 2e-3, 8e-3);
}

/// The interpreter's counters of both kernels at one image of 1024 tokens (a 448 x 448 image's 32 x 32 patches),
/// 16 heads: 16 query tiles x 16 heads = 256 blocks of 16 key tiles each, 16 evenly spaced blocks interpreted per
/// launch. Prints one Markdown row per kernel for docs/perf.md:
/// `cargo test --test vision_wgmma attention_counters -- --ignored --nocapture`.
#[test]
#[ignore]
fn attention_counters_at_1024_tokens_16_heads() {
    let sim = Arc::new(small4::device::sim::SimBackend::new());
    let device: Device = sim.clone();
    sim.set_block_sample(Some(16));
    let (tokens, heads) = (1024, 16);
    println!("| kernel | blocks run / grid | warp instructions | shared requests | bank-conflict wavefronts | global bytes read | tensor instructions | tensor FLOPs |");
    println!("|---|---|---|---|---|---|---|---|");
    for kernel in [VisionAttentionKernel::MmaSync, VisionAttentionKernel::Wgmma] {
        let mut r = rng(5);
        let x = DeviceBuffer::from_slice(&device, &random_bf16(&mut r, tokens * heads * 64, 1.5)).unwrap();
        let out = DeviceBuffer::<bf16>::alloc(&device, tokens * heads * 64).unwrap();
        let segments = TokenSegments::upload(&device, std::slice::from_ref(&(0..tokens))).unwrap();
        let view = x.view([tokens, heads, 64]).unwrap();
        kernel.run(|| vision_attention(view, view, view, out.view([tokens, heads, 64])?, &segments, 0.125)).unwrap();
        let c = device.last_launch_counters().unwrap();
        println!("| {} |", counter_cells(&c));
    }
}
