//! Byte-pair encoding of SPEC-tokenizer.md section 2 (tiktoken's algorithm without special tokens).
//!
//! The split: the tekken pattern ends in `\s+(?!\S)|\s+`, a lookahead only a backtracking engine (fancy-regex) runs,
//! and that engine is most of the encode time. For that known pattern, [`Splitter::Tekken`] runs the rest with the
//! `regex` crate (same leftmost-first semantics, a DFA) and applies the lookahead by hand; any other pattern goes to
//! fancy-regex. `tests::tekken_split_equals_fancy_regex` checks the two agree.
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

/// The pre-tokenizer pattern of the tekken files (tekken_240718, tekken_240911; SPEC-tokenizer.md section 7).
const TEKKEN_PATTERN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LOOKAHEAD_ALTERNATIVE: &str = r"|\s+(?!\S)";

/// Splits text into the pieces that are encoded separately.
pub enum Splitter {
    /// `TEKKEN_PATTERN` without its `\s+(?!\S)` alternative, in the `regex` crate. Without it, a run of whitespace
    /// that no earlier alternative takes (so it has no line break) is matched whole by `\s+`; the lookahead would
    /// have left its last character to the next piece when the run has two or more characters and text follows.
    Tekken(regex::Regex),
    /// Any other pattern, as written.
    General(fancy_regex::Regex),
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Splitter, TokenizerError> {
        if pattern == TEKKEN_PATTERN {
            let without_lookahead = pattern.replacen(LOOKAHEAD_ALTERNATIVE, "", 1);
            let regex = regex::Regex::new(&without_lookahead).expect("the tekken pattern without lookahead compiles");
            return Ok(Splitter::Tekken(regex));
        }
        Self::general(pattern)
    }

    /// The pattern in fancy-regex, whatever it is.
    pub fn general(pattern: &str) -> Result<Splitter, TokenizerError> {
        fancy_regex::Regex::new(pattern).map(Splitter::General).map_err(|e| TokenizerError::InvalidFile(format!("config.pattern does not compile: {e}")))
    }

    /// Calls `piece` with each piece of `text`, in order; the pieces cover the text.
    pub fn for_each_piece(&self, text: &str, mut piece: impl FnMut(&str)) {
        match self {
            Splitter::Tekken(regex) => {
                let mut pos = 0;
                while let Some(m) = regex.find_at(text, pos) {
                    let mut end = m.end();
                    let matched = m.as_str();
                    if end < text.len() && matched.chars().all(char::is_whitespace) && !matched.contains(['\r', '\n']) {
                        let last = matched.chars().next_back().expect("regex matches are not empty here").len_utf8();
                        if matched.len() > last {
                            end -= last;
                        }
                    }
                    piece(&text[m.start()..end]);
                    pos = end;
                }
            }
            Splitter::General(regex) => {
                let mut done = 0;
                for found in regex.find_iter(text) {
                    match found {
                        Ok(m) => {
                            piece(m.as_str());
                            done = m.end();
                        }
                        // fancy-regex gives up only past its backtracking limit; should it happen, the rest becomes
                        // one piece: still a valid encoding that decodes to the same text.
                        Err(_) => {
                            piece(&text[done..]);
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// The BPE tables: the split pattern and the rank of every mergeable byte string, both ways.
pub struct Bpe {
    splitter: Splitter,
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
        let splitter = Splitter::new(pattern)?;
        if pieces.len() < 256 {
            return Err(TokenizerError::InvalidFile(format!("{} BPE ranks, at least the 256 single bytes are needed", pieces.len())));
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
        Ok(Bpe { splitter, ranks, piece_bytes, piece_offsets })
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
        self.splitter.for_each_piece(text, |piece| self.encode_piece(piece.as_bytes(), offset, &mut scratch, out));
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

    fn pieces(splitter: &Splitter, text: &str) -> Vec<String> {
        let mut pieces = Vec::new();
        splitter.for_each_piece(text, |p| pieces.push(p.to_string()));
        pieces
    }

    #[test]
    fn tekken_pattern_takes_the_fast_splitter() {
        assert!(matches!(Splitter::new(TEKKEN_PATTERN).unwrap(), Splitter::Tekken(_)));
        assert!(matches!(Splitter::new(r"\s+(?!\S)|\S+").unwrap(), Splitter::General(_)));
        let fast = Splitter::new(TEKKEN_PATTERN).unwrap();
        assert_eq!(pieces(&fast, "a   b\u{3000}\u{3000}c  \n  d  "), ["a", "  ", " b", "\u{3000}", "\u{3000}c", "  \n", " ", " d", "  "]);
    }

    proptest! {
        #[test]
        fn tekken_split_equals_fancy_regex(text in "\\PC{0,60}|[ \t\n\r\u{a0}\u{3000}\u{2028}aZ1.,!é😀/]{0,60}") {
            static SPLITTERS: std::sync::OnceLock<(Splitter, Splitter)> = std::sync::OnceLock::new();
            let (fast, general) = SPLITTERS.get_or_init(|| {
                (Splitter::new(TEKKEN_PATTERN).unwrap(), Splitter::general(TEKKEN_PATTERN).unwrap())
            });
            prop_assert_eq!(pieces(fast, &text), pieces(general, &text));
        }

        #[test]
        fn heap_merge_equals_tiktoken_loop(piece in proptest::collection::vec(b'a'..=b'e', 1..200)) {
            static BPE: std::sync::OnceLock<Bpe> = std::sync::OnceLock::new();
            let bpe = BPE.get_or_init(small_bpe);
            let mut ours = Vec::new();
            bpe.encode_piece(&piece, 0, &mut MergeScratch::default(), &mut ours);
            let expected = if let Some(&r) = bpe.ranks.get(piece.as_slice()) { vec![r] } else { naive_merge(bpe, &piece) };
            prop_assert_eq!(ours, expected);
        }
    }
}
