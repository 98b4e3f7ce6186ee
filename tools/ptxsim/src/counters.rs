//! Per-launch counters: what a profiler would report about instruction mix and memory traffic.

use std::collections::HashMap;

use std::collections::VecDeque;

use crate::ir::{BarKind, Class, Inst, Op, Src, WgmmaSpec};

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

    /// Whether the set holds the sector.
    #[inline]
    pub fn contains(&self, sector: u64) -> bool {
        self.pages.get(&(sector >> 7)).is_some_and(|bits| bits & (1u128 << (sector & 127)) != 0)
    }

    /// Number of distinct sectors.
    pub fn len(&self) -> u64 {
        self.pages.values().map(|bits| bits.count_ones() as u64).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Adds every sector of `other`.
    pub fn union(&mut self, other: &SectorSet) {
        for (page, bits) in &other.pages {
            *self.pages.entry(*page).or_insert(0) |= bits;
        }
    }

    /// The sectors of this set that `other` lacks.
    pub fn without(&self, other: &SectorSet) -> SectorSet {
        let pages = self.pages.iter().map(|(page, bits)| (*page, bits & !other.pages.get(page).copied().unwrap_or(0))).filter(|(_, bits)| *bits != 0).collect();
        SectorSet { pages }
    }

    /// The set as (page, bits): page `p`'s bit `i` is sector `128 * p + i`. In no particular order.
    pub fn pages(&self) -> impl Iterator<Item = (u64, u128)> + '_ {
        self.pages.iter().map(|(page, bits)| (*page, *bits))
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

/// A point on a warp's dependence chain: the cycles to reach it, with each global load on the way weighed as
/// `timing::CHAIN_GLOBAL_CYCLES`, and how many global loads the way holds (so the model can weigh them otherwise).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Stamp {
    weighted: u64,
    globals: u64,
}

impl Stamp {
    /// The later of two points (the path that reaches it is the one kept).
    #[inline(always)]
    fn max(self, o: Stamp) -> Stamp {
        if o.weighted > self.weighted {
            o
        } else {
            self
        }
    }
    /// This point plus an instruction's latency: `cycles`, or one global load's.
    #[inline(always)]
    fn after(self, cycles: u64, global: bool) -> Stamp {
        if global {
            Stamp { weighted: self.weighted + crate::timing::CHAIN_GLOBAL_CYCLES, globals: self.globals + 1 }
        } else {
            Stamp { weighted: self.weighted + cycles, globals: self.globals }
        }
    }
    /// (non-memory cycles, global loads).
    fn split(self) -> (u64, u64) {
        (self.weighted - self.globals * crate::timing::CHAIN_GLOBAL_CYCLES, self.globals)
    }
}

/// One warp's scoreboard: when each register's value is ready, where its current basic block started, its latest
/// completion and its `cp.async` groups in flight.
#[derive(Clone, Debug, Default, PartialEq)]
struct WarpChain {
    ready: Vec<Stamp>,
    /// The start of the current basic block (after a branch, barrier or copy wait) and the instructions issued in
    /// it since; the latest start of any instruction of the block.
    fence: Stamp,
    since_fence: u64,
    latest_start: Stamp,
    end: Stamp,
    /// Completion of the copies issued since the last `cp.async.commit_group`, and of each committed group.
    copies: Stamp,
    groups: VecDeque<Stamp>,
    /// Arrivals at each block barrier (its phase), and the barrier to resume from at the next instruction.
    barrier_phase: [u32; 16],
    resume: Option<usize>,
}

/// The dependence chains of one block's warps: the critical path of a warp as ptxas schedules it and an in-order SM
/// issues it. Within a basic block, instructions are taken as freely reordered (ptxas hoists loads ahead of their
/// uses): each starts when its source registers (guard predicate and address register included) are ready, at
/// most one a cycle from the block's start. A branch, block barrier or copy wait ends the block: it issues after
/// every instruction before it (in-order issue), and what follows starts after it. A result is ready
/// `timing::CHAIN_CYCLES` of its class after its start, a global load's `timing::CHAIN_GLOBAL_CYCLES` after. So
/// the loads of one loop iteration (or of an unrolled group) overlap and cost one latency, while a load whose
/// address or branch depends on an earlier load waits for it. Stores and atomics without a result never stall the
/// warp. `cp.async.wait_group N` waits for all but the N newest committed groups; a block barrier resumes every
/// warp at the last warp's arrival. Contention between warps is not modelled here (the model's throughput terms
/// cover it), nor register pressure limiting the reordering.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockChains {
    warps: Vec<WarpChain>,
    /// Per barrier id: the phase whose arrivals are gathered and the last arrival (of two phases: a warp runs at
    /// most one phase ahead of the others).
    arrivals: [[(u32, Stamp); 2]; 16],
}

