//! The paged MLA cache on the host side: page allocator, per-sequence block tables, append, fork with copy-on-write
//! prefix sharing, free; and the arrays the attention kernels read (block tables, sequence lengths).
//!
//! This module owns the bookkeeping only: which physical page holds which tokens. The cache memory itself
//! (`[num_pages, page_size, 320]` of bf16 or fp8 e4m3) lives on the device (`kernels::attention::PagedCache`).
//! Every operation either succeeds completely or returns an error and changes nothing.
//!
//! A tour: two sequences share a prefix through `fork`, and the first append into the shared, partly filled page
//! makes the appender's private copy (a [`PageCopy`] the engine runs on the device before writing).
//!
//! ```
//! use small4::model::kv_cache::{AppendPlan, BatchTables, CacheDescriptor, CacheDtype, KvCache, PageCopy, SeqId};
//!
//! // 4 pages of 16 tokens; each token is 256 latent + 64 rope values of bf16.
//! let mut cache = KvCache::new(CacheDescriptor::mla(4, 16, CacheDtype::Bf16)?)?;
//! assert_eq!(cache.descriptor().page_size, 16);
//!
//! let parent = cache.add_sequence();
//! let plan: AppendPlan = cache.append(parent, 20)?; // a full page and 4 tokens of a second
//! assert_eq!((plan.first_position, plan.count, plan.copies.len()), (0, 20, 0));
//! assert_eq!(cache.block_table(parent)?, &[0, 1]); // free pages are handed out in a fixed order
//!
//! let child: SeqId = cache.fork(parent)?; // shares both pages: nothing is copied yet
//! assert_eq!((cache.refcount(0)?, cache.refcount(1)?), (2, 2));
//! assert_eq!(cache.sequence_ids().collect::<Vec<_>>(), vec![parent, child]);
//!
//! // The child appends into page 1, still the parent's too: it gets page 2 as a copy of page 1 first.
//! let plan = cache.append(child, 1)?;
//! assert_eq!(plan.first_position, 20);
//! assert_eq!(plan.copies, vec![PageCopy { src: 1, dst: 2 }]);
//! assert_eq!(cache.block_table(child)?, &[0, 2]);
//! assert_eq!((cache.refcount(0)?, cache.refcount(1)?, cache.refcount(2)?), (2, 1, 1));
//! // Token 20 of the child lives in page 2 at offset 4.
//! assert_eq!(cache.slot(child, 20)?, 2 * 16 + 4);
//! assert!(cache.slot(child, 21).is_err()); // past its length
//!
//! // What the attention kernels read for a batch of both: rows padded to the longest with -1.
//! let tables: BatchTables = cache.batch_tables(&[parent, child])?;
//! assert_eq!(tables.max_pages, 2);
//! assert_eq!(tables.block_tables, vec![0, 1, 0, 2]);
//! assert_eq!(tables.seq_lens, vec![20, 21]);
//!
//! cache.free(parent)?; // page 0 is still the child's; page 1 was the parent's alone
//! assert_eq!(cache.free_pages(), 2);
//! cache.free(child)?;
//! assert_eq!(cache.free_pages(), 4);
//! assert!(cache.free(child).is_err()); // UnknownSequence: freeing twice is an error
//! # Ok::<(), small4::Error>(())
//! ```
//!
//! Sizes come from the [`CacheDescriptor`], and fp8 pages hold e4m3 codes times one scale:
//!
//! ```
//! use small4::model::kv_cache::{e4m3_to_f32, CacheDescriptor, CacheDtype, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
//!
//! let desc = CacheDescriptor::mla(8, DEFAULT_PAGE_SIZE, CacheDtype::Bf16)?;
//! assert_eq!(desc.token_width(), 256 + 64);
//! assert_eq!(desc.token_bytes(), 320 * 2);
//! assert_eq!(desc.page_bytes(), DEFAULT_PAGE_SIZE * 640);
//! assert_eq!(desc.total_bytes(), 8 * desc.page_bytes());
//! assert_eq!(desc.pages_for(DEFAULT_PAGE_SIZE + 1), 2);
//! assert_eq!(desc.decode_element(&half::bf16::from_f32(1.5).to_le_bytes()), 1.5);
//!
//! // validate() refuses what the kernels cannot index: pages past MAX_PAGE_SIZE, a non-positive fp8 scale.
//! assert!(CacheDescriptor::mla(8, MAX_PAGE_SIZE + 1, CacheDtype::Bf16).is_err());
//! let bad = CacheDescriptor { dtype: CacheDtype::Fp8E4m3 { scale: 0.0 }, ..desc };
//! assert!(bad.validate().is_err());
//!
//! let fp8 = CacheDescriptor::mla(8, 16, CacheDtype::Fp8E4m3 { scale: 0.5 })?;
//! assert_eq!(fp8.token_bytes(), 320); // one byte per value
//! assert_eq!(e4m3_to_f32(0x38), 1.0); // exponent 7 (the bias), mantissa 0
//! assert_eq!(fp8.decode_element(&[0x38]), 0.5); // times the scale
//! assert_eq!(e4m3_to_f32(0xc0), -2.0);
//! assert!(e4m3_to_f32(0x7f).is_nan()); // the "fn" variant: no infinities, 0x7f is NaN
//! # Ok::<(), small4::Error>(())
//! ```

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Largest supported page size (tokens per page).
pub const MAX_PAGE_SIZE: usize = 256;
/// The engine's default page size in tokens (`EngineOptions::default`, `small4 bench`).
pub const DEFAULT_PAGE_SIZE: usize = 64;

