//! Paged MLA attention kernels (cache writer, decode, chunked prefill, split-KV combine) against the CPU reference,
//! on the interpreter and (when present) the GPU. Caches are checked by gathering their pages on the host into the
//! contiguous layout `reference::attention::latent_attention` reads.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use half::bf16;
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, Rng};
use small4::device::{Device, DeviceBuffer, LaunchCounters};
use small4::kernels::attention::{
    self, AttentionScratch, BlockTables, CacheWriteWeights, PagedCache, Queries, QueryLatentNorm, QueryLayout, SplitCombine, TokenSlots,
};
use small4::kernels::dense;
use small4::kernels::gemm::{DeviceWeights, RowCounters};
use small4::model::kv_cache::{BatchTables, CacheDescriptor, CacheDtype, KvCache, PageCopy};
use small4::quant::{repack, QuantizedMatrix, WeightFormat};
use small4::reference::attention::{latent_attention, MlaDims};
use small4::reference::{norm, rope};

const WIDTH: usize = 320;
const LATENT: usize = 256;
const ROPE: usize = 64;
const SOFTMAX_SCALE: f32 = 0.088_388_35; // 1/sqrt(128)
const FP8_SCALE: f32 = 0.75;
/// A block-table entry no cache has: sits in every slot past a sequence's pages (never dereferenced).
const UNUSED_ENTRY: i32 = i32::MAX;

fn dims(heads: usize) -> MlaDims {
    MlaDims { heads, kv_lora_rank: LATENT, qk_nope: 64, qk_rope: ROPE, v_head: 128 }
}

fn dtype(fp8: bool) -> CacheDtype {
    if fp8 {
        CacheDtype::Fp8E4m3 { scale: FP8_SCALE }
    } else {
        CacheDtype::Bf16
    }
}

/// Block tables over a shuffled page pool (plus a few pages no sequence owns).
fn random_tables(rng: &mut StdRng, lens: &[usize], page_size: usize, dtype: CacheDtype) -> (CacheDescriptor, BatchTables) {
    let pages_of = |len: usize| len.div_ceil(page_size);
    let used: usize = lens.iter().map(|&l| pages_of(l)).sum();
    let desc = CacheDescriptor::mla(used + 3, page_size, dtype).unwrap();
    let mut pool: Vec<i32> = (0..desc.num_pages as i32).collect();
    pool.shuffle(rng);
    let max_pages = lens.iter().map(|&l| pages_of(l)).max().unwrap_or(0) + 1;
    let mut block_tables = vec![UNUSED_ENTRY; lens.len() * max_pages];
    let mut next = pool.into_iter();
    for (row, &len) in block_tables.chunks_exact_mut(max_pages).zip(lens) {
        for entry in &mut row[..pages_of(len)] {
            *entry = next.next().unwrap();
        }
    }
    (desc, BatchTables { block_tables, seq_lens: lens.iter().map(|&l| l as i32).collect(), max_pages })
}

fn slot_offset(desc: &CacheDescriptor, tables: &BatchTables, seq: usize, pos: usize) -> usize {
    let page = tables.block_tables[seq * tables.max_pages + pos / desc.page_size] as usize;
    (page * desc.page_size + pos % desc.page_size) * desc.token_bytes()
}

/// A cache image whose used slots hold random values (never 0 or +-1) and every other byte 0xff (NaN bits).
fn random_cache_bytes(rng: &mut StdRng, desc: &CacheDescriptor, tables: &BatchTables) -> Vec<u8> {
    let mut bytes = vec![0xffu8; desc.total_bytes()];
    for (seq, &len) in tables.seq_lens.iter().enumerate() {
        for pos in 0..len as usize {
            let at = slot_offset(desc, tables, seq, pos);
            let token = &mut bytes[at..at + desc.token_bytes()];
            match desc.dtype {
                CacheDtype::Bf16 => token.copy_from_slice(bytemuck::cast_slice(&random_bf16(rng, WIDTH, 1.5))),
                // e4m3 with exponent field <= 7 (|x| < 2), never zero or NaN.
                CacheDtype::Fp8E4m3 { .. } => token.iter_mut().for_each(|b| *b = rng.random_range(1u8..0x40) | (rng.random::<u8>() & 0x80)),
            }
        }
    }
    bytes
}

/// Sequence `seq` of a paged cache image, dequantised into the contiguous [len, 320] f32 layout.
fn gather(desc: &CacheDescriptor, tables: &BatchTables, bytes: &[u8], seq: usize) -> Vec<f32> {
    let e = desc.dtype.bytes();
    (0..tables.seq_lens[seq] as usize)
        .flat_map(|pos| {
            let at = slot_offset(desc, tables, seq, pos);
            (0..WIDTH).map(move |i| desc.decode_element(&bytes[at + i * e..]))
        })
        .collect()
}

struct AttentionCase {
    lens: Vec<usize>,
    q_counts: Vec<usize>,
    heads: usize,
    page_size: usize,
    fp8: bool,
    splits: Option<usize>,
    seed: u64,
}

/// Runs one attention call on a random paged cache (poisoned output) and checks it against the reference.
/// Returns the output bits.
fn check_attention(device: &Device, case: &AttentionCase) -> Vec<u16> {
    check_attention_forms(device, case, &[None])
}

