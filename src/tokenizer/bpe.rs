//! Byte-pair encoding of SPEC-tokenizer.md section 2 (tiktoken's algorithm without special tokens).
//!
//! Written here instead of using the `tekken` crate's (tiktoken-rs) encoder, for two measured reasons
//! (docs/perf.md, "Tokenizer throughput"): tiktoken-rs scans for special tokens with an empty regex when none are
//! allowed, one regex call per byte of input, and its merge loop rescans the whole piece after every merge, so one long
//! piece (a run of letters or spaces) costs O(n²). Here the split is one `find_iter` pass and the merges use a heap,
//! O(n log n) per piece, with the same result: always merge the adjacent pair whose concatenation has the lowest rank,
//! leftmost on a tie.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rustc_hash::FxHashMap;

use super::TokenizerError;

/// The BPE tables: the split pattern and the rank of every mergeable byte string, both ways.
pub struct Bpe {
    pattern: fancy_regex::Regex,
    ranks: FxHashMap<Box<[u8]>, u32>,
    /// `piece_bytes[piece_offsets[r]..piece_offsets[r + 1]]` are the bytes of rank `r`.
    piece_bytes: Vec<u8>,
    piece_offsets: Vec<u32>,
}

/// Per-call working memory of the merge loop, reused across the pieces of one text.
#[derive(Default)]
struct MergeScratch {
    next: Vec<usize>,
    prev: Vec<usize>,
    alive: Vec<bool>,
    heap: BinaryHeap<Reverse<(u32, usize)>>,
}

impl Bpe {
    /// `pieces[r]` is the byte string of rank `r`. Ranks 0..255 must be the single bytes (so every text encodes) and
    /// no byte string may appear twice.
    pub fn new(pattern: &str, pieces: Vec<Vec<u8>>) -> Result<Self, TokenizerError> {
        let pattern = fancy_regex::Regex::new(pattern)
            .map_err(|e| TokenizerError::InvalidFile(format!("config.pattern does not compile: {e}")))?;
        if pieces.len() < 256 {
            return Err(TokenizerError::InvalidFile(format!(
                "{} BPE ranks, at least the 256 single bytes are needed",
                pieces.len()
            )));
        }
        let mut ranks = FxHashMap::with_capacity_and_hasher(pieces.len(), Default::default());
        let mut piece_bytes = Vec::new();
        let mut piece_offsets = Vec::with_capacity(pieces.len() + 1);
        piece_offsets.push(0u32);
        for (rank, piece) in pieces.into_iter().enumerate() {
            if rank < 256 && piece != [rank as u8] {
                return Err(TokenizerError::InvalidFile(format!("rank {rank} must be the single byte {rank}, is {piece:?}")));
            }
            if piece.is_empty() {
                return Err(TokenizerError::InvalidFile(format!("rank {rank} has no bytes")));
            }
            piece_bytes.extend_from_slice(&piece);
            piece_offsets.push(piece_bytes.len() as u32);
            if ranks.insert(piece.into_boxed_slice(), rank as u32).is_some() {
                return Err(TokenizerError::InvalidFile(format!("rank {rank} repeats the bytes of an earlier rank")));
            }
        }
        Ok(Bpe { pattern, ranks, piece_bytes, piece_offsets })
    }

    pub fn num_ranks(&self) -> usize {
        self.piece_offsets.len() - 1
    }

    /// The bytes of rank `rank`, if it exists.
    pub fn piece(&self, rank: u32) -> Option<&[u8]> {
        let r = rank as usize;
        if r >= self.num_ranks() {
            return None;
        }
        Some(&self.piece_bytes[self.piece_offsets[r] as usize..self.piece_offsets[r + 1] as usize])
    }

    /// Appends the ranks of `text`, each plus `offset` (the number of special ids), to `out`.
    pub fn encode_into(&self, text: &str, offset: u32, out: &mut Vec<u32>) {
        let mut scratch = MergeScratch::default();
        let mut done = 0;
        for found in self.pattern.find_iter(text) {
            match found {
                Ok(m) => {
                    self.encode_piece(text[m.start()..m.end()].as_bytes(), offset, &mut scratch, out);
                    done = m.end();
                }
                // fancy-regex gives up only past its backtracking limit, which this pattern does not reach; should it
                // happen, the rest becomes one piece: still a valid encoding that decodes to the same text.
                Err(_) => {
                    self.encode_piece(text[done..].as_bytes(), offset, &mut scratch, out);
                    return;
                }
            }
        }
    }

