//! Per-launch counters: what a profiler would report about instruction mix and memory traffic.

use std::collections::HashMap;

use crate::ir::Class;

/// The distinct 32-byte sectors a launch touched, as one bit each in 4 KiB pages (128 sectors a page).
///
/// Why: `global_sectors` counts every warp request's sectors, i.e. what the SMs ask of L2. A re-read of data the launch
/// already touched (activation rows that every block column reads again) costs L2 bandwidth, not DRAM bandwidth, as
/// long as L2 (50 MB on H100) holds it; the distinct sectors are the DRAM traffic under that assumption.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SectorSet {
    pages: HashMap<u64, u128>,
}

impl SectorSet {
    #[inline]
    /// Adds one sector (its address divided by 32).
    pub fn insert(&mut self, sector: u64) {
        *self.pages.entry(sector >> 7).or_insert(0) |= 1u128 << (sector & 127);
    }

    /// Number of distinct sectors.
    pub fn len(&self) -> u64 {
        self.pages.values().map(|bits| bits.count_ones() as u64).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    fn union(&mut self, other: &SectorSet) {
        for (page, bits) in &other.pages {
            *self.pages.entry(*page).or_insert(0) |= bits;
        }
    }
}

/// Which blocks of a launch run when `Machine::block_sample` limits them: `n` blocks evenly spaced over the linear
/// block index (block `floor(i * total / n)` for i in 0..n), so every part of the grid (e.g. the padded tail tiles
/// of a grouped GEMM that exit early) is represented in proportion.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockSample {
    total: u64,
    n: u64,
}

impl BlockSample {
    /// Every block when `limit` is None or at least `total`.
    pub fn new(total: u64, limit: Option<u64>) -> Self {
        BlockSample { total, n: limit.map_or(total, |l| l.clamp(1, total.max(1))).min(total) }
    }

    /// Whether the block with this linear index runs.
    pub fn runs(&self, linear: u64) -> bool {
        if self.n == self.total {
            return true;
        }
        // i = ceil(linear * n / total) is the only candidate sample whose block index can equal `linear`.
        let i = (linear * self.n).div_ceil(self.total);
        i < self.n && i * self.total / self.n == linear
    }

    /// Blocks that run.
    pub fn count(&self) -> u64 {
        self.n
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    pub kernel: String,
    /// Blocks of the grid, and the blocks actually interpreted (fewer under `Machine::block_sample`; every other
    /// counter covers only those).
    pub blocks: u64,
    pub blocks_run: u64,
    /// Threads per block and shared memory per block (static + dynamic bytes) of the launch.
    pub block_threads: u32,
    pub shared_bytes: u32,
    /// Block barriers executed (`bar.sync` / `barrier.sync` and their reductions), per warp.
    pub block_barriers: u64,
    /// `cp.async.wait_group` / `wait_all` executed, per warp: where a pipelined warp waits for its copies.
    pub async_waits: u64,
    /// Sum over those waits of the copy groups each leaves in flight (N of `wait_group N`): the pipeline depth.
    pub async_groups_left_in_flight: u64,
    /// Instructions issued per warp (one per converged group of lanes), and per active thread.
    pub warp_instructions: u64,
    pub thread_instructions: u64,
    /// Warp instructions by `Class` (indexed as `Class::ALL`).
    pub by_class: [u64; Class::ALL.len()],
    pub global_bytes_read: u64,
    pub global_bytes_written: u64,
    /// Warp-wide global memory requests (loads, stores, atomics, async copies) and the distinct 32-byte sectors each touched.
    pub global_requests: u64,
    pub global_sectors: u64,
    /// The distinct sectors behind `global_sectors` over the whole launch (DRAM traffic if L2 keeps what was touched).
    pub distinct_sectors: SectorSet,
    /// Each block's distinct sectors, summed over blocks: the DRAM traffic if L2 kept nothing between blocks. For a
    /// sampled launch (whose sampled blocks lie far apart) this is the figure that scales to the grid.
    pub block_distinct_sectors: u64,
    /// The sectors of the block being run (empty once a launch returns).
    pub block_sectors: SectorSet,
    /// Each warp's dependent-latency chain in the block being run: (`timing::CHAIN_CYCLES` summed over the
    /// instructions it issued other than global memory and atomics, and the count of those), emptied by `end_block`.
    pub block_warp_chain: Vec<(u64, u64)>,
    /// The longest warp chain of any block (its non-memory cycles and global operations), and the longest warp chain
    /// of each block summed over blocks: a block lasts at least its longest warp's chain of dependent instructions.
    /// "Longest" weighs a global operation as `timing::CHAIN_GLOBAL_CYCLES`; the model may weigh it otherwise.
    pub chain_cycles_max: u64,
    pub chain_globals_max: u64,
    pub chain_cycles_sum: u64,
    pub chain_globals_sum: u64,
    pub shared_requests: u64,
    /// Extra shared-memory wavefronts caused by bank conflicts (0 when every request is conflict-free).
    pub shared_bank_conflicts: u64,
    /// mma.sync instructions (per warp) and their floating-point operations (2*m*n*k each).
    pub tensor_ops: u64,
    pub tensor_flops: u64,
}

impl Counters {
    #[inline(always)]
    pub(crate) fn count(&mut self, class: Class, exec: u32, warp: u32) {
        let warp = warp as usize;
        if warp >= self.block_warp_chain.len() {
            self.block_warp_chain.resize(warp + 1, (0, 0));
        }
        let chain = &mut self.block_warp_chain[warp];
        if matches!(class, Class::GlobalMemory | Class::Atomic) {
            chain.1 += 1;
        } else {
            chain.0 += crate::timing::CHAIN_CYCLES[class as usize];
        }
        self.warp_instructions += 1;
        self.thread_instructions += exec.count_ones() as u64;
        self.by_class[class as usize] += 1;
    }