/// [`check_attention`] with the split combine in each form of `forms` in turn (`None`: the wrapper's own choice,
/// `SplitCombine::for_plan`), one scratch for all of them (so a fused form listed twice reuses the fused combine's
/// counters), the output poisoned before each call: every call's bits must be equal, and the first matches the
/// reference.
fn check_attention_forms(device: &Device, case: &AttentionCase, forms: &[Option<SplitCombine>]) -> Vec<u16> {
    let mut rng = rng(case.seed);
    let (desc, tables) = random_tables(&mut rng, &case.lens, case.page_size, dtype(case.fp8));
    let bytes = random_cache_bytes(&mut rng, &desc, &tables);
    let tokens: usize = case.q_counts.iter().sum();
    let h = case.heads;
    let q_lat = random_bf16(&mut rng, tokens * h * LATENT, 1.0);
    let q_rope = random_bf16(&mut rng, tokens * h * ROPE, 1.0);
    let mut q_start = vec![0i32];
    for &q in &case.q_counts {
        q_start.push(q_start.last().unwrap() + q as i32);
    }

    let cache = PagedCache::from_bytes(device, desc, &bytes).unwrap();
    let block_tables = BlockTables::upload(device, &tables, &desc).unwrap();
    let q_lat_dev = DeviceBuffer::from_slice(device, &q_lat).unwrap();
    // Odd seeds read q_rope in place from wider rows (the rope columns of [nope 64 | rope 64] query heads, as the
    // engine passes them), the other columns NaN; even seeds from packed rows.
    let rope_stride = if case.seed % 2 == 1 { 2 * ROPE } else { ROPE };
    let wide: Vec<bf16> = (0..tokens * h * rope_stride)
        .map(|i| if i % rope_stride < rope_stride - ROPE { bf16::NAN } else { q_rope[i / rope_stride * ROPE + i % rope_stride - (rope_stride - ROPE)] })
        .collect();
    let q_rope_dev = DeviceBuffer::from_slice(device, &wide).unwrap();
    let layout = QueryLayout::upload(device, &q_start).unwrap();
    let queries = Queries {
        layout: &layout,
        q_lat: q_lat_dev.view([tokens, h, LATENT]).unwrap(),
        q_rope: q_rope_dev.view([tokens * h, rope_stride]).unwrap().columns(rope_stride - ROPE..rope_stride).unwrap(),
    };
    let mut scratch = AttentionScratch::new(device);
    let mut outputs = forms.iter().map(|&form| {
        let o_lat = DeviceBuffer::<bf16>::filled_with_byte(device, tokens * h * LATENT, 0xff).unwrap();
        let o_view = o_lat.view([tokens, h, LATENT]).unwrap();
        let call = |scratch: &mut AttentionScratch| attention::mla_attention(&cache, &block_tables, &queries, o_view, SOFTMAX_SCALE, case.splits, scratch);
        let plan = match form {
            Some(form) => form.run(|| call(&mut scratch)),
            None => call(&mut scratch),
        }
        .unwrap();
        (plan, o_lat.to_vec().unwrap())
    });
    let (plan, got) = outputs.next().expect("at least one form");
    for (i, (other_plan, other)) in outputs.enumerate() {
        assert_eq!(other_plan, plan);
        let differ = got.iter().zip(&other).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differ, 0, "call {} ({:?}) differs from the first ({:?}) in {differ} values; {plan:?}", i + 1, forms[i + 1], forms[0]);
    }

    let (q_lat, q_rope) = (to_f32(&q_lat), to_f32(&q_rope));
    let mut want = Vec::with_capacity(tokens * h * LATENT);
    for (seq, (&len, &count)) in case.lens.iter().zip(&case.q_counts).enumerate() {
        let first = q_start[seq] as usize;
        let positions: Vec<usize> = (len - count..len).collect();
        let cache_seq = gather(&desc, &tables, &bytes, seq);
        want.extend(latent_attention(
            &q_lat[first * h * LATENT..(first + count) * h * LATENT],
            &q_rope[first * h * ROPE..(first + count) * h * ROPE],
            &cache_seq,
            &positions,
            &dims(h),
            SOFTMAX_SCALE,
        ));
    }
    // The kernel rounds the probabilities to bf16 for the P.V product (2^-9 relative each, so at most 2^-9 of the
    // largest cache value) and the output to bf16 (2^-9 relative); values here are below 2.
    assert_close("o_lat", &to_f32(&got), &want, 2.0 * 2.0 / 512.0, 1.0 / 256.0);
    got.iter().map(|v| v.to_bits()).collect()
}

fn decode_matches_reference(device: &Device) {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 10, ..ProptestConfig::default() });
    let len = prop_oneof![Just(1usize), Just(54), Just(97), 2usize..130];
    let strategy = (
        proptest::collection::vec(len, 1..4),
        prop_oneof![Just(1usize), Just(16), Just(64)],
        any::<bool>(),
        prop_oneof![Just(None), Just(Some(1usize)), Just(Some(2)), Just(Some(3))],
        prop_oneof![Just(4usize), Just(3)],
        any::<u64>(),
    );
    runner
        .run(&strategy, |(lens, page_size, fp8, splits, heads, seed)| {
            let q_counts = vec![1; lens.len()];
            check_attention(device, &AttentionCase { lens, q_counts, heads, page_size, fp8, splits, seed });
            Ok(())
        })
        .unwrap();
}

fn prefill_matches_reference(device: &Device) {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 8, ..ProptestConfig::default() });
    // (cached prefix, new tokens) per sequence: the new tokens attend to the prefix and causally to each other.
    let seq = (prop_oneof![Just(0usize), Just(53), 1usize..80], 1usize..24);
    let strategy = (
        proptest::collection::vec(seq, 1..3),
        prop_oneof![Just(1usize), Just(16), Just(64)],
        any::<bool>(),
        prop_oneof![Just(None), Just(Some(2usize))],
        prop_oneof![Just(4usize), Just(2)],
        any::<u64>(),
    );
    runner
        .run(&strategy, |(seqs, page_size, fp8, splits, heads, seed)| {
            let lens = seqs.iter().map(|(prefix, new)| prefix + new).collect();
            let q_counts = seqs.iter().map(|&(_, new)| new).collect();
            check_attention(device, &AttentionCase { lens, q_counts, heads, page_size, fp8, splits, seed });
            Ok(())
        })
        .unwrap();
}