/// Element type of the cache.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CacheDtype {
    /// bf16, 2 bytes per value.
    Bf16,
    /// FP8 e4m3 with one per-tensor scale: value = e4m3 * scale.
    Fp8E4m3 {
        /// The dequantisation scale; finite and above 0.
        scale: f32,
    },
}

impl CacheDtype {
    /// Bytes per stored value: 2 for bf16, 1 for e4m3.
    pub fn bytes(&self) -> usize {
        match self {
            CacheDtype::Bf16 => 2,
            CacheDtype::Fp8E4m3 { .. } => 1,
        }
    }
}

/// Shape and element type of a paged latent cache (one layer).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CacheDescriptor {
    /// Pages in the pool (each layer has its own pool of this many).
    pub num_pages: usize,
    /// Tokens per page, `1..=MAX_PAGE_SIZE`.
    pub page_size: usize,
    /// Latent values per token (256 for Mistral Small 4).
    pub kv_lora_rank: usize,
    /// Rope-key values per token after the latent (64).
    pub qk_rope: usize,
    /// Element type of the stored values.
    pub dtype: CacheDtype,
}

impl CacheDescriptor {
    /// Mistral Small 4's geometry (latent 256 + rope 64) with the given pages; errors as [`CacheDescriptor::validate`].
    pub fn mla(num_pages: usize, page_size: usize, dtype: CacheDtype) -> Result<Self> {
        let desc = CacheDescriptor { num_pages, page_size, kv_lora_rank: 256, qk_rope: 64, dtype };
        desc.validate()?;
        Ok(desc)
    }

    /// `Error::InvalidArgument` for a page size outside `1..=MAX_PAGE_SIZE`, no pages, more than `i32::MAX` token
    /// slots in all (the kernels index slots in 32 bits), or an fp8 scale that is not finite and positive.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_PAGE_SIZE).contains(&self.page_size) {
            return Err(Error::InvalidArgument(format!("page size {} outside 1..={MAX_PAGE_SIZE}", self.page_size)));
        }
        if self.num_pages == 0 || self.num_pages.saturating_mul(self.page_size) > i32::MAX as usize {
            return Err(Error::InvalidArgument(format!("{} pages of {} tokens", self.num_pages, self.page_size)));
        }
        if let CacheDtype::Fp8E4m3 { scale } = self.dtype {
            if !(scale.is_finite() && scale > 0.0) {
                return Err(Error::InvalidArgument(format!("fp8 cache scale {scale} must be finite and > 0")));
            }
        }
        Ok(())
    }

    /// Values per token: `[latent | rope]`.
    pub fn token_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope
    }
    /// Bytes per token of one layer.
    pub fn token_bytes(&self) -> usize {
        self.token_width() * self.dtype.bytes()
    }
    /// Bytes per page of one layer.
    pub fn page_bytes(&self) -> usize {
        self.page_size * self.token_bytes()
    }
    /// Bytes of the whole pool of one layer.
    pub fn total_bytes(&self) -> usize {
        self.num_pages * self.page_bytes()
    }
    /// Pages that hold `tokens` tokens.
    pub fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.page_size)
    }

    /// One stored element as f32 (the dequantised value the attention reference reads).
    pub fn decode_element(&self, bytes: &[u8]) -> f32 {
        match self.dtype {
            CacheDtype::Bf16 => half::bf16::from_le_bytes([bytes[0], bytes[1]]).to_f32(),
            CacheDtype::Fp8E4m3 { scale } => e4m3_to_f32(bytes[0]) * scale,
        }
    }
}

