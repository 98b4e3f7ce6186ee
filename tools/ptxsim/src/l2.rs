//! The L2 state the timing model carries from one launch to the next: which 32-byte sectors the launches so far
//! (and the host's copies) left in L2, so that a launch reading what the launch before it wrote, or what an earlier
//! launch prefetched, is credited with L2 hits instead of DRAM bytes ([`crate::timing::Profile::l2_hit_sectors`]).
//!
//! The rule: an LRU of 128-byte lines, each holding the 32-byte sectors filled in it, with the capacity of the GPU's
//! L2 ([`crate::timing::Gpu::l2_bytes`]). Lines, not sectors, because that is how Hopper's L2 allocates (a 128-byte
//! line with four 32-byte sectors, each filled on demand): a launch touching one sector of a line takes a whole line
//! of capacity, but only the sectors it touched are hits for a later launch. A launch's touches (its distinct loaded
//! and stored sectors, then its prefetched ones) are fed in address order as one use each, after its hits are counted
//! against the state it started from. Not modelled: the hashing of addresses over L2's two partitions and its set
//! associativity (full associativity is assumed), the eviction priorities (`evict_first` / `evict_last` hints), and
//! write-backs (a dirty line costs its DRAM write when the launch that wrote it is priced, as before).

use std::collections::{HashMap, VecDeque};

use crate::counters::{Counters, SectorSet};
use crate::timing::L2_LINE_BYTES;

const SECTORS_PER_LINE: u64 = L2_LINE_BYTES / 32;

/// One use in LRU order: a line (its index, address / 128), or lines the model knows a launch filled but not where
/// (a sampled launch's blocks that did not run: they can never hit, but they take capacity and push older lines out).
#[derive(Clone, Copy, Debug)]
enum Use {
    Line(u64),
    Unseen(u64),
}

/// What the L2 state said about one launch when it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaunchResidency {
    /// The launch's distinct loaded / stored sectors (`Counters::distinct_sectors`) that were resident.
    pub l2_hit_sectors: u64,
    /// Its prefetched sectors that it does not also load or store, and how many of those were resident already.
    pub prefetch_sectors: u64,
    pub prefetch_l2_hit_sectors: u64,
}

/// An LRU of 128-byte lines with a capacity in bytes (module docs).
#[derive(Clone, Debug)]
pub struct L2Residency {
    capacity_lines: u64,
    /// Resident lines: line index -> (stamp of the last use, the sectors filled, one bit each).
    lines: HashMap<u64, (u64, u8)>,
    /// Lines counted in `Use::Unseen` entries still resident.
    unseen_lines: u64,
    /// Uses in order, oldest first, with their stamps; a `Use::Line` whose stamp is older than its line's last use is
    /// stale and skipped when evicting.
    order: VecDeque<(u64, Use)>,
    clock: u64,
}

impl L2Residency {
    /// An empty L2 of `capacity_bytes` (whole lines).
    pub fn new(capacity_bytes: f64) -> L2Residency {
        L2Residency {
            capacity_lines: (capacity_bytes / L2_LINE_BYTES as f64).floor().max(0.0) as u64,
            lines: HashMap::new(),
            unseen_lines: 0,
            order: VecDeque::new(),
            clock: 0,
        }
    }

    /// Bytes of the sectors resident at known addresses.
    pub fn resident_bytes(&self) -> u64 {
        self.lines.values().map(|(_, sectors)| sectors.count_ones() as u64 * 32).sum()
    }

    /// Whether the sector (address / 32) is resident.
    pub fn holds(&self, sector: u64) -> bool {
        self.lines.get(&(sector / SECTORS_PER_LINE)).is_some_and(|(_, s)| s & (1 << (sector % SECTORS_PER_LINE)) != 0)
    }

    /// The sectors of `set` resident now.
    fn resident_in(&self, set: &SectorSet) -> u64 {
        set.pages().map(|(page, bits)| self.resident_in_page(page, bits)).sum()
    }

    fn resident_in_page(&self, page: u64, bits: u128) -> u64 {
        lines_of_page(page, bits).filter_map(|(line, want)| self.lines.get(&line).map(|(_, have)| (have & want).count_ones() as u64)).sum()
    }

    /// Uses one line's sectors, evicting the least recently used lines beyond capacity.
    fn touch_line(&mut self, line: u64, sectors: u8) {
        if self.capacity_lines == 0 {
            return;
        }
        self.clock += 1;
        let entry = self.lines.entry(line).or_insert((0, 0));
        *entry = (self.clock, entry.1 | sectors);
        self.order.push_back((self.clock, Use::Line(line)));
        self.evict_beyond(self.capacity_lines);
        // Stale entries pile up when a launch re-touches lines: drop them once they outnumber the live ones.
        if self.order.len() as u64 > 2 * self.capacity_lines.max(self.lines.len() as u64) + 1024 {
            let lines = &self.lines;
            self.order.retain(|(stamp, u)| match u {
                Use::Line(l) => lines.get(l).is_some_and(|(s, _)| s == stamp),
                Use::Unseen(_) => true,
            });
        }
    }