fn long_decode_matches_reference(device: &Device) {
    for (fp8, splits) in [(false, None), (true, Some(5))] {
        let case = AttentionCase { lens: vec![333, 97], q_counts: vec![1, 1], heads: 4, page_size: 16, fp8, splits, seed: 11 };
        check_attention(device, &case);
    }
}

/// The real head count (32: two warps share every cache tile) and an awkward one (20: a part-empty second warp),
/// decode and prefill.
fn many_heads_match_reference(device: &Device) {
    for (heads, q_counts, splits) in [(32, vec![1, 1], Some(2)), (20, vec![3, 1], None)] {
        let case = AttentionCase { lens: vec![97, 54], q_counts, heads, page_size: 64, fp8: false, splits, seed: heads as u64 };
        check_attention(device, &case);
    }
}

/// The split combine fused into the attention launch (the last split block of each row tile combines) equals the
/// combine as its own launch bit for bit, at the real geometry (32 heads, latent 256 + rope 64) with bf16 and fp8
/// caches over shuffled page tables: one sequence long enough for many splits (the heuristic's count and a forced
/// one), sequences of different lengths (splits past a short one's end hold no key), and prefill rows over two row
/// tiles; grids of at most one block per SM (8-warp blocks, helper warps combining too) and of more. Each fused launch
/// runs twice on one scratch: the second is right only if the first left its counters at 0.
fn fused_split_combine_equals_the_combine_launch(device: &Device) {
    let (fused, launch) = (Some(SplitCombine::Fused), Some(SplitCombine::Launch));
    let cases = [
        (vec![1000], vec![1], false, None),
        (vec![1000], vec![1], true, Some(7)),
        (vec![700, 97, 333], vec![1, 1, 1], true, None),
        (vec![260, 41], vec![3, 1], false, Some(4)),
        // 135 split blocks, more than the SMs: no helper warps, the 2 row warps combine.
        (vec![4300], vec![1], false, Some(135)),
        // Splits of one and two key tiles: the warp ring (every launch without helper warps: the combine launch's form
        // here) before its slots wrap, against the helper warps' two stages.
        (vec![190, 64], vec![1, 1], false, Some(3)),
        (vec![95, 33], vec![1, 1], true, Some(3)),
    ];
    for (seed, (lens, q_counts, fp8, splits)) in cases.into_iter().enumerate() {
        let case = AttentionCase { lens, q_counts, heads: 32, page_size: 16, fp8, splits, seed: 40 + seed as u64 };
        check_attention_forms(device, &case, &[launch, fused, fused, None]);
    }
}

/// The heuristic's half-warp row tiles (8 heads a tile, rows 8-15 of the row warp's mma tiles padding: decode of one to
/// a few sequences at 32 heads) compute every row exactly as the full 16- or 32-row tiles of a forced split count
/// do, at the same splits: equal bit for bit (and to the reference), bf16 and fp8 caches, one and three sequences.
fn half_warp_tiles_equal_full_tiles(device: &Device) {
    for (seed, (lens, fp8)) in [(vec![1000usize], false), (vec![700, 97, 333], true)].into_iter().enumerate() {
        let heads = 32;
        let max_kv = *lens.iter().max().unwrap();
        let half = attention::AttentionPlan::new(lens.len(), heads, max_kv, None).unwrap();
        let full = attention::AttentionPlan::new(lens.len(), heads, max_kv, Some(half.num_splits)).unwrap();
        assert_eq!((half.tile_rows, half.row_tiles), (8, 4), "{half:?}");
        assert_eq!((full.tile_rows, full.num_splits, full.tokens_per_split), (32, half.num_splits, half.tokens_per_split), "{full:?}");
        let case = |splits| AttentionCase { lens: lens.clone(), q_counts: vec![1; lens.len()], heads, page_size: 64, fp8, splits, seed: 70 + seed as u64 };
        let (got_half, got_full) = (check_attention(device, &case(None)), check_attention(device, &case(Some(half.num_splits))));
        let differ = got_half.iter().zip(&got_full).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "{lens:?}: 8-row tiles differ from full tiles in {differ} values");
    }
}

/// The wrapper's own choice of the split combine follows the grid (`SplitCombine::for_plan`): fused (one launch) up to
/// one block per SM or up to 16 splits a tile, a second launch above both; the chosen form equals both forced forms
/// bit for bit and the reference. Sequences cut into one-tile splits: 3 x 44 (132 blocks, at most one per SM), 3 x 45
/// (135 blocks of 45 splits) and 34 x 4 (136 blocks of 4 splits).
fn split_combine_form_follows_the_grid(device: &Device) {
    let (fused, launch) = (vec!["mla_attention_bf16"], vec!["mla_attention_bf16", "mla_attention_combine"]);
    for (seqs, splits, form, kernels) in [(3, 44, SplitCombine::Fused, &fused), (3, 45, SplitCombine::Launch, &launch), (34, 4, SplitCombine::Fused, &fused)] {
        let len = splits * 32;
        let plan = attention::AttentionPlan::new(seqs, 4, len, Some(splits)).unwrap();
        assert_eq!(plan.num_splits, splits);
        assert_eq!(SplitCombine::for_plan(&plan, seqs), form, "{plan:?}");
        let launched: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = launched.clone();
        let hooked: Device = Arc::new(Hooked {
            before_launch: Box::new(move |kernel| {
                seen.lock().unwrap().push(kernel.entry.to_string());
                Ok(())
            }),
            ..Hooked::new(device.clone())
        });
        let case = AttentionCase { lens: vec![len; seqs], q_counts: vec![1; seqs], heads: 4, page_size: 16, fp8: false, splits: Some(splits), seed: 60 };
        check_attention_forms(&hooked, &case, &[None, Some(SplitCombine::Fused), Some(SplitCombine::Launch)]);
        // The calls in order: the chosen form's launches first, then the forced forms' (fused: one, launch: two).
        let launched = launched.lock().unwrap().clone();
        let attention_calls: Vec<&str> = launched.iter().map(String::as_str).filter(|k| k.starts_with("mla_attention")).collect();
        assert_eq!(attention_calls[..kernels.len()], kernels[..], "{splits} splits: {launched:?}");
        assert_eq!(attention_calls.len(), kernels.len() + 3, "{splits} splits: {launched:?}");
    }
}