    pub fn by_class_named(&self) -> Vec<(&'static str, u64)> {
        Class::ALL.iter().map(|c| (c.name(), self.by_class[*c as usize])).filter(|(_, n)| *n > 0).collect()
    }

    /// Records one warp-wide global request over the given (address, bytes) ranges.
    pub(crate) fn global_request(&mut self, ranges: &[(u64, u32)], write: bool) {
        // At most 32 lanes x 16 bytes: each lane's range spans at most 2 sectors (more only for odd 32-byte+ copies).
        let mut sectors = [0u64; 256];
        let mut n = 0usize;
        let mut bytes = 0u64;
        for &(a, len) in ranges {
            bytes += len as u64;
            let (first, last) = (a >> 5, (a + len.max(1) as u64 - 1) >> 5);
            for s in first..=last {
                if n < sectors.len() {
                    sectors[n] = s;
                    n += 1;
                }
            }
        }
        let sectors = &mut sectors[..n];
        sectors.sort_unstable();
        let mut distinct = 0;
        for (i, &s) in sectors.iter().enumerate() {
            if i == 0 || sectors[i - 1] != s {
                distinct += 1;
                self.distinct_sectors.insert(s);
                self.block_sectors.insert(s);
            }
        }
        self.global_requests += 1;
        self.global_sectors += distinct;
        if write {
            self.global_bytes_written += bytes;
        } else {
            self.global_bytes_read += bytes;
        }
    }

    /// Records one warp-wide shared request: bank conflicts are the wavefronts beyond what the bytes need
    /// (128 bytes per wavefront); lanes reading the same 4-byte word share it (broadcast).
    pub(crate) fn shared_request(&mut self, ranges: &[(u32, u32)]) {
        let mut words = [0u32; 256];
        let mut n = 0usize;
        let mut bytes = 0u32;
        for &(a, len) in ranges {
            bytes += len;
            for w in (a / 4)..(a + len.max(1)).div_ceil(4) {
                if n < words.len() {
                    words[n] = w;
                    n += 1;
                }
            }
        }
        let words = &mut words[..n];
        words.sort_unstable();
        let mut per_bank = [0u32; 32];
        for (i, w) in words.iter().enumerate() {
            if i == 0 || words[i - 1] != *w {
                per_bank[(w % 32) as usize] += 1;
            }
        }
        let wavefronts = per_bank.iter().copied().max().unwrap_or(0);
        let ideal = bytes.div_ceil(128).max(1).min(wavefronts.max(1));
        self.shared_requests += 1;
        self.shared_bank_conflicts += wavefronts.saturating_sub(ideal) as u64;
    }