    fn encode_piece(&self, piece: &[u8], offset: u32, scratch: &mut MergeScratch, out: &mut Vec<u32>) {
        if let Some(&rank) = self.ranks.get(piece) {
            out.push(rank + offset);
            return;
        }
        let n = piece.len();
        let rank_of = |start: usize, end: usize| self.ranks.get(&piece[start..end]).copied();
        let MergeScratch { next, prev, alive, heap } = scratch;
        next.clear();
        next.extend(1..=n);
        prev.clear();
        prev.extend((0..n).map(|i| i.wrapping_sub(1)));
        alive.clear();
        alive.resize(n, true);
        heap.clear();
        for i in 0..n.saturating_sub(1) {
            if let Some(rank) = rank_of(i, i + 2) {
                heap.push(Reverse((rank, i)));
            }
        }
        while let Some(Reverse((rank, start))) = heap.pop() {
            if !alive[start] || next[start] >= n {
                continue;
            }
            let right = next[start];
            let end = next[right];
            // A stale entry: the pair starting here changed since it was pushed (ranks are unique per byte string).
            if rank_of(start, end) != Some(rank) {
                continue;
            }
            alive[right] = false;
            next[start] = end;
            if end < n {
                prev[end] = start;
                if let Some(r) = rank_of(start, next[end]) {
                    heap.push(Reverse((r, start)));
                }
            }
            if start > 0 {
                let left = prev[start];
                if let Some(r) = rank_of(left, end) {
                    heap.push(Reverse((r, left)));
                }
            }
        }
        let mut start = 0;
        while start < n {
            let end = next[start];
            // Every surviving segment is a single byte or a merge found in the table.
            out.push(rank_of(start, end).expect("BPE segment is in the vocabulary") + offset);
            start = end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// tiktoken's merge loop, literally: rescan all pairs, merge the lowest rank (leftmost on a tie), repeat.
    fn naive_merge(bpe: &Bpe, piece: &[u8]) -> Vec<u32> {
        let mut parts: Vec<Vec<u8>> = piece.iter().map(|&b| vec![b]).collect();
        loop {
            let best = (0..parts.len().saturating_sub(1))
                .filter_map(|i| bpe.ranks.get([parts[i].as_slice(), &parts[i + 1]].concat().as_slice()).map(|&r| (r, i)))
                .min();
            match best {
                Some((_, i)) => {
                    let right = parts.remove(i + 1);
                    parts[i].extend(right);
                }
                None => break,
            }
        }
        parts.iter().map(|p| bpe.ranks[p.as_slice()]).collect()
    }

    /// A vocabulary over the bytes a..d with every string of length 2..4 ranked in a fixed shuffled order.
    fn small_bpe() -> Bpe {
        let mut pieces: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        let mut merged = Vec::new();
        for len in 2..=4u32 {
            for code in 0..4u32.pow(len) {
                merged.push((0..len).map(|k| b'a' + ((code / 4u32.pow(k)) % 4) as u8).collect::<Vec<u8>>());
            }
        }
        // A deterministic shuffle so that ranks do not follow length.
        merged.sort_by_key(|p| p.iter().fold(0u64, |h, &b| h.wrapping_mul(1_000_003).wrapping_add(b as u64)) % 1009);
        pieces.extend(merged);
        Bpe::new(".+", pieces).unwrap()
    }

    proptest! {
        #[test]
        fn heap_merge_equals_tiktoken_loop(piece in proptest::collection::vec(b'a'..=b'e', 1..200)) {
            let bpe = small_bpe();
            let mut ours = Vec::new();
            bpe.encode_piece(&piece, 0, &mut MergeScratch::default(), &mut ours);
            let expected = if let Some(&r) = bpe.ranks.get(piece.as_slice()) { vec![r] } else { naive_merge(&bpe, &piece) };
            prop_assert_eq!(ours, expected);
        }
    }
}
