//! The wgmma kernel of the MLA prefill attention (`cuda/mla_attention_wgmma.cu`) against the CPU reference and the
//! mma.sync kernel it replaces for prefill (`mla_attention_*` in `cuda/mla_attention.cu`), at the real geometry (32
//! heads, latent 256 + rope 64): prefill chunks over a cached prefix, shuffled pages of 16 tokens (every tile crosses
//! a page boundary), causal rows, row tiles of 128 (the wgmma kernel's two consumer warpgroups of 64) whose last one
//! is partial, or padding alone in its second warpgroup, key ranges of more tiles than the stage ring holds and a
//! partial last tile, bf16 and fp8 caches. On the interpreter both kernels sum every k-step of 16
//! exactly and round once, in the same k order, over the same 32-token key tiles with the same softmax code
//! (`cuda/include/mla_attention.cuh`), so their outputs must be identical bit for bit; on a GPU each is held to the
//! reference with `tests/attention.rs`'s tolerance.
//!
//! The interpreter runs every check here (bounds, uninitialised reads, shared-memory races through mbarrier
//! happens-before, async-proxy fences, wgmma register and operand lifetimes, mbarrier misuse and deadlocks): the
//! tests refuse to run with the race detector off (`PTXSIM_RACE_CHECK=0`), and planted bugs show both the checks and
//! the comparisons are live on this kernel.

mod common;

use std::sync::Arc;

use common::{
    assert_close, assert_reported, compare_wgmma_with_mma_sync, counter_cells, random_bf16, regex_free_replace, require_race_check, rng, to_f32,
    without_mbarrier_waits, without_proxy_fences, Planted,
};
use half::bf16;
use rand::seq::SliceRandom;
use rand::Rng;
use small4::device::{Device, DeviceBuffer};
use small4::kernels::attention::{self, AttentionPlan, AttentionScratch, BlockTables, MlaPrefillKernel, PagedCache, Queries, QueryLayout, SplitCombine};
use small4::model::kv_cache::{BatchTables, CacheDescriptor, CacheDtype};
use small4::reference::attention::{latent_attention, MlaDims};

const WIDTH: usize = 320;
const LATENT: usize = 256;
const ROPE: usize = 64;
const HEADS: usize = 32;
const PAGE_SIZE: usize = 16;
const SOFTMAX_SCALE: f32 = 0.088_388_35; // 1/sqrt(128)
const FP8_SCALE: f32 = 0.75;

/// (cached prefix, new tokens) per sequence: 100 + 6 (192 rows: 2 wgmma row tiles, the second's second warpgroup all
/// padding; keys 0..106 in 4 tiles, the ring of 3 wraps, the last tile holds 10 keys), 0 + 5 (a fresh prompt: 160
/// rows, the last row tile 32 rows) and 37 + 1 (one token: a row tile of 32 rows).
const SEQS: [(usize, usize); 3] = [(100, 6), (0, 5), (37, 1)];

/// A cache image, its tables and the queries of one prefill call, with the reference output.
struct Case {
    desc: CacheDescriptor,
    tables: BatchTables,
    bytes: Vec<u8>,
    q_start: Vec<i32>,
    q_lat: Vec<bf16>,
    q_rope: Vec<bf16>,
    want: Vec<f32>,
}

/// `case_of` with the sequences of `SEQS`.
fn case(fp8: bool, seed: u64) -> Case {
    case_of(fp8, seed, &SEQS)
}