    /// Evicts least recently used lines until at most `keep` are resident.
    fn evict_beyond(&mut self, keep: u64) {
        while self.lines.len() as u64 + self.unseen_lines > keep {
            let Some(front) = self.order.front_mut() else { break };
            match front.1 {
                Use::Line(line) => {
                    if self.lines.get(&line).is_some_and(|(stamp, _)| *stamp == front.0) {
                        self.lines.remove(&line);
                    }
                    self.order.pop_front();
                }
                Use::Unseen(n) => {
                    let drop = n.min(self.lines.len() as u64 + self.unseen_lines - keep);
                    self.unseen_lines -= drop;
                    if drop == n {
                        self.order.pop_front();
                    } else {
                        front.1 = Use::Unseen(n - drop);
                    }
                }
            }
        }
    }

    /// Uses every sector of `set`, in address order (how a streaming launch sweeps its buffers).
    pub fn touch(&mut self, set: &SectorSet) {
        let mut pages: Vec<(u64, u128)> = set.pages().collect();
        pages.sort_unstable_by_key(|p| p.0);
        for (page, bits) in pages {
            for (line, sectors) in lines_of_page(page, bits) {
                self.touch_line(line, sectors);
            }
        }
    }

    /// Uses the sectors of `[addr, addr + bytes)`: a host copy into device memory (module docs of `SimBackend`'s
    /// residency: the copy engines write through L2). A range larger than L2 leaves only its last `capacity` bytes.
    pub fn touch_range(&mut self, addr: u64, bytes: u64) {
        if bytes == 0 || self.capacity_lines == 0 {
            return;
        }
        let capacity = self.capacity_lines * L2_LINE_BYTES;
        let (addr, bytes) = if bytes > capacity { (addr + bytes - capacity, capacity) } else { (addr, bytes) };
        let (first, last) = (addr / 32, (addr + bytes - 1) / 32);
        for line in first / SECTORS_PER_LINE..=last / SECTORS_PER_LINE {
            let sectors = (0..SECTORS_PER_LINE).filter(|k| (first..=last).contains(&(line * SECTORS_PER_LINE + k))).fold(0u8, |m, k| m | 1 << k);
            self.touch_line(line, sectors);
        }
    }

    /// Uses `lines` lines at unknown addresses (never hits): what a sampled launch's blocks that did not run filled.
    fn touch_unseen(&mut self, lines: u64) {
        let lines = lines.min(self.capacity_lines);
        if lines == 0 {
            return;
        }
        self.clock += 1;
        self.unseen_lines += lines;
        self.order.push_back((self.clock, Use::Unseen(lines)));
        self.evict_beyond(self.capacity_lines);
    }

    /// Counts a launch's hits against the state it starts from, then feeds its touches: its own distinct sectors and
    /// its prefetches, in address order. A sampled launch (`blocks_run < blocks`) fed only the sectors its run blocks
    /// touched; the rest of its grid touched about `blocks / blocks_run` times as many sectors per block
    /// (`Counters::block_distinct_sectors` scaled, and its prefetches scaled alike), at addresses the interpreter never
    /// saw: they are fed as unseen lines, so a sampled launch larger than L2 still flushes it. What that misses: the
    /// unseen sectors cannot hit for a later launch (a later launch reading them is priced as DRAM), and a sampled
    /// launch's hits are its run blocks' (the prediction applies their fraction to the whole grid).
    pub fn launch(&mut self, c: &Counters) -> LaunchResidency {
        let own = &c.distinct_sectors;
        let prefetch_only = c.prefetch_sectors.without(own);
        let residency = LaunchResidency {
            l2_hit_sectors: self.resident_in(own),
            prefetch_sectors: prefetch_only.len(),
            prefetch_l2_hit_sectors: self.resident_in(&prefetch_only),
        };
        let mut touched = own.clone();
        touched.union(&prefetch_only);
        self.touch(&touched);
        if c.blocks_run < c.blocks {
            let scale = c.blocks as f64 / c.blocks_run.max(1) as f64;
            let whole_grid_sectors = (c.block_distinct_sectors + residency.prefetch_sectors) as f64 * scale;
            let unseen_sectors = (whole_grid_sectors - touched.len() as f64).max(0.0);
            self.touch_unseen((unseen_sectors / SECTORS_PER_LINE as f64).ceil() as u64);
        }
        residency
    }
}