    /// Closes a block: its distinct sectors join `block_distinct_sectors`.
    pub(crate) fn end_block(&mut self) {
        self.block_distinct_sectors += self.block_sectors.len();
        self.block_sectors.pages.clear();
        let weight = |c: &(u64, u64)| c.0 + c.1 * crate::timing::CHAIN_GLOBAL_CYCLES;
        let longest = self.block_warp_chain.iter().copied().max_by_key(weight).unwrap_or((0, 0));
        if weight(&longest) > weight(&(self.chain_cycles_max, self.chain_globals_max)) {
            (self.chain_cycles_max, self.chain_globals_max) = longest;
        }
        self.chain_cycles_sum += longest.0;
        self.chain_globals_sum += longest.1;
        self.block_warp_chain.iter_mut().for_each(|c| *c = (0, 0));
    }

    pub fn merge(&mut self, o: &Counters) {
        self.block_distinct_sectors += o.block_distinct_sectors;
        let weight = |c: u64, g: u64| c + g * crate::timing::CHAIN_GLOBAL_CYCLES;
        if weight(o.chain_cycles_max, o.chain_globals_max) > weight(self.chain_cycles_max, self.chain_globals_max) {
            (self.chain_cycles_max, self.chain_globals_max) = (o.chain_cycles_max, o.chain_globals_max);
        }
        self.chain_cycles_sum += o.chain_cycles_sum;
        self.chain_globals_sum += o.chain_globals_sum;
        self.blocks += o.blocks;
        self.blocks_run += o.blocks_run;
        self.block_barriers += o.block_barriers;
        self.async_waits += o.async_waits;
        self.async_groups_left_in_flight += o.async_groups_left_in_flight;
        self.block_threads = self.block_threads.max(o.block_threads);
        self.shared_bytes = self.shared_bytes.max(o.shared_bytes);
        self.warp_instructions += o.warp_instructions;
        self.thread_instructions += o.thread_instructions;
        for (a, b) in self.by_class.iter_mut().zip(o.by_class) {
            *a += b;
        }
        self.global_bytes_read += o.global_bytes_read;
        self.global_bytes_written += o.global_bytes_written;
        self.global_requests += o.global_requests;
        self.global_sectors += o.global_sectors;
        self.distinct_sectors.union(&o.distinct_sectors);
        self.shared_requests += o.shared_requests;
        self.shared_bank_conflicts += o.shared_bank_conflicts;
        self.tensor_ops += o.tensor_ops;
        self.tensor_flops += o.tensor_flops;
    }
}

impl std::fmt::Display for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.blocks_run != self.blocks {
            writeln!(f, "sampled: {} of {} blocks interpreted (the counters below cover those)", self.blocks_run, self.blocks)?;
        }
        writeln!(
            f,
            "kernel {}: {} blocks, {} warp instructions ({} thread instructions)",
            self.kernel, self.blocks, self.warp_instructions, self.thread_instructions
        )?;
        for (name, n) in self.by_class_named() {
            writeln!(f, "  {name:>26}: {n}")?;
        }
        writeln!(
            f,
            "  global: {} B read, {} B written, {} requests, {} sectors ({:.2} sectors/request), {} distinct sectors",
            self.global_bytes_read,
            self.global_bytes_written,
            self.global_requests,
            self.global_sectors,
            self.global_sectors as f64 / self.global_requests.max(1) as f64,
            self.distinct_sectors.len()
        )?;
        writeln!(f, "  shared: {} requests, {} bank-conflict wavefronts", self.shared_requests, self.shared_bank_conflicts)?;
        write!(f, "  tensor: {} mma, {} flops", self.tensor_ops, self.tensor_flops)
    }
}

#[cfg(test)]
mod tests {
    use super::BlockSample;

    #[test]
    fn block_sample_runs_exactly_n_evenly_spaced_blocks() {
        for (total, limit) in [(1u64, Some(4u64)), (10, Some(3)), (256, Some(16)), (257, Some(16)), (5, None), (1000, Some(999))] {
            let s = BlockSample::new(total, limit);
            let run: Vec<u64> = (0..total).filter(|&b| s.runs(b)).collect();
            let want: Vec<u64> = (0..s.count()).map(|i| i * total / s.count()).collect();
            assert_eq!(run, want, "total {total}, limit {limit:?}");
            assert_eq!(s.count(), limit.map_or(total, |l| l.min(total)));
        }
    }
}