/// The sequences `seqs` ((cached prefix, new tokens) each) over random pages drawn from a shuffled pool with spare
/// pages (an even count; unused bytes 0xff, NaN), random cache rows (bf16 in [-1.5, 1.5]; e4m3 below 2 in magnitude,
/// never 0 or NaN) and queries in [-1, 1]; the reference is `latent_attention` on the dequantised rows.
fn case_of(fp8: bool, seed: u64, seqs: &[(usize, usize)]) -> Case {
    let mut r = rng(seed);
    let dtype = if fp8 { CacheDtype::Fp8E4m3 { scale: FP8_SCALE } } else { CacheDtype::Bf16 };
    let lens: Vec<usize> = seqs.iter().map(|(prefix, new)| prefix + new).collect();
    let pages: usize = lens.iter().map(|l| l.div_ceil(PAGE_SIZE)).sum();
    let desc = CacheDescriptor::mla((pages + 4).next_multiple_of(2), PAGE_SIZE, dtype).unwrap();
    let mut pool: Vec<i32> = (0..desc.num_pages as i32).collect();
    pool.shuffle(&mut r);
    let max_pages = lens.iter().map(|l| l.div_ceil(PAGE_SIZE)).max().unwrap();
    let mut block_tables = vec![0i32; lens.len() * max_pages];
    let mut next = pool.into_iter();
    for (row, &len) in block_tables.chunks_exact_mut(max_pages).zip(&lens) {
        row[..len.div_ceil(PAGE_SIZE)].iter_mut().for_each(|e| *e = next.next().unwrap());
    }
    let tables = BatchTables { block_tables, seq_lens: lens.iter().map(|&l| l as i32).collect(), max_pages };
    let slot = |seq: usize, pos: usize| {
        let page = tables.block_tables[seq * max_pages + pos / PAGE_SIZE] as usize;
        (page * PAGE_SIZE + pos % PAGE_SIZE) * desc.token_bytes()
    };
    let mut bytes = vec![0xffu8; desc.total_bytes()];
    for (seq, &len) in lens.iter().enumerate() {
        for pos in 0..len {
            let token = &mut bytes[slot(seq, pos)..][..desc.token_bytes()];
            if fp8 {
                token.iter_mut().for_each(|b| *b = r.random_range(1u8..0x40) | (r.random::<u8>() & 0x80));
            } else {
                token.copy_from_slice(bytemuck::cast_slice(&random_bf16(&mut r, WIDTH, 1.5)));
            }
        }
    }
    let tokens: usize = seqs.iter().map(|&(_, new)| new).sum();
    let q_lat = random_bf16(&mut r, tokens * HEADS * LATENT, 1.0);
    let q_rope = random_bf16(&mut r, tokens * HEADS * ROPE, 1.0);
    let mut q_start = vec![0i32];
    seqs.iter().for_each(|&(_, new)| q_start.push(q_start.last().unwrap() + new as i32));

    let dims = MlaDims { heads: HEADS, kv_lora_rank: LATENT, qk_nope: 64, qk_rope: ROPE, v_head: 128 };
    let (q_lat_f, q_rope_f) = (to_f32(&q_lat), to_f32(&q_rope));
    let e = desc.dtype.bytes();
    let mut want = Vec::new();
    for (seq, (&len, &(_, new))) in lens.iter().zip(seqs).enumerate() {
        let cache: Vec<f32> =
            (0..len).flat_map(|pos| (0..WIDTH).map(move |i| (pos, i))).map(|(pos, i)| desc.decode_element(&bytes[slot(seq, pos) + i * e..])).collect();
        let first = q_start[seq] as usize;
        let positions: Vec<usize> = (len - new..len).collect();
        want.extend(latent_attention(
            &q_lat_f[first * HEADS * LATENT..(first + new) * HEADS * LATENT],
            &q_rope_f[first * HEADS * ROPE..(first + new) * HEADS * ROPE],
            &cache,
            &positions,
            &dims,
            SOFTMAX_SCALE,
        ));
    }
    Case { desc, tables, bytes, q_start, q_lat, q_rope, want }
}

/// Runs the case's prefill attention (one split) with `kernel` on `device`, the output poisoned (NaN); returns it. A
/// launch's error is returned (the planted-bug test expects some).
fn run(device: &Device, case: &Case, kernel: MlaPrefillKernel) -> small4::Result<Vec<f32>> {
    let (plan, out) = run_split(device, case, kernel, Some(1), None)?;
    assert_eq!(plan.num_splits, 1);
    Ok(out)
}