impl BlockChains {
    /// Issues one warp instruction of `class` on warp `warp`'s chain.
    #[inline(always)]
    pub(crate) fn issue(&mut self, warp: usize, class: Class, inst: &Inst) {
        if warp >= self.warps.len() {
            self.warps.resize_with(warp + 1, WarpChain::default);
        }
        let w = &mut self.warps[warp];
        if let Some(id) = w.resume.take() {
            let phase = w.barrier_phase[id] - 1;
            let slot = self.arrivals[id][(phase & 1) as usize];
            if slot.0 == phase {
                w.fence = w.fence.max(slot.1.after(crate::timing::CHAIN_CYCLES[Class::Sync as usize], false));
                w.since_fence = 0;
            }
        }
        let ends_block = matches!(inst.op, Op::Bra(_) | Op::Bar { .. } | Op::CpAsyncWait(_) | Op::Exit);
        let mut start = if ends_block { w.latest_start.after(1, false).max(w.fence) } else { w.fence.after(w.since_fence, false) };
        let ready = |w: &WarpChain, r: u32| w.ready.get(r as usize).copied().unwrap_or_default();
        if let Some((p, _)) = inst.guard {
            start = start.max(ready(w, p));
        }
        for s in &inst.s {
            if let Src::Reg(r) | Src::NotReg(r) = *s {
                start = start.max(ready(w, r));
            }
        }
        if let Some(base) = inst.addr.and_then(|a| a.base) {
            start = start.max(ready(w, base));
        }
        match inst.op {
            Op::CpAsync { .. } => w.copies = w.copies.max(start.after(0, true)),
            Op::CpAsyncCommit => w.groups.push_back(std::mem::take(&mut w.copies)),
            Op::CpAsyncWait(n) => {
                if n == u32::MAX {
                    start = start.max(std::mem::take(&mut w.copies));
                }
                while w.groups.len() > n.min(u32::MAX - 1) as usize {
                    start = start.max(w.groups.pop_front().unwrap_or_default());
                }
            }
            Op::Bar { kind, .. } => {
                let id = match inst.s.first() {
                    Some(Src::Imm(i)) => (*i as usize).min(15),
                    _ => 0,
                };
                let phase = w.barrier_phase[id];
                w.barrier_phase[id] += 1;
                let slot = &mut self.arrivals[id][(phase & 1) as usize];
                *slot = if slot.0 == phase { (phase, slot.1.max(start)) } else { (phase, start) };
                if kind != BarKind::Arrive {
                    w.resume = Some(id);
                }
            }
            _ => {}
        }
        if ends_block {
            (w.fence, w.since_fence) = (start, 1);
        } else {
            w.since_fence += 1;
        }
        w.latest_start = w.latest_start.max(start);
        let global = matches!(class, Class::GlobalMemory | Class::Atomic) && !inst.d.is_empty();
        let done = start.after(crate::timing::CHAIN_CYCLES[class as usize], global);
        let mut wrote = false;
        for &r in inst.d.iter().flatten() {
            if r as usize >= w.ready.len() {
                w.ready.resize(r as usize + 1, Stamp::default());
            }
            w.ready[r as usize] = done;
            wrote = true;
        }
        w.end = w.end.max(if wrote { done } else { start });
    }

    /// The longest warp chain of the block: (non-memory cycles, global loads waited for), and its warp (the first
    /// of equals).
    fn longest(&self) -> ((u64, u64), u32) {
        let (warp, end) =
            self.warps.iter().enumerate().fold((0, Stamp::default()), |best, (i, w)| if w.end.weighted > best.1.weighted { (i, w.end) } else { best });
        (end.split(), warp as u32)
    }