fn attention_is_deterministic(device: &Device) {
    let case = AttentionCase { lens: vec![150, 54], q_counts: vec![3, 1], heads: 4, page_size: 16, fp8: false, splits: Some(3), seed: 5 };
    assert_eq!(check_attention(device, &case), check_attention(device, &case));
}

fn cache_writer_matches_reference(device: &Device) {
    let yarn = rope::YarnParams { theta: 1e4, factor: 128.0, original_max_position: 8192, beta_fast: 32.0, beta_slow: 1.0 };
    let inv_freq = rope::yarn_inv_freq(ROPE, &yarn);
    let eps = 1e-6;
    for (page_size, fp8) in [(1usize, false), (16, true), (64, false), (64, true)] {
        let mut rng = rng(page_size as u64 + fp8 as u64);
        let lens = [5usize, 70, 1];
        let (desc, tables) = random_tables(&mut rng, &lens, page_size, dtype(fp8));
        // Every token of every sequence, in a shuffled order; kv rows padded (stride 328) like a fused projection.
        let mut order: Vec<(i32, i32)> = lens.iter().enumerate().flat_map(|(s, &l)| (0..l as i32).map(move |p| (s as i32, p))).collect();
        order.shuffle(&mut rng);
        let stride = WIDTH + 8;
        let kv = random_bf16(&mut rng, order.len() * stride, 3.0);
        let weight = random_bf16(&mut rng, LATENT, 2.0);

        let cache = PagedCache::filled_with_byte(device, desc, 0xff).unwrap();
        let block_tables = BlockTables::upload(device, &tables, &desc).unwrap();
        let kv_dev = DeviceBuffer::from_slice(device, &kv).unwrap();
        let weight_dev = DeviceBuffer::from_slice(device, &weight).unwrap();
        let inv_freq_dev = DeviceBuffer::from_slice(device, &inv_freq).unwrap();
        let weights = CacheWriteWeights { norm_weight: weight_dev.as_vector(), eps, inv_freq: inv_freq_dev.as_vector() };
        let (token_seq, positions): (Vec<i32>, Vec<i32>) = order.iter().copied().unzip();
        let slots = TokenSlots::upload(device, &token_seq, &positions).unwrap();
        let kv_rows = kv_dev.view([order.len(), stride]).unwrap().columns(0..WIDTH).unwrap();
        attention::mla_cache_write(&cache, &block_tables, kv_rows, &weights, &slots).unwrap();
        let bytes = cache.to_bytes().unwrap();

        let mut written = vec![false; desc.total_bytes()];
        for (t, &(seq, pos)) in order.iter().enumerate() {
            let row = to_f32(&kv[t * stride..t * stride + WIDTH]);
            let mut want = norm::rms_norm(&row[..LATENT], &to_f32(&weight), eps);
            let mut k_rope = row[LATENT..].to_vec();
            rope::apply_interleaved(&mut k_rope, &inv_freq, pos as usize);
            want.extend(k_rope);
            let at = slot_offset(&desc, &tables, seq as usize, pos as usize);
            written[at..at + desc.token_bytes()].iter_mut().for_each(|w| *w = true);
            let got: Vec<f32> = (0..WIDTH).map(|i| desc.decode_element(&bytes[at + i * desc.dtype.bytes()..])).collect();
            // One rounding to the cache type from an f32 value that may differ from the reference's in the last bits:
            // bf16 half-ulp 2^-9 relative (plus a margin), e4m3 a full ulp 2^-3 relative or the subnormal step.
            let (abs, rel) = if fp8 { (FP8_SCALE * 2f32.powi(-9), 0.125) } else { (1e-6, 1.0 / 256.0) };
            assert_close(&format!("cache row (page size {page_size}, fp8 {fp8}, seq {seq}, pos {pos})"), &got, &want, abs, rel);
        }
        assert!(bytes.iter().zip(&written).all(|(&b, &w)| w || b == 0xff), "the writer touched a slot it was not given");
    }
}