/// FP8 e4m3 (OCP "fn" variant: no infinities, 0x7f / 0xff are NaN) to f32, exact.
pub fn e4m3_to_f32(byte: u8) -> f32 {
    let sign = if byte & 0x80 != 0 { -1.0 } else { 1.0 };
    let exponent = ((byte >> 3) & 0xf) as i32;
    let mantissa = (byte & 0x7) as f32;
    if exponent == 0xf && byte & 0x7 == 0x7 {
        return f32::NAN;
    }
    if exponent == 0 {
        sign * mantissa / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + mantissa / 8.0) * 2f32.powi(exponent - 7)
    }
}

/// A sequence handle. Ids are never reused within one `KvCache`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeqId(pub u64);

/// A device page copy the engine must issue before writing new tokens (copy-on-write of a shared page);
/// `kernels::attention::PagedCache::copy_pages` runs a batch of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageCopy {
    /// The shared page to copy from.
    pub src: u32,
    /// The fresh private page that replaces it in the appending sequence's block table.
    pub dst: u32,
}

/// Slots reserved by `append`: positions `first_position..first_position + count` of the sequence, after the
/// `copies` have been applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendPlan {
    /// Position of the first reserved token (the sequence's length before the append).
    pub first_position: usize,
    /// Tokens reserved.
    pub count: usize,
    /// Page copies to run on the device before writing the new tokens (at most one).
    pub copies: Vec<PageCopy>,
}

/// Block tables and lengths of a batch of sequences, laid out as the kernels read them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchTables {
    /// `[num_seqs, max_pages]`; entries past a sequence's last page are -1.
    pub block_tables: Vec<i32>,
    /// `[num_seqs]`: tokens in each sequence.
    pub seq_lens: Vec<i32>,
    /// Row length of `block_tables`: the most pages any of the sequences has, at least 1.
    pub max_pages: usize,
}

#[derive(Clone, Debug, Default)]
struct Sequence {
    pages: Vec<u32>,
    len: usize,
}

/// Page allocator and block tables.
///
/// ```
/// use small4::model::kv_cache::{CacheDescriptor, CacheDtype, KvCache};
///
/// let mut cache = KvCache::new(CacheDescriptor::mla(4, 16, CacheDtype::Bf16)?)?;
/// let seq = cache.add_sequence();
/// cache.append(seq, 20)?; // two pages of 16 tokens
/// assert_eq!((cache.len(seq)?, cache.free_pages()), (20, 2));
/// assert!(cache.append(seq, 64).is_err()); // OutOfPages, nothing changed
/// cache.free(seq)?;
/// assert_eq!(cache.free_pages(), 4);
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct KvCache {
    desc: CacheDescriptor,
    refcounts: Vec<u32>,
    /// Free pages, popped from the end (deterministic order).
    free: Vec<u32>,
    sequences: BTreeMap<SeqId, Sequence>,
    next_id: u64,
}

impl KvCache {
    /// An empty cache with every page of `desc` free; errors as [`CacheDescriptor::validate`].
    pub fn new(desc: CacheDescriptor) -> Result<Self> {
        desc.validate()?;
        let free = (0..desc.num_pages as u32).rev().collect();
        Ok(KvCache { desc, refcounts: vec![0; desc.num_pages], free, sequences: BTreeMap::new(), next_id: 0 })
    }

    /// The geometry it was created with.
    pub fn descriptor(&self) -> &CacheDescriptor {
        &self.desc
    }
    /// Pages no sequence references.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }
    /// How many block-table entries (over all sequences) point at `page`; `Error::OutOfRange` past the last page.
    pub fn refcount(&self, page: u32) -> Result<u32> {
        self.refcounts.get(page as usize).copied().ok_or_else(|| out_of_range("page", page as usize, self.desc.num_pages))
    }