/// `run` with `splits` KV splits (`None`: the wrapper's count) and the split combine `form` forced (`None`: the
/// wrapper's); returns the plan too. Asserts the launch ran `kernel`. (That a fused launch leaves its counters at zero
/// for the next one is tests/attention.rs's `fused_split_combine_equals_the_combine_launch`, whose prefill case runs
/// this kernel.)
fn run_split(
    device: &Device,
    case: &Case,
    kernel: MlaPrefillKernel,
    splits: Option<usize>,
    form: Option<SplitCombine>,
) -> small4::Result<(AttentionPlan, Vec<f32>)> {
    let tokens = *case.q_start.last().unwrap() as usize;
    let cache = PagedCache::from_bytes(device, case.desc, &case.bytes)?;
    let tables = BlockTables::upload(device, &case.tables, &case.desc)?;
    let layout = QueryLayout::upload(device, &case.q_start)?;
    let q_lat = DeviceBuffer::from_slice(device, &case.q_lat)?;
    let q_rope = DeviceBuffer::from_slice(device, &case.q_rope)?;
    let queries = Queries { layout: &layout, q_lat: q_lat.view([tokens, HEADS, LATENT])?, q_rope: q_rope.view([tokens * HEADS, ROPE])? };
    let o_lat = DeviceBuffer::<bf16>::filled_with_byte(device, tokens * HEADS * LATENT, 0xff)?;
    let mut scratch = AttentionScratch::new(device);
    let mut call = || attention::mla_attention(&cache, &tables, &queries, o_lat.view([tokens, HEADS, LATENT])?, SOFTMAX_SCALE, splits, &mut scratch);
    let plan = kernel.run(|| match form {
        Some(form) => form.run(call),
        None => call(),
    })?;
    let fused = plan.num_splits > 1 && form.unwrap_or_else(|| SplitCombine::for_plan(&plan, case.tables.seq_lens.len())) == SplitCombine::Fused;
    // The attention launch is the last one unless the combine ran as its own launch after it.
    if let Some(counters) = device.last_launch_counters().filter(|_| plan.num_splits == 1 || fused) {
        let fp8 = matches!(case.desc.dtype, CacheDtype::Fp8E4m3 { .. });
        let entry = match kernel {
            MlaPrefillKernel::Wgmma => format!("mla_attention_wgmma_{}", if fp8 { "fp8" } else { "bf16" }),
            MlaPrefillKernel::MmaSync => format!("mla_attention_{}", if fp8 { "fp8" } else { "bf16" }),
        };
        assert_eq!(counters.kernel, entry, "the switch picked the kernel");
    }
    Ok((plan, to_f32(&o_lat.to_vec()?)))
}

/// tests/attention.rs's tolerance: P rounded to bf16 for P V (2^-9 relative, of values below 2) and the output to
/// bf16 (2^-9 relative).
fn assert_matches_reference(what: &str, got: &[f32], want: &[f32]) {
    assert_close(what, got, want, 2.0 * 2.0 / 512.0, 1.0 / 256.0);
}

fn wgmma_prefill_matches_the_reference_and_mma_sync(device: &Device) {
    require_race_check(device);
    for fp8 in [false, true] {
        let case = case(fp8, 7 + fp8 as u64);
        let wgmma = run(device, &case, MlaPrefillKernel::Wgmma).unwrap();
        let mma_sync = run(device, &case, MlaPrefillKernel::MmaSync).unwrap();
        assert_matches_reference(&format!("o_lat (wgmma, fp8 {fp8})"), &wgmma, &case.want);
        assert_matches_reference(&format!("o_lat (mma.sync, fp8 {fp8})"), &mma_sync, &case.want);
        compare_wgmma_with_mma_sync(device, &format!("MLA prefill (fp8 {fp8})"), &wgmma, &mma_sync);
    }
}