/// RoPE at long-context positions (up to ~2^18, where pos * inv_freq is ~2.6e5 rad and one rounded f32 product would
/// be off by ~0.01 rad): a 262,000-token sequence whose block table maps every page onto a 4-page pool.
fn cache_writer_rotates_far_positions(device: &Device) {
    let yarn = rope::YarnParams { theta: 1e4, factor: 128.0, original_max_position: 8192, beta_fast: 32.0, beta_slow: 1.0 };
    let inv_freq = rope::yarn_inv_freq(ROPE, &yarn);
    let (page_size, len) = (256usize, 262_000usize);
    let desc = CacheDescriptor::mla(4, page_size, CacheDtype::Bf16).unwrap();
    let max_pages = len.div_ceil(page_size);
    let tables = BatchTables { block_tables: (0..max_pages as i32).map(|p| p % 4).collect(), seq_lens: vec![len as i32], max_pages };
    // Positions whose (page % 4, offset) slots are distinct.
    let positions = [261_999i32, 200_003, 131_071, 65_537, 8_197, 3];
    let mut rng = rng(9);
    let kv = random_bf16(&mut rng, positions.len() * WIDTH, 3.0);
    let weight = random_bf16(&mut rng, LATENT, 2.0);
    let cache = PagedCache::filled_with_byte(device, desc, 0xff).unwrap();
    let block_tables = BlockTables::upload(device, &tables, &desc).unwrap();
    let (kv_dev, weight_dev, inv_freq_dev) = (
        DeviceBuffer::from_slice(device, &kv).unwrap(),
        DeviceBuffer::from_slice(device, &weight).unwrap(),
        DeviceBuffer::from_slice(device, &inv_freq).unwrap(),
    );
    let weights = CacheWriteWeights { norm_weight: weight_dev.as_vector(), eps: 1e-6, inv_freq: inv_freq_dev.as_vector() };
    let slots = TokenSlots::upload(device, &vec![0; positions.len()], &positions).unwrap();
    attention::mla_cache_write(&cache, &block_tables, kv_dev.view([positions.len(), WIDTH]).unwrap(), &weights, &slots).unwrap();
    let bytes = cache.to_bytes().unwrap();
    for (t, &pos) in positions.iter().enumerate() {
        let mut want = to_f32(&kv[t * WIDTH + LATENT..(t + 1) * WIDTH]);
        rope::apply_interleaved(&mut want, &inv_freq, pos as usize);
        let at = slot_offset(&desc, &tables, 0, pos as usize) + LATENT * 2;
        let got: Vec<f32> = (0..ROPE).map(|i| desc.decode_element(&bytes[at + 2 * i..])).collect();
        // bf16 rounding of values below 3 (2^-8 relative) plus a few f32 ulps of sin/cos.
        assert_close(&format!("k_rope at position {pos}"), &got, &want, 1e-5, 1.0 / 200.0);
    }
}

/// Copy-on-write through the allocator: a forked sequence appends into a shared, partly filled page; the device copy
/// the allocator asks for must reproduce the page, leaving every other page untouched.
fn copy_on_write_pages(device: &Device) {
    let desc = CacheDescriptor::mla(6, 16, CacheDtype::Fp8E4m3 { scale: FP8_SCALE }).unwrap();
    let mut kv = KvCache::new(desc).unwrap();
    let parent = kv.add_sequence();
    kv.append(parent, 20).unwrap();
    let child = kv.fork(parent).unwrap();
    let plan = kv.append(child, 3).unwrap();
    assert_eq!(plan.copies.len(), 1);
    let mut rng = rng(4);
    let bytes: Vec<u8> = (0..desc.total_bytes()).map(|_| rng.random()).collect();
    let cache = PagedCache::from_bytes(device, desc, &bytes).unwrap();
    cache.copy_pages(&plan.copies).unwrap();
    let mut want = bytes.clone();
    let (src, dst, page) = (plan.copies[0].src as usize, plan.copies[0].dst as usize, desc.page_bytes());
    want.copy_within(src * page..(src + 1) * page, dst * page);
    assert!(cache.to_bytes().unwrap() == want, "page copy differs");
    let bad = [PageCopy { src: 0, dst: 1 }, PageCopy { src: 1, dst: 2 }];
    assert!(matches!(cache.copy_pages(&bad), Err(small4::Error::InvalidArgument(_))));
    assert!(matches!(cache.copy_pages(&[PageCopy { src: 0, dst: 6 }]), Err(small4::Error::OutOfRange { .. })));
}