    /// A new, empty sequence.
    pub fn add_sequence(&mut self) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.sequences.insert(id, Sequence::default());
        id
    }

    /// The live sequences, in increasing id order.
    pub fn sequence_ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.sequences.keys().copied()
    }

    fn sequence(&self, id: SeqId) -> Result<&Sequence> {
        self.sequences.get(&id).ok_or(Error::UnknownSequence(id.0))
    }

    /// Tokens the sequence holds; `Error::UnknownSequence` for an id not live in this cache.
    pub fn len(&self, id: SeqId) -> Result<usize> {
        Ok(self.sequence(id)?.len)
    }

    /// Free pages `append(id, count)` would take (a copy-on-write of a shared partial page included), without taking
    /// them; `Error::UnknownSequence` for an id not live here.
    ///
    /// ```
    /// use small4::model::kv_cache::{CacheDescriptor, CacheDtype, KvCache};
    ///
    /// let mut cache = KvCache::new(CacheDescriptor::mla(8, 16, CacheDtype::Bf16)?)?;
    /// let seq = cache.add_sequence();
    /// assert_eq!(cache.pages_needed(seq, 20)?, 2);
    /// cache.append(seq, 20)?;
    /// assert_eq!((cache.pages_needed(seq, 12)?, cache.pages_needed(seq, 13)?), (0, 1)); // 12 fit the second page
    /// let child = cache.fork(seq)?; // shares the partly filled second page
    /// assert_eq!(cache.pages_needed(child, 1)?, 1); // its copy
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn pages_needed(&self, id: SeqId, count: usize) -> Result<usize> {
        let seq = self.sequence(id)?;
        let page_size = self.desc.page_size;
        let cow = count > 0 && seq.len % page_size != 0 && self.refcounts[seq.pages[seq.len / page_size] as usize] > 1;
        Ok(self.desc.pages_for(seq.len.saturating_add(count)).saturating_sub(seq.pages.len()) + cow as usize)
    }

    /// Positions the sequence's pages hold (its length plus what `reserve` took ahead); `Error::UnknownSequence`
    /// for an id not live here.
    pub fn capacity(&self, id: SeqId) -> Result<usize> {
        Ok(self.sequence(id)?.pages.len() * self.desc.page_size)
    }

    /// The sequence's pages in token order; `Error::UnknownSequence` for an id not live in this cache.
    pub fn block_table(&self, id: SeqId) -> Result<&[u32]> {
        Ok(&self.sequence(id)?.pages)
    }

    /// The physical slot (page * page_size + offset) of token `position` of a sequence. `Error::UnknownSequence`
    /// for an id not live here, `Error::OutOfRange` for a position at or past its length.
    pub fn slot(&self, id: SeqId, position: usize) -> Result<usize> {
        let seq = self.sequence(id)?;
        if position >= seq.len {
            return Err(out_of_range("token position", position, seq.len));
        }
        Ok(seq.pages[position / self.desc.page_size] as usize * self.desc.page_size + position % self.desc.page_size)
    }

    /// Reserves `count` new token slots at the end of a sequence. When the sequence's last page is shared with
    /// another sequence and partly filled, it is first replaced by a private copy (returned in `copies`: the engine
    /// copies the page on the device before writing). Fails with `OutOfPages` and changes nothing when the pages
    /// needed are not free. `Error::UnknownSequence` for an id not live here, `Error::OutOfRange` when the length
    /// would pass `i32::MAX`.
    pub fn append(&mut self, id: SeqId, count: usize) -> Result<AppendPlan> {
        let page_size = self.desc.page_size;
        let seq = self.sequence(id)?;
        let len = seq.len;
        let new_len = len
            .checked_add(count)
            .filter(|&n| n <= i32::MAX as usize)
            .ok_or_else(|| out_of_range("sequence length", len + count.min(i32::MAX as usize), i32::MAX as usize))?;
        // The page that position `len` falls in, when it is partly filled (it exists: it holds position len - 1).
        let partial = (len % page_size != 0).then_some(len / page_size);
        let copy_on_write = count > 0 && partial.is_some_and(|p| self.refcounts[seq.pages[p] as usize] > 1);
        // Pages reserved ahead (`reserve`) already cover some or all of the new positions.
        let needed = self.desc.pages_for(new_len).saturating_sub(seq.pages.len()) + copy_on_write as usize;
        if needed > self.free.len() {
            return Err(Error::OutOfPages { needed, free: self.free.len() });
        }
        let mut copies = Vec::new();
        let mut fresh: Vec<u32> = (0..needed).map(|_| self.free.pop().unwrap()).collect();
        let seq = self.sequences.get_mut(&id).unwrap();
        if copy_on_write {
            let dst = fresh.remove(0);
            let src = std::mem::replace(&mut seq.pages[partial.unwrap()], dst);
            self.refcounts[src as usize] -= 1;
            self.refcounts[dst as usize] = 1;
            copies.push(PageCopy { src, dst });
        }
        for page in fresh {
            self.refcounts[page as usize] = 1;
            seq.pages.push(page);
        }
        seq.len = new_len;
        Ok(AppendPlan { first_position: len, count, copies })
    }

    /// Pages for `tokens` more positions after the sequence's length, taken now (as many as the free pages allow)
    /// so that the next appends need none: a decode step's block-table row then stays the same for many steps and a
    /// replayed graph needs no table upload. The length does not change; `free` returns reserved pages with the
    /// rest. Returns the pages taken. `Error::UnknownSequence` for an id not live here.
    ///
    /// ```
    /// use small4::model::kv_cache::{CacheDescriptor, CacheDtype, KvCache};
    ///
    /// let mut cache = KvCache::new(CacheDescriptor::mla(8, 16, CacheDtype::Bf16)?)?;
    /// let seq = cache.add_sequence();
    /// cache.append(seq, 10)?; // one page
    /// assert_eq!(cache.reserve(seq, 40)?, 3); // positions 10..50 need pages 1, 2 and 3
    /// let table = cache.block_table(seq)?.to_vec();
    /// cache.append(seq, 40)?; // takes no page: the table is unchanged
    /// assert_eq!((cache.block_table(seq)?, cache.len(seq)?, cache.free_pages()), (&table[..], 50, 4));
    /// assert_eq!(cache.reserve(seq, 1000)?, 4); // only 4 pages are free: all of them
    /// cache.free(seq)?;
    /// assert_eq!(cache.free_pages(), 8);
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn reserve(&mut self, id: SeqId, tokens: usize) -> Result<usize> {
        let seq = self.sequence(id)?;
        let want = self.desc.pages_for(seq.len.saturating_add(tokens).min(i32::MAX as usize)).saturating_sub(seq.pages.len()).min(self.free.len());
        let fresh: Vec<u32> = (0..want).map(|_| self.free.pop().unwrap()).collect();
        for &page in &fresh {
            self.refcounts[page as usize] = 1;
        }
        self.sequences.get_mut(&id).unwrap().pages.extend(fresh);
        Ok(want)
    }

    /// A new sequence that shares every page of `parent` (same tokens, same length). Shared pages are copied
    /// lazily, when either sequence appends into a shared partly filled page. `Error::UnknownSequence` for a parent
    /// not live here.
    pub fn fork(&mut self, parent: SeqId) -> Result<SeqId> {
        let mut child = self.sequence(parent)?.clone();
        // Pages the parent reserved past its length hold nothing yet: the child reserves its own.
        child.pages.truncate(self.desc.pages_for(child.len));
        for &page in &child.pages {
            self.refcounts[page as usize] += 1;
        }
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.sequences.insert(id, child);
        Ok(id)
    }

    /// Drops a sequence; pages no other sequence references return to the free list. `Error::UnknownSequence` for
    /// an id not live here (freeing twice included).
    pub fn free(&mut self, id: SeqId) -> Result<()> {
        let seq = self.sequences.remove(&id).ok_or(Error::UnknownSequence(id.0))?;
        for &page in seq.pages.iter().rev() {
            let count = &mut self.refcounts[page as usize];
            *count -= 1;
            if *count == 0 {
                self.free.push(page);
            }
        }
        Ok(())
    }

    /// Block tables and lengths of `ids`, in that order (rows padded to the longest with -1).
    /// `Error::UnknownSequence` if any id is not live here.
    pub fn batch_tables(&self, ids: &[SeqId]) -> Result<BatchTables> {
        let seqs: Vec<&Sequence> = ids.iter().map(|&id| self.sequence(id)).collect::<Result<_>>()?;
        let max_pages = seqs.iter().map(|s| s.pages.len()).max().unwrap_or(0).max(1);
        let mut block_tables = vec![-1i32; ids.len() * max_pages];
        for (row, seq) in block_tables.chunks_exact_mut(max_pages).zip(&seqs) {
            for (dst, &page) in row.iter_mut().zip(&seq.pages) {
                *dst = page as i32;
            }
        }
        Ok(BatchTables { block_tables, seq_lens: seqs.iter().map(|s| s.len as i32).collect(), max_pages })
    }
}