    fn reset(&mut self) {
        self.warps.clear();
        self.arrivals = Default::default();
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    pub kernel: String,
    /// The launch was programmatic (`Machine::programmatic`): it may start while the grid before it finishes.
    pub programmatic: bool,
    /// Programmatic and directly after another launch (no host operation between): that grid may still be running
    /// while this one's blocks run up to their `griddepcontrol.wait`.
    pub follows_launch: bool,
    /// In a kernel that executes `griddepcontrol.wait`: the distinct 32-byte sectors of each load (a lane's load,
    /// `cp.async`, a bulk or TMA copy) and each lane's L2 prefetch issued by a thread that had not executed its wait
    /// yet (under programmatic launch these overlap the grid before), summed over requests; and the interpreted
    /// blocks that issued any such load (prefetches alone do not count a block: nothing waits for them).
    pub pre_wait_sectors: u64,
    pub pre_wait_blocks: u64,
    /// The block being run issued a load before a thread's wait (see `pre_wait_sectors`); `end_block` counts it.
    pub(crate) block_pre_wait: bool,
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
    /// The dependence chains of the block being run's warps (see [`BlockChains`]), emptied by `end_block`.
    pub block_chains: BlockChains,
    /// The longest warp chain of any block (its non-memory cycles and the global loads it waits for), and the longest
    /// warp chain of each block summed over blocks: a block lasts at least its longest warp's critical path.
    /// "Longest" weighs a global load as `timing::CHAIN_GLOBAL_CYCLES`; the model may weigh it otherwise.
    pub chain_cycles_max: u64,
    pub chain_globals_max: u64,
    pub chain_cycles_sum: u64,
    pub chain_globals_sum: u64,
    /// The warp (index in its block) whose chain is `chain_cycles_max` / `chain_globals_max`: in a warp-specialised
    /// kernel, which role bounds the block.
    pub chain_longest_warp: u32,
    pub shared_requests: u64,
    /// Extra shared-memory wavefronts caused by bank conflicts (0 when every request is conflict-free).
    pub shared_bank_conflicts: u64,
    /// Tensor-core instructions (per warp: `mma.sync`, and each warp's quarter of a `wgmma.mma_async`) and their
    /// floating-point operations (2*m*n*k each; a warp's wgmma quarter is 2*16*n*k): every tensor FLOP of the launch.
    pub tensor_ops: u64,
    pub tensor_flops: u64,
    /// The part of `tensor_flops` issued by `wgmma.mma_async` (the rest is `mma.sync`), and the part of that with
    /// 8-bit inputs (e4m3 / e5m2, k = 32: twice the 16-bit rate on Hopper): the timing model gives each its own rate.
    pub wgmma_flops: u64,
    pub wgmma_8bit_flops: u64,
    /// 32-byte sectors moved by the asynchronous copy engines (TMA `cp.async.bulk.tensor` and `cp.async.bulk`, loads
    /// and stores; each copy's distinct sectors). They are L2 traffic like `global_sectors` and join the distinct
    /// sector sets (DRAM traffic), but are not warp requests: one thread issues a whole box.
    pub async_copy_sectors: u64,
    /// The distinct 32-byte sectors the launch's L2 prefetches (`prefetch.global.L2`, `cp.async.bulk.prefetch.L2`)
    /// asked for, and the prefetch requests (one per active lane). A prefetch moves no data to the SM: it is DRAM
    /// traffic of this launch for the sectors L2 does not hold yet, and makes them L2 hits for a later launch (the
    /// timing model's L2 residency); it is not in `distinct_sectors` (the launch's own loads and stores).
    pub prefetch_sectors: SectorSet,
    pub prefetch_requests: u64,
    /// The sectors the launch's loads read after an L2 prefetch of the same launch had asked for them (a decode GEMM
    /// warp's own k range, prefetched before its wait and read by its k loop): those loads find L2, and their DRAM
    /// bytes were moved by the prefetch, nothing waiting for them (the timing model's `Profile::prefetched_load_sectors`).
    pub prefetched_loads: SectorSet,
}

impl Counters {
    #[inline(always)]
    pub(crate) fn count(&mut self, class: Class, exec: u32, warp: u32, inst: &Inst) {
        self.block_chains.issue(warp as usize, class, inst);
        self.warp_instructions += 1;
        self.thread_instructions += exec.count_ones() as u64;
        self.by_class[class as usize] += 1;
    }