/// Split-KV on the wgmma kernel equals the mma.sync kernel's split path bit for bit at the same plan (split count and
/// tokens per split; the row tiles differ, 128 rows against 16-64, which changes no row's keys) and matches the
/// reference, hazard checks on:
/// - a fresh 512-token prompt at 32 heads (128 wgmma row tiles), bf16 with 2 splits of 256 (the first 64 tiles' rows
///   precede split 1, whose blocks for them only arrive), the combine in the form `SplitCombine::for_plan` picks
///   (fused);
/// - chunked prefill over cached prefixes, bf16 and fp8: 40 new tokens after 300 cached (10 row tiles, the last
///   partial) beside a fresh 5-token prompt and one token after 37, at 2 to 5 splits (2: 170 -> 192 tokens a split,
///   the second ragged; 3: 128, the last 84; 4: 96, the last 52; 5: 68 -> 96, 4 splits) and the wrapper's own count
///   (30 units: 3 splits of 128), whose later splits lie past the short sequences' ends, the combine fused and as its
///   own launch.
///
/// (The 512-token prompt is the slow part: ~4 interpreted GFLOP a kernel.)
fn wgmma_split_kv_matches_mma_sync_split(device: &Device) {
    require_race_check(device);
    let check = |what: &str, case: &Case, splits: Option<usize>, form: Option<SplitCombine>| {
        let (plan, wgmma) = run_split(device, case, MlaPrefillKernel::Wgmma, splits, form).unwrap();
        let (mma_plan, mma_sync) = run_split(device, case, MlaPrefillKernel::MmaSync, Some(plan.num_splits), form).unwrap();
        assert!(plan.num_splits > 1, "{what}: {plan:?}");
        assert_eq!((plan.tile_rows, mma_plan.num_splits, mma_plan.tokens_per_split), (128, plan.num_splits, plan.tokens_per_split), "{what}: {mma_plan:?}");
        assert_matches_reference(&format!("o_lat (wgmma, {what})"), &wgmma, &case.want);
        assert_matches_reference(&format!("o_lat (mma.sync, {what})"), &mma_sync, &case.want);
        compare_wgmma_with_mma_sync(device, &format!("MLA prefill split-KV ({what}, {plan:?}, {form:?})"), &wgmma, &mma_sync);
        plan
    };
    let fresh = [(0usize, 512usize)];
    let plan = check("fresh 512, bf16", &case_of(false, 21, &fresh), Some(2), None);
    assert_eq!((plan.row_tiles, plan.num_splits, plan.tokens_per_split), (128, 2, 256));
    // The wrapper's plan for a fresh 512-token prompt: one split (128 row tiles fill one wave: `wgmma_plan`).
    assert_eq!(attention::wgmma_plan(1, 512 * HEADS, 512, None).unwrap().num_splits, 1);
    let chunked = [(300usize, 40usize), (0, 5), (37, 1)];
    for fp8 in [false, true] {
        let case = case_of(fp8, 23 + fp8 as u64, &chunked);
        let forced = if fp8 {
            [(Some(3), 128, SplitCombine::Launch), (Some(5), 96, SplitCombine::Fused)]
        } else {
            [(Some(2), 192, SplitCombine::Fused), (Some(4), 96, SplitCombine::Launch)]
        };
        for (splits, tokens_per_split, form) in forced.map(|(n, t, f)| (n, t, Some(f))).into_iter().chain([(None, 128, None)]) {
            let plan = check(&format!("chunked, fp8 {fp8}, {splits:?} splits"), &case, splits, form);
            assert_eq!((plan.row_tiles, plan.tokens_per_split), (10, tokens_per_split), "{plan:?}");
        }
    }
}

backend_tests!(wgmma_prefill_matches_the_reference_and_mma_sync, wgmma_split_kv_matches_mma_sync_split);

/// Which launches take the wgmma kernel: prefill, with one split or more (asked for, or the wrapper's), not decode; the
/// environment switch picks the kernel for the process, `run` overrides it on the thread, an unknown
/// value is a typed error. (The only test in this binary that sets the variable; the others pin the choice with
/// `run`.)
#[test]
fn the_choice_routes_prefill_only() {
    let device = small4::device::simulator();
    let case = case(false, 3);
    let plan_and_kernel = |splits: Option<usize>, q_start: &[i32]| -> (usize, String) {
        let tokens = *q_start.last().unwrap() as usize;
        let cache = PagedCache::from_bytes(&device, case.desc, &case.bytes).unwrap();
        let tables = BlockTables::upload(&device, &case.tables, &case.desc).unwrap();
        let layout = QueryLayout::upload(&device, q_start).unwrap();
        let q_lat = DeviceBuffer::from_slice(&device, &case.q_lat[..tokens * HEADS * LATENT]).unwrap();
        let q_rope = DeviceBuffer::from_slice(&device, &case.q_rope[..tokens * HEADS * ROPE]).unwrap();
        let queries = Queries { layout: &layout, q_lat: q_lat.view([tokens, HEADS, LATENT]).unwrap(), q_rope: q_rope.view([tokens * HEADS, ROPE]).unwrap() };
        let o_lat = DeviceBuffer::<bf16>::alloc(&device, tokens * HEADS * LATENT).unwrap();
        let mut scratch = AttentionScratch::new(&device);
        let plan =
            attention::mla_attention(&cache, &tables, &queries, o_lat.view([tokens, HEADS, LATENT]).unwrap(), SOFTMAX_SCALE, splits, &mut scratch).unwrap();
        (plan.num_splits, device.last_launch_counters().unwrap().kernel)
    };
    let prefill = [0, 6, 11, 12];
    let decode = [0, 1, 2, 3];
    // Unset: prefill on wgmma (one split asked for, the wrapper's at these lengths, and a forced split, its combine
    // fused at this grid), decode on mma.sync (one split and the heuristic's).
    assert_eq!(plan_and_kernel(Some(1), &prefill), (1, "mla_attention_wgmma_bf16".to_string()));
    assert_eq!(plan_and_kernel(None, &prefill), (1, "mla_attention_wgmma_bf16".to_string()));
    assert_eq!(plan_and_kernel(Some(2), &prefill), (2, "mla_attention_wgmma_bf16".to_string()));
    assert_eq!(plan_and_kernel(Some(1), &decode), (1, "mla_attention_bf16".to_string()));
    assert_eq!(plan_and_kernel(None, &decode).1, "mla_attention_bf16");
    std::env::set_var("SMALL4_MLA_PREFILL", "mma_sync");
    assert_eq!(MlaPrefillKernel::current().unwrap(), MlaPrefillKernel::MmaSync);
    assert_eq!(plan_and_kernel(Some(1), &prefill), (1, "mla_attention_bf16".to_string()));
    assert_eq!(MlaPrefillKernel::Wgmma.run(MlaPrefillKernel::current).unwrap(), MlaPrefillKernel::Wgmma);
    std::env::set_var("SMALL4_MLA_PREFILL", "wgmma");
    assert_eq!(MlaPrefillKernel::current().unwrap(), MlaPrefillKernel::Wgmma);
    std::env::set_var("SMALL4_MLA_PREFILL", "tensor_cores");
    assert!(matches!(MlaPrefillKernel::current(), Err(small4::Error::InvalidArgument(_))));
    std::env::remove_var("SMALL4_MLA_PREFILL");
    assert_eq!(MlaPrefillKernel::current().unwrap(), MlaPrefillKernel::Wgmma);
}

