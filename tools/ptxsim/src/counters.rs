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
    pub(crate) fn insert(&mut self, sector: u64) {
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

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    pub kernel: String,
    pub blocks: u64,
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
    pub shared_requests: u64,
    /// Extra shared-memory wavefronts caused by bank conflicts (0 when every request is conflict-free).
    pub shared_bank_conflicts: u64,
    /// mma.sync instructions (per warp) and their floating-point operations (2*m*n*k each).
    pub tensor_ops: u64,
    pub tensor_flops: u64,
}

impl Counters {
    #[inline(always)]
    pub(crate) fn count(&mut self, class: Class, exec: u32) {
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

    pub fn merge(&mut self, o: &Counters) {
        self.blocks += o.blocks;
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
        writeln!(f, "kernel {}: {} blocks, {} warp instructions ({} thread instructions)", self.kernel, self.blocks, self.warp_instructions, self.thread_instructions)?;
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
