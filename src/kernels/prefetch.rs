//! Cross-kernel L2 prefetch (`cuda/include/l2_prefetch.cuh`): a launch that takes it asks L2 to fetch bytes a LATER
//! kernel of the decode step reads, while it runs.
//!
//! At batch 1 a decode step alternates DRAM-bound GEMMs (the attention projections, the experts) with latency-bound
//! kernels (the per-head absorption GEMMs, MLA, the router) during which HBM is mostly idle. Those small kernels take
//! an [`L2Prefetch`] of the next big GEMM's weights (wo's during absorption and MLA: `model::decode_prefetch`'s plan,
//! which gives the router none at present), so the GEMM finds part of its weights in L2 (50 MiB on an H100 SXM
//! or H200) and the bytes streamed in time that was idle. Weights are written by no kernel, so the prefetch is issued
//! first thing, before a programmatic launch's wait. It is a hint: no output depends on it (the tests compare outputs
//! with and without it bit for bit).
//!
//! Which kernels issue it: the decode GEMM kernel (`moe_gemm_*_decode[_split]`, so [`super::dense::linear_per_head`]'s
//! decode launches), `mla_attention_{bf16,fp8}` and `router_topk_decode`; the other kernels of those families ignore it.
//!
//! ```
//! use small4::device::simulator;
//! use small4::kernels::gemm::DeviceWeights;
//! use small4::kernels::prefetch::L2Prefetch;
//! use small4::quant::{repack::repack_linear, QuantizedMatrix, WeightFormat};
//!
//! let device = simulator();
//! // W [128, 256] bf16: 8 tiles of 16 rows x 4 k blocks of 64, 2 KiB a tile and k block.
//! let w = QuantizedMatrix::quantize(WeightFormat::Bf16, &vec![0.5; 128 * 256], 128, 256)?;
//! let w = DeviceWeights::upload(&device, &repack_linear(&[(&w).into()])?)?;
//! // k blocks 1..3 of every tile: 8 runs of 4 KiB.
//! let p = L2Prefetch::k_blocks(&w, 1..3)?;
//! assert_eq!(p.bytes(), 8 * 4096);
//! assert_eq!(L2Prefetch::k_blocks(&w, 0..4)?.bytes(), w.data.bytes() as u64);
//! // Three launches in a row with budgets (16 KiB a k block here): as many k blocks as fit, each after the last,
//! // to the matrix's end; nothing where not one fits.
//! let [a, b, c] = L2Prefetch::consecutive(&w, [10_000, 40_000, 1 << 20])?;
//! assert_eq!([a.bytes(), b.bytes(), c.bytes()], [0, 2 * 16384, 2 * 16384]);
//! assert!(L2Prefetch::k_blocks(&w, 3..5).is_err()); // past the matrix's 4 k blocks
//! # Ok::<(), small4::Error>(())
//! ```

use std::ops::Range;

use super::gemm::DeviceWeights;
use super::params::{L2Prefetch as RawPrefetch, L2PrefetchRange};
use crate::error::{Error, Result};
use crate::quant::repack::tile_bytes;
use crate::quant::WeightFormat;

/// K elements per repacked k block (the tiles' 64-k width).
const K_BLOCK: usize = 64;
/// Rows per repacked weight tile.
const TILE_ROWS: usize = 16;

/// Up to two byte ranges of a later kernel's weights (the weights and their k-dependent scales) for a launch to pull
/// into L2; [`L2Prefetch::NONE`] asks for nothing. Made from a matrix's k blocks ([`L2Prefetch::k_blocks`]), so the
/// ranges cover the same fraction of every weight tile and every block of the later GEMM finds that fraction in L2.
#[derive(Clone, Copy, Debug, Default)]
pub struct L2Prefetch {
    raw: RawPrefetch,
}

impl L2Prefetch {
    /// Nothing to prefetch.
    pub const NONE: L2Prefetch =
        L2Prefetch { raw: RawPrefetch { range: [L2PrefetchRange { base: std::ptr::null(), stride: 0, segment_bytes: 0, segments: 0 }; 2] } };