/// The PTX with `edit` applied to each line index `pick` returns true for (given the lines); panics if none matched.
fn edit_lines(ptx: &str, pick: impl Fn(&[&str], usize) -> bool, edit: impl Fn(&str) -> String) -> String {
    let lines: Vec<&str> = ptx.lines().collect();
    let picked: Vec<usize> = (0..lines.len()).filter(|&i| pick(&lines, i)).collect();
    assert!(!picked.is_empty(), "no line to edit");
    lines.iter().enumerate().map(|(i, l)| if picked.contains(&i) { edit(l) } else { l.to_string() }).collect::<Vec<_>>().join("\n")
}

/// Causal mask off by one: the mask's `key > position` compares (a setp.gt.s32 combined by or.pred with the
/// `key >= kv_end` test into the -inf select) become `key >= position`, so a row no longer sees its own token.
fn causal_off_by_one(ptx: &str) -> String {
    edit_lines(
        ptx,
        |l, i| l[i].trim_start().starts_with("setp.gt.s32") && l.get(i + 1).is_some_and(|n| n.trim_start().starts_with("or.pred")),
        |l| l.replacen("setp.gt.s32", "setp.ge.s32", 1),
    )
}

/// Wrong page: the producer's block-table entry (the first 32-bit global load after an mbarrier wait: the producer's
/// wait on "empty" precedes its table lookup) is XORed with 1, a neighbouring page of the (even-sized) pool.
fn wrong_page(ptx: &str) -> String {
    let lines: Vec<&str> = ptx.lines().collect();
    let wait = lines.iter().position(|l| l.contains("mbarrier.try_wait.parity")).expect("an mbarrier wait");
    let load = (wait..lines.len()).find(|&i| lines[i].trim_start().starts_with("ld.global.u32")).expect("the block-table load");
    let dst = lines[load].split_whitespace().nth(1).expect("a destination").trim_end_matches(',').to_string();
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    out.insert(load + 1, format!("\txor.b32 \t{dst}, {dst}, 1;"));
    out.join("\n")
}