fn wrappers_reject_bad_input(device: &Device) {
    let mut rng = rng(3);
    let (desc, mut tables) = random_tables(&mut rng, &[40, 3], 16, CacheDtype::Bf16);
    let cache = PagedCache::filled_with_byte(device, desc, 0xff).unwrap();
    let good = BlockTables::upload(device, &tables, &desc).unwrap();
    let q = DeviceBuffer::<bf16>::filled_with_byte(device, 2 * 4 * LATENT, 0x11).unwrap();
    let r = DeviceBuffer::<bf16>::filled_with_byte(device, 2 * 4 * ROPE, 0x11).unwrap();
    let o = DeviceBuffer::<bf16>::alloc(device, 2 * 4 * LATENT).unwrap();

    // A page index past the pool, inside a sequence's pages: refused before any launch.
    tables.block_tables[1] = desc.num_pages as i32;
    let err = BlockTables::upload(device, &tables, &desc).err().unwrap();
    assert!(matches!(err, small4::Error::OutOfRange { .. }), "{err}");
    // Views whose head counts disagree (q_rope, o_lat), more queries than cached tokens, a bad scale, a decreasing
    // layout.
    let mut scratch = AttentionScratch::new(device);
    let decode = QueryLayout::decode(device, 2).unwrap();
    let attend = |layout: &QueryLayout, [q_heads, rope_heads, o_heads]: [usize; 3], cache: &PagedCache, scale: f32, scratch: &mut AttentionScratch| {
        let queries = Queries { layout, q_lat: q.view([2, q_heads, LATENT]).unwrap(), q_rope: r.view([2 * rope_heads, ROPE]).unwrap() };
        attention::mla_attention(cache, &good, &queries, o.view([2, o_heads, LATENT]).unwrap(), scale, None, scratch).unwrap_err()
    };
    let err = attend(&decode, [3, 4, 3], &cache, SOFTMAX_SCALE, &mut scratch);
    assert!(matches!(err, small4::Error::Shape { .. }), "{err}");
    let err = attend(&decode, [4, 4, 3], &cache, SOFTMAX_SCALE, &mut scratch);
    assert!(matches!(err, small4::Error::Shape { .. }), "{err}");
    let err = attend(&QueryLayout::upload(device, &[0, 1, 5]).unwrap(), [4, 4, 4], &cache, SOFTMAX_SCALE, &mut scratch);
    assert!(matches!(err, small4::Error::OutOfRange { .. }), "{err}");
    let err = attend(&decode, [4, 4, 4], &cache, f32::NAN, &mut scratch);
    assert!(matches!(err, small4::Error::InvalidArgument(_)), "{err}");
    // Query rows one head apart are not the packed [tokens, heads, 256] the kernel indexes.
    let strided_q = small4::kernels::TensorView::strided(&q, 0, [2, 3, LATENT], 4 * LATENT).unwrap();
    let queries = Queries { layout: &decode, q_lat: strided_q, q_rope: r.view([2 * 3, ROPE]).unwrap() };
    let err = attention::mla_attention(&cache, &good, &queries, o.view([2, 3, LATENT]).unwrap(), SOFTMAX_SCALE, None, &mut scratch).unwrap_err();
    assert!(matches!(err, small4::Error::InvalidArgument(_)), "{err}");
    assert!(matches!(QueryLayout::upload(device, &[0, 2, 1]), Err(small4::Error::InvalidArgument(_))));
    // The cache writer refuses a position past the sequence's length and an unknown sequence.
    let kv = DeviceBuffer::<bf16>::filled_with_byte(device, 2 * WIDTH + 8, 0x11).unwrap();
    let w = DeviceBuffer::<bf16>::filled_with_byte(device, LATENT, 0x11).unwrap();
    let f = DeviceBuffer::<f32>::filled_with_byte(device, ROPE / 2, 0x11).unwrap();
    let weights = CacheWriteWeights { norm_weight: w.as_vector(), eps: 1e-6, inv_freq: f.as_vector() };
    for (seq, pos) in [(1, 3), (2, 0), (0, -1)] {
        let slots = TokenSlots::upload(device, &[seq], &[pos]).unwrap();
        let err = attention::mla_cache_write(&cache, &good, kv.view([1, WIDTH]).unwrap(), &weights, &slots).unwrap_err();
        assert!(matches!(err, small4::Error::OutOfRange { .. }), "{err}");
    }
    // ... and kv rows without the rope part, two rows for one token, rows 324 apart (not 16 bytes), a row that starts
    // 8 bytes in, a norm weight of the wrong length.
    let slots = TokenSlots::upload(device, &[0], &[0]).unwrap();
    let write = |kv, weights: &CacheWriteWeights| attention::mla_cache_write(&cache, &good, kv, weights, &slots).unwrap_err();
    let err = write(kv.view([1, LATENT]).unwrap(), &weights);
    assert!(matches!(err, small4::Error::Shape { .. }), "{err}");
    let err = write(kv.view([2, WIDTH]).unwrap(), &weights);
    assert!(matches!(err, small4::Error::Shape { .. }), "{err}");
    let two_slots = TokenSlots::upload(device, &[0, 0], &[0, 1]).unwrap();
    let odd_stride = small4::kernels::TensorView::strided(&kv, 0, [2, WIDTH], WIDTH + 4).unwrap();
    let err = attention::mla_cache_write(&cache, &good, odd_stride, &weights, &two_slots).unwrap_err();
    assert!(matches!(err, small4::Error::InvalidArgument(_)), "{err}");
    let err = write(small4::kernels::TensorView::strided(&kv, 4, [1, WIDTH], WIDTH).unwrap(), &weights);
    assert!(matches!(err, small4::Error::InvalidArgument(_)), "{err}");
    let short_weight = CacheWriteWeights { norm_weight: w.view([LATENT - 8]).unwrap(), ..weights };
    let err = write(kv.view([1, WIDTH]).unwrap(), &short_weight);
    assert!(matches!(err, small4::Error::Shape { .. }), "{err}");
    // Tables checked for another cache geometry.
    let other = PagedCache::filled_with_byte(device, CacheDescriptor::mla(desc.num_pages, 64, CacheDtype::Bf16).unwrap(), 0).unwrap();
    let err = attend(&decode, [4, 4, 4], &other, SOFTMAX_SCALE, &mut scratch);
    assert!(matches!(err, small4::Error::InvalidArgument(_)), "{err}");
}

/// `latent_projection` (the stacked wq_a + wkv_a GEMM finishing each token's row with the q latent's RMSNorm and the
/// cache write, one launch) gives bit for bit `dense::linear`, `rms_norm` and `mla_cache_write` one after the other:
/// bf16 and fp8 caches, 1 / 3 decode tokens (the decode kernel) and 76 prefill tokens (tiled), two weight formats, and the
/// real reduction length (dim 4096) at one token.
fn latent_projection_equals_the_launches_apart(device: &Device) {
    let cases = [
        (&[5usize, 70, 1][..], false, WeightFormat::Bf16, 256),
        (&[5, 70, 1], true, WeightFormat::Nvfp4, 256),
        (&[9], true, WeightFormat::Bf16, 256),
        (&[4, 2, 7], false, WeightFormat::Fp8Block128, 256),
        (&[3], false, WeightFormat::Bf16, 4096),
    ];
    for (case, &(lens, fp8, format, dim)) in cases.iter().enumerate() {
        check_latent_projection(device, 60 + case as u64, lens, fp8, format, dim, None);
    }
}