    /// The bytes of k blocks `k_blocks` (of 64 k each) of every 16-row tile of the one matrix `w`: its weight codes
    /// and, for int4, nvfp4 and fp8 block-128, the scales of those k (int4 zero points and per-row scales, under 1%
    /// of the bytes, are not included).
    ///
    /// `Error::InvalidArgument` when `w` holds several matrices or the range is empty or past `w`'s k blocks;
    /// `Error::OutOfRange` when a run exceeds the kernel's 32-bit lengths.
    pub fn k_blocks(w: &DeviceWeights, k_blocks: Range<usize>) -> Result<Self> {
        let total = w.k_dim / K_BLOCK;
        if w.experts != 1 || k_blocks.is_empty() || k_blocks.end > total {
            return Err(Error::InvalidArgument(format!(
                "L2 prefetch: k blocks {k_blocks:?} of {} matrices of {total} k blocks (one matrix, a non-empty range within it)",
                w.experts
            )));
        }
        let tiles = w.rows_padded / TILE_ROWS;
        let tile = tile_bytes(w.format);
        let weights = strided(w.data.addr(), tile, total, tiles, k_blocks.clone())?;
        let scales = match w.format {
            // [rows_padded / 16, k_dim / 64, 64 bytes]: the scales of one tile and k block in 64 bytes.
            WeightFormat::Nvfp4 => w.fp4_scales.as_ref().map(|s| strided(s.addr(), 64, total, tiles, k_blocks.clone())).transpose()?,
            // [rows_padded / 16, k_dim / group, 16] bf16: 32 bytes a tile and group; the groups the k blocks touch.
            WeightFormat::Int4 { .. } => {
                let groups = k_blocks.start * K_BLOCK / w.group..(k_blocks.end * K_BLOCK).div_ceil(w.group);
                w.group_scales.as_ref().map(|s| strided(s.addr(), 32, w.k_dim / w.group, tiles, groups)).transpose()?
            }
            // [k_dim / 128, rows_padded / 8] f32: one run, the 128-k blocks the k blocks touch.
            WeightFormat::Fp8Block128 => w
                .block_scales
                .as_ref()
                .map(|s| strided(s.addr(), w.rows_padded / 8 * 4, total.div_ceil(2), 1, k_blocks.start / 2..k_blocks.end.div_ceil(2)))
                .transpose()?,
            _ => None,
        };
        Ok(L2Prefetch { raw: RawPrefetch { range: [weights, scales.unwrap_or(L2Prefetch::NONE.raw.range[1])] } })
    }

    /// Consecutive k-block runs of the one matrix `w` for launches one after another, launch i taking as many k
    /// blocks as fit in `budgets[i]` bytes (weights and scales) after launch i - 1's, up to the matrix's end
    /// ([`L2Prefetch::NONE`] for a launch where not one k block fits or none is left).
    ///
    /// `Error::InvalidArgument` when `w` holds several matrices.
    pub fn consecutive<const N: usize>(w: &DeviceWeights, budgets: [u64; N]) -> Result<[Self; N]> {
        let total = w.k_dim / K_BLOCK;
        let per_k_block = L2Prefetch::k_blocks(w, 0..1)?.bytes();
        let mut first = 0;
        let mut out = [L2Prefetch::NONE; N];
        for (slot, budget) in out.iter_mut().zip(budgets) {
            let end = (first + (budget / per_k_block) as usize).min(total);
            if end > first {
                *slot = L2Prefetch::k_blocks(w, first..end)?;
                first = end;
            }
        }
        Ok(out)
    }

    /// The bytes the launch asks L2 to fetch.
    pub fn bytes(&self) -> u64 {
        self.raw.range.iter().map(|r| r.segment_bytes as u64 * r.segments as u64).sum()
    }

    /// The parameter struct a launch of `blocks` blocks takes: at most [`MAX_BYTES_PER_BLOCK`] a block, whole
    /// tiles' runs dropped from the end of each range (weights first) past that.
    pub(crate) fn for_grid(&self, blocks: u64) -> RawPrefetch {
        let mut left = blocks.saturating_mul(MAX_BYTES_PER_BLOCK);
        let mut raw = self.raw;
        for r in raw.range.iter_mut() {
            if r.segment_bytes == 0 {
                continue;
            }
            r.segments = (r.segments as u64).min(left / r.segment_bytes as u64) as u32;
            left -= r.segments as u64 * r.segment_bytes as u64;
            if r.segments == 0 {
                *r = L2Prefetch::NONE.raw.range[0];
            }
        }
        raw
    }
}

/// The most bytes one block of an issuing launch asks for: 16 pieces of 16 KiB. How fast one SM's copy engine
/// works through bulk prefetches is not measured here; the cap keeps a grid of few blocks (MLA at a short context:
/// 2-4 blocks) from taking a matrix's worth onto a few SMs, while a 132-block grid still covers 33 MiB (all of wo's
/// 32 MiB in bf16).
pub const MAX_BYTES_PER_BLOCK: u64 = 256 * 1024;