/// The lines of one `SectorSet` page (128 sectors, 32 lines) that hold sectors of `bits`, with those sectors' bits.
fn lines_of_page(page: u64, bits: u128) -> impl Iterator<Item = (u64, u8)> {
    let lines_per_page = 128 / SECTORS_PER_LINE;
    (0..lines_per_page).filter_map(move |k| {
        let sectors = ((bits >> (k * SECTORS_PER_LINE)) & 0xf) as u8;
        (sectors != 0).then_some((page * lines_per_page + k, sectors))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sectors(range: std::ops::Range<u64>) -> SectorSet {
        let mut s = SectorSet::default();
        range.for_each(|x| s.insert(x));
        s
    }

    #[test]
    fn least_recently_used_lines_leave_first() {
        // Four lines of capacity.
        let mut l2 = L2Residency::new(4.0 * 128.0);
        l2.touch(&sectors(0..8)); // lines 0, 1
        l2.touch(&sectors(8..9)); // line 2, one sector
        assert_eq!(l2.resident_in(&sectors(0..16)), 9);
        assert!(l2.holds(8) && !l2.holds(9), "only the sector touched is filled");
        l2.touch(&sectors(0..1)); // line 0 is now the most recent
        l2.touch(&sectors(16..28)); // lines 4, 5, 6: lines 1 then 2 leave
        assert!(l2.holds(0) && !l2.holds(4) && !l2.holds(8) && l2.holds(16) && l2.holds(27));
        assert_eq!(l2.resident_bytes(), (4 + 12) * 32, "line 0 keeps its four sectors");
    }

    #[test]
    fn a_host_copy_larger_than_l2_leaves_its_tail() {
        let mut l2 = L2Residency::new(1024.0);
        l2.touch_range(0x1000, 4096 + 128);
        // Its last 1024 bytes: 0x1c80..0x2080.
        assert!(!l2.holds(0x1c60 / 32) && l2.holds(0x1c80 / 32) && l2.holds(0x207f / 32));
        assert_eq!(l2.resident_bytes(), 1024);
        // A tail that starts mid-line takes one more line than its bytes: the first, partly filled, leaves.
        l2.touch_range(0x8000 + 64, 1024);
        assert_eq!(l2.resident_bytes(), 1024 - 64);
        // A copy ending mid-line fills only the sectors it wrote.
        let mut l2 = L2Residency::new(1024.0);
        l2.touch_range(0x2000 + 32, 40);
        assert_eq!((l2.resident_bytes(), l2.holds(0x2000 / 32), l2.holds(0x2000 / 32 + 2)), (64, false, true));
    }

    /// A launch's hits are counted before its own touches; its prefetches of sectors it also loads are its own
    /// sectors, not prefetches.
    #[test]
    fn a_launch_counts_hits_then_touches() {
        let mut l2 = L2Residency::new((1 << 20) as f64);
        let launch = |own: std::ops::Range<u64>, prefetched: std::ops::Range<u64>| Counters {
            blocks: 1,
            blocks_run: 1,
            distinct_sectors: sectors(own),
            prefetch_sectors: sectors(prefetched),
            ..Counters::default()
        };
        let first = l2.launch(&launch(0..100, 64..200));
        assert_eq!(first, LaunchResidency { l2_hit_sectors: 0, prefetch_sectors: 100, prefetch_l2_hit_sectors: 0 });
        let second = l2.launch(&launch(150..300, 250..260));
        assert_eq!(second, LaunchResidency { l2_hit_sectors: 50, prefetch_sectors: 0, prefetch_l2_hit_sectors: 0 });
        let third = l2.launch(&launch(0..0, 0..400));
        assert_eq!(third, LaunchResidency { l2_hit_sectors: 0, prefetch_sectors: 400, prefetch_l2_hit_sectors: 300 });
    }

    #[test]
    fn unseen_lines_take_capacity_and_never_hit() {
        let mut l2 = L2Residency::new(8.0 * 128.0);
        l2.touch(&sectors(0..16)); // 4 lines
        l2.touch_unseen(6); // two of the four leave
        assert_eq!(l2.resident_in(&sectors(0..16)), 8);
        l2.touch(&sectors(100..104)); // one more line: line 2 leaves (older than the unseen lines)
        assert_eq!((l2.resident_in(&sectors(0..16)), l2.unseen_lines), (4, 6));
        l2.touch(&sectors(104..112)); // two more: line 3, then one unseen line
        assert_eq!((l2.resident_in(&sectors(0..16)), l2.unseen_lines), (0, 5));
        l2.touch_unseen(100); // more than L2: everything known leaves
        assert_eq!((l2.resident_bytes(), l2.unseen_lines), (0, 8));
    }
}