    /// Counts one warp's quarter of a `wgmma.mma_async` (16 rows of M = 64, N = `spec.n`, K = `spec.k`: 32 bytes of
    /// input, 8 tf32 / 16 16-bit / 32 8-bit values): its FLOPs join `tensor_flops` and `wgmma_flops`, and
    /// `wgmma_8bit_flops` for 8-bit inputs.
    pub(crate) fn wgmma_issued(&mut self, spec: &WgmmaSpec) {
        let flops = 2 * 16 * spec.n as u64 * spec.k as u64;
        self.tensor_ops += 1;
        self.tensor_flops += flops;
        self.wgmma_flops += flops;
        if spec.a_ty.bits() == 8 {
            self.wgmma_8bit_flops += flops;
        }
    }

    /// Records one asynchronous bulk copy (TMA or `cp.async.bulk`) over the given global (address, bytes) ranges: its
    /// distinct sectors join `async_copy_sectors` and the launch's and block's distinct sector sets; returns them.
    pub(crate) fn async_copy(&mut self, ranges: impl IntoIterator<Item = (u64, u32)>) -> u64 {
        let mut sectors: Vec<u64> = Vec::new();
        for (a, len) in ranges {
            sectors.extend((a >> 5)..=((a + len.max(1) as u64 - 1) >> 5));
        }
        sectors.sort_unstable();
        sectors.dedup();
        for &s in &sectors {
            self.distinct_sectors.insert(s);
            self.block_sectors.insert(s);
        }
        self.async_copy_sectors += sectors.len() as u64;
        sectors.len() as u64
    }

    /// Records one lane's L2 prefetch over the given (address, bytes) ranges (already clipped to allocated memory);
    /// returns its sectors.
    pub(crate) fn prefetch_request(&mut self, ranges: impl IntoIterator<Item = (u64, u64)>) -> u64 {
        let mut sectors = 0;
        for (a, len) in ranges {
            for s in (a >> 5)..=((a + len.max(1) - 1) >> 5) {
                self.prefetch_sectors.insert(s);
                sectors += 1;
            }
        }
        self.prefetch_requests += 1;
        sectors
    }

    pub fn by_class_named(&self) -> Vec<(&'static str, u64)> {
        Class::ALL.iter().map(|c| (c.name(), self.by_class[*c as usize])).filter(|(_, n)| *n > 0).collect()
    }

    /// Records one warp-wide global request over the given (address, bytes) ranges; returns its distinct sectors.
    pub(crate) fn global_request(&mut self, ranges: &[(u64, u32)], write: bool) -> u64 {
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
                if !write && self.prefetch_requests > 0 && self.prefetch_sectors.contains(s) {
                    self.prefetched_loads.insert(s);
                }
            }
        }
        self.global_requests += 1;
        self.global_sectors += distinct;
        if write {
            self.global_bytes_written += bytes;
        } else {
            self.global_bytes_read += bytes;
        }
        distinct
    }

    /// Records that a load of `sectors` distinct sectors was issued before its thread's `griddepcontrol.wait`.
    pub(crate) fn pre_wait_load(&mut self, sectors: u64) {
        self.pre_wait_sectors += sectors;
        self.block_pre_wait = true;
    }

    /// Records that an L2 prefetch of `sectors` sectors was issued before its thread's `griddepcontrol.wait`: DRAM
    /// traffic that overlaps the grid before like a load's, but nothing waits for it, so it does not make the block
    /// one whose first round trip is spent before the wait (`pre_wait_blocks`).
    pub(crate) fn pre_wait_prefetch(&mut self, sectors: u64) {
        self.pre_wait_sectors += sectors;
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
        self.pre_wait_blocks += std::mem::take(&mut self.block_pre_wait) as u64;
        self.block_sectors.pages.clear();
        let weight = |c: &(u64, u64)| c.0 + c.1 * crate::timing::CHAIN_GLOBAL_CYCLES;
        let (longest, warp) = self.block_chains.longest();
        if weight(&longest) > weight(&(self.chain_cycles_max, self.chain_globals_max)) {
            (self.chain_cycles_max, self.chain_globals_max) = longest;
            self.chain_longest_warp = warp;
        }
        self.chain_cycles_sum += longest.0;
        self.chain_globals_sum += longest.1;
        self.block_chains.reset();
    }

    pub fn merge(&mut self, o: &Counters) {
        self.block_distinct_sectors += o.block_distinct_sectors;
        let weight = |c: u64, g: u64| c + g * crate::timing::CHAIN_GLOBAL_CYCLES;
        if weight(o.chain_cycles_max, o.chain_globals_max) > weight(self.chain_cycles_max, self.chain_globals_max) {
            (self.chain_cycles_max, self.chain_globals_max) = (o.chain_cycles_max, o.chain_globals_max);
            self.chain_longest_warp = o.chain_longest_warp;
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
        self.wgmma_flops += o.wgmma_flops;
        self.wgmma_8bit_flops += o.wgmma_8bit_flops;
        self.async_copy_sectors += o.async_copy_sectors;
        self.pre_wait_sectors += o.pre_wait_sectors;
        self.pre_wait_blocks += o.pre_wait_blocks;
        self.prefetch_sectors.union(&o.prefetch_sectors);
        self.prefetch_requests += o.prefetch_requests;
        self.prefetched_loads.union(&o.prefetched_loads);
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
        writeln!(f, "  async copies (TMA, bulk): {} sectors", self.async_copy_sectors)?;
        if self.prefetch_requests > 0 {
            writeln!(
                f,
                "  L2 prefetches: {} requests, {} distinct sectors, {} of them loaded later by the launch",
                self.prefetch_requests,
                self.prefetch_sectors.len(),
                self.prefetched_loads.len()
            )?;
        }
        write!(f, "  tensor: {} mma, {} flops ({} by wgmma, {} of them 8-bit)", self.tensor_ops, self.tensor_flops, self.wgmma_flops, self.wgmma_8bit_flops)
    }
}