/// The latent projection with split k at batch 1 (`DeviceWeights::set_decode_k_splits`; the real one has 22 column
/// blocks and 8 splits, on the decode kernel): its row finisher runs once every split of every column block is in, bit for bit the launches
/// apart (same splits), twice on the same counters, and its GEMM output agrees with the CPU reference. The formats
/// the attention projections come in, K = 4096 and 2048, 2 and 6 splits (6: uneven k ranges).
fn latent_projection_split_k_equals_the_launches_apart(device: &Device) {
    let cases =
        [(WeightFormat::Bf16, 4096, 6), (WeightFormat::Fp8PerTensor, 2048, 2), (WeightFormat::Fp8Block128, 4096, 2), (WeightFormat::Fp8Block128, 2048, 6)];
    for (case, &(format, dim, splits)) in cases.iter().enumerate() {
        check_latent_projection(device, 80 + case as u64, &[7], case % 2 == 1, format, dim, Some(splits));
    }
}

/// One case of the two tests above: sequences of `lens` tokens (decode: the last of each; the prefill shape
/// `[_, 70, _]`: all of them), weights of `format` over `dim` inputs, split into `splits` k ranges at decode when
/// given (else the upload's choice), a bf16 or `fp8` cache. With `splits`, also the GEMM output against the CPU
/// reference (`assert_agrees`).
fn check_latent_projection(device: &Device, seed: u64, lens: &[usize], fp8: bool, format: WeightFormat, dim: usize, splits: Option<usize>) {
    let yarn = rope::YarnParams { theta: 1e4, factor: 128.0, original_max_position: 8192, beta_fast: 32.0, beta_slow: 1.0 };
    let inv_freq = rope::yarn_inv_freq(ROPE, &yarn);
    let mut rng = rng(seed);
    let q_rank = 128;
    let (desc, tables) = random_tables(&mut rng, lens, 16, dtype(fp8));
    // The new tokens: the last of each sequence at decode (one length), else all of them, shuffled.
    let mut order: Vec<(i32, i32)> = if lens.len() == 3 && lens[1] == 70 {
        lens.iter().enumerate().flat_map(|(s, &l)| (0..l as i32).map(move |p| (s as i32, p))).collect()
    } else {
        lens.iter().enumerate().map(|(s, &l)| (s as i32, l as i32 - 1)).collect()
    };
    order.shuffle(&mut rng);
    let tokens = order.len();
    let w: Vec<f32> = (0..(q_rank + WIDTH) * dim).map(|_| rng.random_range(-1.0f32..1.0) / (dim as f32).sqrt()).collect();
    let w = QuantizedMatrix::quantize(format, &w, q_rank + WIDTH, dim).unwrap();
    let deq = w.dequantize_for_gemm();
    let mut w = DeviceWeights::upload(device, &repack::repack_linear(&[(&w).into()]).unwrap()).unwrap();
    if let Some(splits) = splits {
        w.set_decode_k_splits(splits).unwrap();
    }
    let w = w;
    let upload = |v: &[bf16]| DeviceBuffer::from_slice(device, v).unwrap();
    let h_host = random_bf16(&mut rng, tokens * dim, 1.0);
    let (h, q_weight, kv_weight) = (upload(&h_host), upload(&random_bf16(&mut rng, q_rank, 1.0)), upload(&random_bf16(&mut rng, LATENT, 2.0)));
    let inv_freq_dev = DeviceBuffer::from_slice(device, &inv_freq).unwrap();
    let block_tables = BlockTables::upload(device, &tables, &desc).unwrap();
    let (token_seq, positions): (Vec<i32>, Vec<i32>) = order.iter().copied().unzip();
    let slots = TokenSlots::upload(device, &token_seq, &positions).unwrap();
    let write = CacheWriteWeights { norm_weight: kv_weight.as_vector(), eps: 1e-6, inv_freq: inv_freq_dev.as_vector() };
    let counters = RowCounters::new(device, tokens).unwrap();
    let run = |fused: bool| {
        let cache = PagedCache::filled_with_byte(device, desc, 0xff).unwrap();
        let qkv_a = DeviceBuffer::<bf16>::filled_with_byte(device, tokens * (q_rank + WIDTH), 0xff).unwrap();
        let q_out = DeviceBuffer::<bf16>::filled_with_byte(device, tokens * q_rank, 0xff).unwrap();
        let qkv_view = qkv_a.view([tokens, q_rank + WIDTH]).unwrap();
        let q_norm = QueryLatentNorm { weight: q_weight.as_vector(), out: q_out.view([tokens, q_rank]).unwrap(), eps: 1e-6 };
        let hv = h.view([tokens, dim]).unwrap();
        if fused {
            attention::latent_projection(&w, hv, qkv_view, &q_norm, &cache, &block_tables, &write, &slots, &counters, None).unwrap();
        } else {
            dense::linear(&w, hv, qkv_view).unwrap();
            small4::kernels::norm::rms_norm(qkv_view.columns(0..q_rank).unwrap(), q_norm.weight, q_norm.out, q_norm.eps).unwrap();
            attention::mla_cache_write(&cache, &block_tables, qkv_view.columns(q_rank..q_rank + WIDTH).unwrap(), &write, &slots).unwrap();
        }
        let as_bits = |b: &DeviceBuffer<bf16>| b.to_vec().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        (as_bits(&qkv_a), as_bits(&q_out), cache.to_bytes().unwrap())
    };
    let apart = run(false);
    for launch in 0..2 {
        assert_eq!(run(true), apart, "seed {seed} ({format}, fp8 cache {fp8}, {tokens} tokens, splits {splits:?}): fused launch {launch}");
    }
    assert!(apart.1.iter().all(|&b| !bf16::from_bits(b).is_nan()), "case {seed}: a q latent left unnormed");
    if splits.is_some() {
        let to_f32 = |v: &[bf16]| v.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
        let want = small4::reference::linear::matmul_nt(&to_f32(&h_host), &deq, tokens, dim, q_rank + WIDTH);
        let got: Vec<f32> = apart.0.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
        assert_agrees(&format!("latent projection {format} K {dim} splits {splits:?}"), &got, &want);
    }
}