/// The interpreter's checks and the comparisons are live on this kernel: each planted bug (an edit of the kernel's
/// own PTX) makes the attention fail with the hazard's report, or its output differ from the reference, where the
/// unedited kernel passes.
#[test]
fn planted_bugs_in_the_wgmma_prefill_are_caught() {
    let original = small4::kernels::modules::MLA_ATTENTION_WGMMA.ptx;
    let case = case(false, 11);
    let planted = |name: &str, ptx: String| Planted::edited(small4::kernels::modules::MLA_ATTENTION_WGMMA, "mla_attention_wgmma_bf16", name, ptx);
    let hazards: [(&str, String, &str); 4] = [
        // The softmax reads S while its wgmmas are in flight: the first wait_group retires nothing.
        ("s_not_retired", original.replacen("wgmma.wait_group.sync.aligned 0;", "wgmma.wait_group.sync.aligned 1;", 1), "accessed before the wgmma.wait_group"),
        // "empty" completes on one arrival: the producer may refill a stage other consumer warps still read.
        ("empty_after_one_warp", regex_free_replace(original, "mbarrier.init.shared::cta.b64 [", "], %r", "], 1;"), "the phase ran ahead"),
        // The cp.async tiles (and zero rows, and Q) reach wgmma (the async proxy) without fence.proxy.async.
        ("no_proxy_fence", without_proxy_fences(original), "no fence.proxy.async"),
        // Nobody waits on a barrier: the consumers read stages before anything landed there.
        ("no_waits", without_mbarrier_waits(original), "uninitialised shared memory"),
    ];
    for (name, ptx, expected) in hazards {
        assert_reported(name, run(&planted(name, ptx), &case, MlaPrefillKernel::Wgmma), expected);
    }
    // Wrong results without a hazard: the comparison with the reference catches them.
    for (name, ptx) in [("causal_off_by_one", causal_off_by_one(original)), ("wrong_page", wrong_page(original))] {
        let got = run(&planted(name, ptx), &case, MlaPrefillKernel::Wgmma).unwrap_or_else(|e| panic!("{name}: {e}"));
        // Off the reference by more than assert_matches_reference allows, or NaN.
        let off = |g: f32, w: f32| (g - w).abs().is_nan() || (g - w).abs() > 4.0 / 512.0 + w.abs() / 256.0;
        let wrong = got.iter().zip(&case.want).filter(|&(&g, &w)| off(g, w)).count();
        assert!(wrong > 0, "{name}: the output still matches the reference");
        println!("{name}: {wrong} of {} outputs off the reference", got.len());
    }
    let unedited = Planted::unedited(small4::kernels::modules::MLA_ATTENTION_WGMMA, "mla_attention_wgmma_bf16");
    assert_matches_reference("o_lat (unedited)", &run(&unedited, &case, MlaPrefillKernel::Wgmma).unwrap(), &case.want);
}

/// The interpreter's counters of both kernels on one prefill chunk at the real geometry: 256 new tokens after a
/// 768-token prefix, 32 heads, bf16 cache (128 row tiles of 64 rows, one split), 16 evenly spaced blocks interpreted
/// per launch. Prints one Markdown row per kernel for docs/perf.md:
/// `cargo test --test mla_wgmma prefill_counters -- --ignored --nocapture`.
#[test]
#[ignore]
fn prefill_counters_at_256_tokens_after_768() {
    let sim = Arc::new(small4::device::sim::SimBackend::new());
    let device: Device = sim.clone();
    sim.set_block_sample(Some(16));
    let (prefix, new) = (768usize, 256usize);
    let len = prefix + new;
    let mut r = rng(5);
    let desc = CacheDescriptor::mla(len.div_ceil(PAGE_SIZE), PAGE_SIZE, CacheDtype::Bf16).unwrap();
    let tables = BatchTables { block_tables: (0..desc.num_pages as i32).collect(), seq_lens: vec![len as i32], max_pages: desc.num_pages };
    let bytes: Vec<u8> = bytemuck::cast_slice(&random_bf16(&mut r, desc.total_bytes() / 2, 1.5)).to_vec();
    let cache = PagedCache::from_bytes(&device, desc, &bytes).unwrap();
    let block_tables = BlockTables::upload(&device, &tables, &desc).unwrap();
    let layout = QueryLayout::upload(&device, &[0, new as i32]).unwrap();
    let q_lat = DeviceBuffer::from_slice(&device, &random_bf16(&mut r, new * HEADS * LATENT, 1.0)).unwrap();
    let q_rope = DeviceBuffer::from_slice(&device, &random_bf16(&mut r, new * HEADS * ROPE, 1.0)).unwrap();
    let queries = Queries { layout: &layout, q_lat: q_lat.view([new, HEADS, LATENT]).unwrap(), q_rope: q_rope.view([new * HEADS, ROPE]).unwrap() };
    let o_lat = DeviceBuffer::<bf16>::alloc(&device, new * HEADS * LATENT).unwrap();
    let mut scratch = AttentionScratch::new(&device);
    println!("| kernel | blocks run / grid | warp instructions | shared requests | bank-conflict wavefronts | global bytes read | tensor instructions | tensor FLOPs |");
    println!("|---|---|---|---|---|---|---|---|");
    for kernel in [MlaPrefillKernel::MmaSync, MlaPrefillKernel::Wgmma] {
        kernel
            .run(|| attention::mla_attention(&cache, &block_tables, &queries, o_lat.view([new, HEADS, LATENT])?, SOFTMAX_SCALE, Some(1), &mut scratch))
            .unwrap();
        println!("| {} |", counter_cells(&device.last_launch_counters().unwrap()));
    }
}