#[cfg(test)]
mod tests {
    use super::{BlockSample, Counters};
    use crate::ir::{Ty, WgmmaSpec};

    #[test]
    fn wgmma_flops_are_counted_apart_by_input_width() {
        let spec = |ab_ty: Ty| WgmmaSpec {
            n: 64,
            k: 256 / ab_ty.bits(),
            d_ty: Ty::F32,
            a_ty: ab_ty,
            b_ty: ab_ty,
            a_in_regs: true,
            neg_a: false,
            neg_b: false,
            trans_a: false,
            trans_b: false,
        };
        let mut c = Counters { tensor_ops: 1, tensor_flops: 2 * 16 * 8 * 16, ..Counters::default() }; // one mma.sync
        c.wgmma_issued(&spec(Ty::Bf16));
        // A warp's quarter of m64n64k16: 16 x 64 x 16 multiply-adds.
        assert_eq!((c.tensor_ops, c.tensor_flops, c.wgmma_flops, c.wgmma_8bit_flops), (2, 4096 + 32768, 32768, 0));
        c.wgmma_issued(&spec(Ty::E4m3));
        // m64n64k32 with 8-bit inputs: twice the FLOPs per instruction.
        assert_eq!((c.tensor_flops, c.wgmma_flops, c.wgmma_8bit_flops), (4096 + 32768 + 65536, 32768 + 65536, 65536));
        let mut merged = Counters::default();
        merged.merge(&c);
        assert_eq!((merged.wgmma_flops, merged.wgmma_8bit_flops), (c.wgmma_flops, c.wgmma_8bit_flops));
    }

    #[test]
    fn an_async_copy_counts_its_distinct_sectors_once() {
        let mut c = Counters::default();
        // A 4 KiB bulk copy, then a box of 2-byte elements: two rows of 128 bytes at a 1 KiB pitch, one starting
        // inside the bulk copy's range.
        c.async_copy([(0x1000, 4096)]);
        let rows = (0..2u64).flat_map(|r| (0..64u64).map(move |e| (0x1f80 + r * 1024 + 2 * e, 2)));
        c.async_copy(rows);
        assert_eq!(c.async_copy_sectors, 128 + 4 + 4);
        // 0x1f80..0x2000 lies in the first copy: the launch saw 128 + 4 distinct sectors.
        assert_eq!(c.distinct_sectors.len(), 132);
        assert_eq!((c.global_requests, c.global_sectors), (0, 0), "not warp requests");
    }

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