/// Units `units` of `unit` bytes each out of rows of `per_row` units, for `rows` rows from `base`.
fn strided(base: u64, unit: usize, per_row: usize, rows: usize, units: Range<usize>) -> Result<L2PrefetchRange> {
    let segment = units.len() * unit;
    let too_long = |what: &str, v: usize| Error::OutOfRange { what: format!("L2 prefetch {what}"), index: v as i64, limit: u32::MAX as i64 };
    Ok(L2PrefetchRange {
        base: (base + (units.start * unit) as u64) as *const u8,
        stride: (per_row * unit) as u64,
        segment_bytes: u32::try_from(segment).map_err(|_| too_long("run bytes", segment))?,
        segments: u32::try_from(rows).map_err(|_| too_long("runs", rows))?,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::device::simulator;
    use crate::quant::repack::repack_linear;
    use crate::quant::QuantizedMatrix;

    /// One [rows, k] matrix of 0.25 in `format` on the interpreter.
    pub(crate) fn weights(format: WeightFormat, rows: usize, k: usize) -> DeviceWeights {
        let w = QuantizedMatrix::quantize(format, &vec![0.25; rows * k], rows, k).unwrap();
        DeviceWeights::upload(&simulator(), &repack_linear(&[(&w).into()]).unwrap()).unwrap()
    }

    #[test]
    fn each_format_covers_its_codes_and_k_dependent_scales() {
        // [256, 512]: 16 tiles, 8 k blocks; k blocks 2..6 are half of every tile.
        for format in [WeightFormat::Bf16, WeightFormat::Fp8PerTensor, WeightFormat::Fp8Block128, WeightFormat::INT4_G128, WeightFormat::Nvfp4] {
            let w = weights(format, 256, 512);
            let p = L2Prefetch::k_blocks(&w, 2..6).unwrap();
            let [codes, scales] = p.raw.range;
            assert_eq!((codes.segments, codes.segment_bytes as usize), (16, 4 * tile_bytes(format)), "{format}");
            assert_eq!(codes.base as u64, w.data.addr() + 2 * tile_bytes(format) as u64, "{format}");
            assert_eq!(codes.stride as usize, 8 * tile_bytes(format), "{format}");
            let scale_bytes = match format {
                // 64 bytes a tile and k block.
                WeightFormat::Nvfp4 => 16 * 4 * 64,
                // Group 128 = 2 k blocks: groups 1..3 of 4, 32 bytes a tile and group.
                WeightFormat::Int4 { .. } => 16 * 2 * 32,
                // 128-k blocks 1..3 of [4, 256 / 8] f32.
                WeightFormat::Fp8Block128 => 2 * 32 * 4,
                _ => 0,
            };
            assert_eq!(scales.segment_bytes as u64 * scales.segments as u64, scale_bytes, "{format}");
            assert_eq!(p.bytes(), 16 * 4 * tile_bytes(format) as u64 + scale_bytes, "{format}");
            // Every run starts and steps on 16 bytes, as cp.async.bulk.prefetch needs.
            for r in p.raw.range.iter().filter(|r| r.segment_bytes > 0) {
                assert!(r.base as u64 % 16 == 0 && r.stride % 16 == 0 && r.segment_bytes % 16 == 0, "{format}");
            }
        }
    }

    #[test]
    fn a_grid_takes_at_most_its_blocks_share() {
        // [4096, 4096] bf16: 256 runs of 2 KiB a k block; 64 k blocks = 32 MiB.
        let w = weights(WeightFormat::Bf16, 4096, 4096);
        let all = L2Prefetch::k_blocks(&w, 0..64).unwrap();
        assert_eq!(all.bytes(), 32 << 20);
        // 132 blocks may take 33 MiB: all of it.
        assert_eq!(all.for_grid(132).range[0].segments, 256);
        // 4 blocks: 1 MiB = 8 of the 128 KiB runs.
        assert_eq!(all.for_grid(4).range[0].segments, 8);
        // No block: nothing, the range emptied.
        assert_eq!(all.for_grid(0).range[0].segment_bytes, 0);
    }

    #[test]
    fn bad_ranges_are_typed_errors() {
        let w = weights(WeightFormat::Bf16, 128, 256);
        // Empty, reversed, past the end.
        for range in [0..0, Range { start: 2, end: 1 }, 3..5] {
            assert!(matches!(L2Prefetch::k_blocks(&w, range.clone()), Err(Error::InvalidArgument(_))), "{range:?}");
        }
    }
}