backend_tests!(
    latent_projection_equals_the_launches_apart,
    latent_projection_split_k_equals_the_launches_apart,
    decode_matches_reference,
    prefill_matches_reference,
    long_decode_matches_reference,
    many_heads_match_reference,
    fused_split_combine_equals_the_combine_launch,
    half_warp_tiles_equal_full_tiles,
    split_combine_form_follows_the_grid,
    attention_is_deterministic,
    cache_writer_matches_reference,
    cache_writer_rotates_far_positions,
    copy_on_write_pages,
    wrappers_reject_bad_input
);

/// Traffic of decode at the real head count (32) on the interpreter: sector bytes of the attention launch (one launch
/// with or without splits: the split combine runs in it) over the ideal bytes (cache rows read once + q + o). Prints
/// the table of docs/perf.md and
/// requires each row's total / ideal and (total - partials) / ideal within 0.01 of it (~4 s on the interpreter); the
/// split rows are the heuristic's choice (`None`: a change of `MIN_SPLIT_TOKENS` moves them) and fixed counts.
/// `cargo test --test attention -- --nocapture decode_traffic_at_real_heads`
#[test]
fn decode_traffic_at_real_heads() {
    let heads = 32;
    println!("| cache | batch x context | splits | ideal B (cache+q+o) | attention launch sectors B (combine included) | total / ideal | partials B (write+read) | (total - partials) / ideal |");
    println!("|---|---|---|---|---|---|---|---|");
    let ragged = || vec![1000, 2500, 1700, 3001];
    // (fp8 cache, context lengths, splits, docs/perf.md's total / ideal and (total - partials) / ideal)
    for (fp8, lens, splits, figures) in [
        (false, vec![4096], Some(1), [1.009, 1.009]),
        (false, vec![4096], Some(16), [1.533, 1.135]),
        (false, vec![4096], None, [5.086, 4.291]),
        (true, vec![4096], Some(1), [1.018, 1.018]),
        (false, ragged(), Some(1), [1.015, 1.015]),
        (false, ragged(), Some(12), [1.537, 1.133]),
        (false, ragged(), None, [2.731, 2.180]),
    ] {
        // Every launch's counters: there must be exactly one, split or not.
        let launches: Arc<Mutex<Vec<LaunchCounters>>> = Arc::default();
        let kept = launches.clone();
        let device: Device = Arc::new(Hooked {
            after_launch: Box::new(move |inner| kept.lock().unwrap().extend(inner.last_launch_counters())),
            ..Hooked::new(small4::device::simulator())
        });
        let mut rng = rng(1);
        let (desc, tables) = random_tables(&mut rng, &lens, 64, dtype(fp8));
        let bytes = random_cache_bytes(&mut rng, &desc, &tables);
        let batch = lens.len();
        let cache = PagedCache::from_bytes(&device, desc, &bytes).unwrap();
        let block_tables = BlockTables::upload(&device, &tables, &desc).unwrap();
        let q_lat = DeviceBuffer::from_slice(&device, &random_bf16(&mut rng, batch * heads * LATENT, 1.0)).unwrap();
        let q_rope = DeviceBuffer::from_slice(&device, &random_bf16(&mut rng, batch * heads * ROPE, 1.0)).unwrap();
        let o_lat = DeviceBuffer::<bf16>::filled_with_byte(&device, batch * heads * LATENT, 0xff).unwrap();
        launches.lock().unwrap().clear();
        let layout = QueryLayout::decode(&device, batch).unwrap();
        let queries = Queries { layout: &layout, q_lat: q_lat.view([batch, heads, LATENT]).unwrap(), q_rope: q_rope.view([batch * heads, ROPE]).unwrap() };
        let mut scratch = AttentionScratch::new(&device);
        let plan = attention::mla_attention(&cache, &block_tables, &queries, o_lat.view([batch, heads, LATENT]).unwrap(), SOFTMAX_SCALE, splits, &mut scratch)
            .unwrap();
        let launches = launches.lock().unwrap().clone();
        let kernels: Vec<&str> = launches.iter().map(|c| c.kernel.as_str()).collect();
        assert_eq!(kernels, [if fp8 { "mla_attention_fp8" } else { "mla_attention_bf16" }], "{} splits", plan.num_splits);
        let context: usize = lens.iter().sum();
        let ideal = (context * desc.token_bytes() + batch * heads * (WIDTH + LATENT) * 2) as u64;
        let total = launches[0].sector_bytes();
        // f32 partials (256 values + max + sum per row) of every split that holds keys of a sequence, written by the
        // split blocks and read back by the last one of each row tile.
        let partials: u64 =
            if plan.num_splits > 1 { lens.iter().map(|&l| (2 * heads * l.div_ceil(plan.tokens_per_split) * (LATENT + 2) * 4) as u64).sum() } else { 0 };
        println!(
            "| {} | {} x {:?} | {} | {} | {} | {:.3} | {} | {:.3} |",
            if fp8 { "fp8" } else { "bf16" },
            batch,
            lens,
            plan.num_splits,
            ideal,
            total,
            total as f64 / ideal as f64,
            partials,
            (total - partials) as f64 / ideal as f64
        );
        let ratios = [total as f64 / ideal as f64, (total - partials) as f64 / ideal as f64];
        for (what, ratio, figure) in [("total / ideal", ratios[0], figures[0]), ("(total - partials) / ideal", ratios[1], figures[1])] {
            assert!(
                ratio <= figure + 0.01,
                "{} cache, {lens:?}, {} splits: {what} {ratio:.3} above docs/perf.md's {figure} + 0.01",
                if fp8 { "fp8" } else { "bf16" },
                plan.num_splits
            );
        }
    }
}