fn out_of_range(what: &str, index: usize, limit: usize) -> Error {
    Error::OutOfRange { what: what.into(), index: index as i64, limit: limit as i64 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cache(pages: usize, page_size: usize) -> KvCache {
        KvCache::new(CacheDescriptor::mla(pages, page_size, CacheDtype::Bf16).unwrap()).unwrap()
    }

    #[test]
    fn descriptor_sizes_and_limits() {
        let d = CacheDescriptor::mla(10, 64, CacheDtype::Fp8E4m3 { scale: 0.5 }).unwrap();
        assert_eq!((d.token_width(), d.token_bytes(), d.page_bytes(), d.total_bytes()), (320, 320, 20480, 204800));
        assert_eq!(CacheDescriptor::mla(1, 1, CacheDtype::Bf16).unwrap().token_bytes(), 640);
        for bad in [0, 257] {
            assert!(matches!(CacheDescriptor::mla(4, bad, CacheDtype::Bf16), Err(Error::InvalidArgument(_))));
        }
        assert!(CacheDescriptor::mla(0, 16, CacheDtype::Bf16).is_err());
        assert!(CacheDescriptor::mla(4, 16, CacheDtype::Fp8E4m3 { scale: f32::NAN }).is_err());
    }

    #[test]
    fn e4m3_decoding_matches_the_format() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0xfe), -448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x3c), 1.5);
        assert!(e4m3_to_f32(0x7f).is_nan() && e4m3_to_f32(0xff).is_nan());
    }

    #[test]
    fn append_fork_and_copy_on_write() {
        let mut kv = cache(8, 4);
        let a = kv.add_sequence();
        let plan = kv.append(a, 6).unwrap();
        assert_eq!((plan.first_position, plan.count, plan.copies.len()), (0, 6, 0));
        assert_eq!(kv.block_table(a).unwrap(), &[0, 1]);
        let b = kv.fork(a).unwrap();
        assert_eq!(kv.refcount(1).unwrap(), 2);
        // b writes into the shared, partly filled page 1: it gets a private copy first.
        let plan = kv.append(b, 1).unwrap();
        assert_eq!(plan.copies, vec![PageCopy { src: 1, dst: 2 }]);
        assert_eq!(kv.block_table(b).unwrap(), &[0, 2]);
        assert_eq!((kv.refcount(1).unwrap(), kv.refcount(0).unwrap()), (1, 2));
        // a now owns page 1 alone: no copy.
        assert!(kv.append(a, 2).unwrap().copies.is_empty());
        assert_eq!(kv.slot(a, 7).unwrap(), 4 + 3);
        assert!(matches!(kv.slot(a, 8), Err(Error::OutOfRange { .. })));
        kv.free(a).unwrap();
        kv.free(b).unwrap();
        assert_eq!(kv.free_pages(), 8);
        assert!(matches!(kv.free(a), Err(Error::UnknownSequence(_))));
        assert!(matches!(kv.append(a, 1), Err(Error::UnknownSequence(_))));
    }

    #[test]
    fn a_full_shared_page_is_not_copied() {
        let mut kv = cache(4, 4);
        let a = kv.add_sequence();
        kv.append(a, 4).unwrap();
        let b = kv.fork(a).unwrap();
        let plan = kv.append(b, 1).unwrap();
        assert!(plan.copies.is_empty());
        assert_eq!(kv.block_table(b).unwrap()[0], kv.block_table(a).unwrap()[0]);
    }

    #[test]
    fn out_of_pages_changes_nothing() {
        let mut kv = cache(3, 16);
        let a = kv.add_sequence();
        kv.append(a, 20).unwrap();
        let before = kv.batch_tables(&[a]).unwrap();
        let err = kv.append(a, 40).unwrap_err();
        assert!(matches!(err, Error::OutOfPages { needed: 2, free: 1 }), "{err}");
        assert_eq!(kv.batch_tables(&[a]).unwrap(), before);
        assert_eq!(kv.free_pages(), 1);
    }

    #[test]
    fn batch_tables_pad_with_minus_one() {
        let mut kv = cache(6, 2);
        let (a, b) = (kv.add_sequence(), kv.add_sequence());
        kv.append(a, 5).unwrap();
        kv.append(b, 1).unwrap();
        let t = kv.batch_tables(&[b, a]).unwrap();
        assert_eq!(t.max_pages, 3);
        assert_eq!(t.seq_lens, vec![1, 5]);
        assert_eq!(&t.block_tables[..3], &[kv.block_table(b).unwrap()[0] as i32, -1, -1]);
        assert!(matches!(kv.batch_tables(&[SeqId(99)]), Err(Error::UnknownSequence(99))));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Add,
        Append(usize, usize),
        Fork(usize),
        Free(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => Just(Op::Add),
            4 => (any::<usize>(), 0usize..20).prop_map(|(s, n)| Op::Append(s, n)),
            2 => any::<usize>().prop_map(Op::Fork),
            1 => any::<usize>().prop_map(Op::Free),
        ]
    }

    proptest! {
        // Random operation sequences against a model that stores a tag per token: every sequence must read back
        // exactly the tags it wrote through its own block table (writes to shared pages go through the copies),
        // every page's refcount equals the block-table entries pointing at it, and pages are conserved.
        #[test]
        fn random_operations_keep_the_invariants(page_size in 1usize..6, pages in 1usize..24, ops in proptest::collection::vec(op(), 1..60)) {
            let mut kv = cache(pages, page_size);
            let mut memory = vec![u64::MAX; pages * page_size];  // tag stored in each physical slot
            let mut model: Vec<(SeqId, Vec<u64>)> = Vec::new();  // live sequences and their tokens' tags
            let mut next_tag = 0u64;
            for op in ops {
                match op {
                    Op::Add => model.push((kv.add_sequence(), Vec::new())),
                    Op::Append(s, n) if !model.is_empty() => {
                        let i = s % model.len();
                        let id = model[i].0;
                        let free_before = kv.free_pages();
                        match kv.append(id, n) {
                            Ok(plan) => {
                                for c in &plan.copies {
                                    let (src, dst) = (c.src as usize * page_size, c.dst as usize * page_size);
                                    memory.copy_within(src..src + page_size, dst);
                                }
                                prop_assert_eq!(plan.first_position, model[i].1.len());
                                for pos in plan.first_position..plan.first_position + n {
                                    memory[kv.slot(id, pos).unwrap()] = next_tag;
                                    model[i].1.push(next_tag);
                                    next_tag += 1;
                                }
                            }
                            Err(Error::OutOfPages { needed, free }) => {
                                prop_assert!(needed > free);
                                prop_assert_eq!(free, free_before);
                            }
                            Err(e) => return Err(TestCaseError::fail(e.to_string())),
                        }
                    }
                    Op::Fork(s) if !model.is_empty() => {
                        let i = s % model.len();
                        let child = kv.fork(model[i].0).unwrap();
                        model.push((child, model[i].1.clone()));
                    }
                    Op::Free(s) if !model.is_empty() => {
                        let (id, _) = model.swap_remove(s % model.len());
                        kv.free(id).unwrap();
                    }
                    _ => {}
                }
                // Contents: no sequence sees another's writes.
                for (id, tags) in &model {
                    prop_assert_eq!(kv.len(*id).unwrap(), tags.len());
                    for (pos, &tag) in tags.iter().enumerate() {
                        prop_assert_eq!(memory[kv.slot(*id, pos).unwrap()], tag);
                    }
                }
                // Ownership: refcounts equal references; the free list holds exactly the unreferenced pages, once.
                let mut references = vec![0u32; pages];
                for (id, _) in &model {
                    for &p in kv.block_table(*id).unwrap() {
                        references[p as usize] += 1;
                    }
                }
                let mut is_free = vec![false; pages];
                for &p in &kv.free {
                    prop_assert!(!is_free[p as usize], "page {} freed twice", p);
                    is_free[p as usize] = true;
                }
                for p in 0..pages {
                    prop_assert_eq!(kv.refcount(p as u32).unwrap(), references[p]);
                    prop_assert_eq!(is_free[p], references[p] == 0);
                }
            }
        }
    }
}
