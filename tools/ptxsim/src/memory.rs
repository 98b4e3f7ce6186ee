//! Memory spaces: global allocations with per-byte initialisation tracking, per-block shared memory with a race
//! detector and pending-async-copy marks, and the generic address windows.
//!
//! Async copies: writes made by the async proxy (`cp.async`, TMA and bulk copies) are queued per block (`exec`'s
//! `AsyncQueue` and `BulkQueue`) and land in shared memory only when the program waits for them (`cp.async.wait_group`,
//! or an mbarrier wait on the phase the copy completes). While queued, their destination bytes are marked `pending`,
//! so a read before the wait is reported instead of silently returning stale data.

/// Generic addresses: global allocations live from `GLOBAL_BASE` up; shared and local memory are windows far above.
pub const GLOBAL_BASE: u64 = 0x1_0000_0000;
/// Module `.global`/`.const` variables: one 16 MiB window per loaded module.
pub const MODULE_DATA_BASE: u64 = 0x0010_0000_0000;
pub const MODULE_DATA_STRIDE: u64 = 1 << 24;
pub const SHARED_WINDOW: u64 = 0x7e00_0000_0000;
pub const LOCAL_WINDOW: u64 = 0x7f00_0000_0000;
pub const PARAM_WINDOW: u64 = 0x7d00_0000_0000;
pub const WINDOW_SIZE: u64 = 1 << 32;
/// Unused bytes left after every allocation, so small overruns land in no allocation.
const GAP: u64 = 1 << 16;

pub(crate) struct Allocation {
    pub data: Vec<u8>,
    /// 1 where the byte has been written (by the host or a kernel).
    pub init: Vec<u8>,
    /// Which bytes the last two kernel launches read and wrote, for the programmatic-launch hazard check: per byte,
    /// `MARK_READ` / `MARK_WRITE` shifted by `2 * (launch & 1)`, so the previous launch's marks survive while the
    /// current one records its own. Empty until a kernel first touches the allocation.
    marks: Vec<u8>,
    /// Per launch parity: the launch whose marks that parity holds, and the byte range they cover (so forgetting
    /// them costs the range the launch touched, not the allocation).
    mark_spans: [MarkSpan; 2],
}

/// The launch (`GlobalMemory::launch_seq`) whose marks one parity of `Allocation::marks` holds, and their range.
#[derive(Clone, Copy, Default)]
struct MarkSpan {
    launch: u64,
    lo: usize,
    hi: usize,
}

/// Kinds of kernel access recorded in `Allocation::marks`.
pub(crate) const MARK_READ: u8 = 1;
pub(crate) const MARK_WRITE: u8 = 2;

impl Allocation {
    fn new(data: Vec<u8>, init: Vec<u8>) -> Allocation {
        Allocation { data, init, marks: Vec::new(), mark_spans: [MarkSpan::default(); 2] }
    }

    /// Records that kernel launch `launch` (numbered from 1) accessed `[off, off + len)` (`MARK_READ` / `MARK_WRITE`).
    #[inline]
    pub fn mark(&mut self, off: usize, len: usize, kind: u8, launch: u64) {
        let parity = (launch & 1) as usize;
        let span = &mut self.mark_spans[parity];
        if span.launch != launch {
            // First access of this launch: the parity still holds launch - 2's marks (or older), which nothing needs.
            if self.marks.is_empty() {
                self.marks = vec![0; self.data.len()];
            } else {
                let keep = !((MARK_READ | MARK_WRITE) << (2 * parity));
                self.marks[span.lo..span.hi].iter_mut().for_each(|m| *m &= keep);
            }
            *span = MarkSpan { launch, lo: off, hi: off + len };
        } else {
            span.lo = span.lo.min(off);
            span.hi = span.hi.max(off + len);
        }
        let bits = kind << (2 * parity);
        self.marks[off..off + len].iter_mut().for_each(|m| *m |= bits);
    }

    /// The first byte of `[off, off + len)` that launch `launch` accessed in one of the `kinds`, as an index from `off`.
    pub fn marked(&self, off: usize, len: usize, kinds: u8, launch: u64) -> Option<usize> {
        let parity = (launch & 1) as usize;
        if self.mark_spans[parity].launch != launch || launch == 0 {
            return None;
        }
        let bits = kinds << (2 * parity);
        self.marks[off..off + len].iter().position(|m| m & bits != 0)
    }
}

pub struct GlobalMemory {
    /// Allocations sorted by start address (new ones always lie above the old, module windows below).
    allocs: Vec<(u64, Allocation)>,
    /// Index of the allocation the last lookup hit: kernels touch a few buffers many times in a row.
    last: std::cell::Cell<usize>,
    next: u64,
    /// The kernel launch running or last run, numbered from 1 (0: none yet); kernel accesses are marked with it.
    pub(crate) launch_seq: u64,
}

impl Default for GlobalMemory {
    fn default() -> Self {
        GlobalMemory { allocs: Vec::new(), last: std::cell::Cell::new(0), next: GLOBAL_BASE, launch_seq: 0 }
    }
}

impl GlobalMemory {
    pub fn alloc(&mut self, bytes: usize) -> u64 {
        let addr = self.next;
        self.next = (addr + bytes as u64 + GAP).div_ceil(256) * 256;
        self.insert(addr, Allocation::new(vec![0; bytes], vec![0; bytes]));
        addr
    }

    fn insert(&mut self, addr: u64, a: Allocation) {
        let at = self.allocs.partition_point(|(s, _)| *s < addr);
        self.allocs.insert(at, (addr, a));
    }

    /// Places an allocation at a fixed address (module variables); no-op when present.
    pub fn map_fixed(&mut self, addr: u64, bytes: &[u8]) {
        if self.allocs.binary_search_by_key(&addr, |(s, _)| *s).is_err() {
            self.insert(addr, Allocation::new(bytes.to_vec(), vec![1; bytes.len()]));
        }
    }

    pub fn free(&mut self, addr: u64) -> bool {
        match self.allocs.binary_search_by_key(&addr, |(s, _)| *s) {
            Ok(i) => {
                self.allocs.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    /// Index of the allocation whose range could hold `addr` (the last one starting at or below it).
    #[inline]
    fn index(&self, addr: u64) -> Option<usize> {
        let last = self.last.get();
        if let Some((s, a)) = self.allocs.get(last) {
            if addr >= *s && addr < s + a.data.len() as u64 {
                return Some(last);
            }
        }
        let i = self.allocs.partition_point(|(s, _)| *s <= addr).checked_sub(1)?;
        self.last.set(i);
        Some(i)
    }

    /// The allocation holding `[addr, addr+len)` and the offset of `addr` in it.
    #[inline]
    pub(crate) fn find(&self, addr: u64, len: usize) -> Option<(u64, &Allocation, usize)> {
        let (start, a) = &self.allocs[self.index(addr)?];
        let off = (addr - start) as usize;
        (off + len <= a.data.len()).then_some((*start, a, off))
    }

    /// The parts of `[addr, addr + len)` that lie in allocations, as (address, bytes), in address order.
    pub(crate) fn mapped_parts(&self, addr: u64, len: u64) -> Vec<(u64, u64)> {
        let end = addr.saturating_add(len);
        let first = self.allocs.partition_point(|(s, a)| s + a.data.len() as u64 <= addr);
        self.allocs[first..]
            .iter()
            .take_while(|(s, _)| *s < end)
            .filter_map(|(s, a)| {
                let (lo, hi) = (addr.max(*s), end.min(s + a.data.len() as u64));
                (lo < hi).then_some((lo, hi - lo))
            })
            .collect()
    }

    #[inline]
    pub(crate) fn find_mut(&mut self, addr: u64, len: usize) -> Option<(&mut Allocation, usize)> {
        let i = self.index(addr)?;
        let (start, a) = &mut self.allocs[i];
        let off = (addr - *start) as usize;
        (off + len <= a.data.len()).then_some((a, off))
    }

    /// Describes where an address lies, for error messages.
    pub fn describe(&self, addr: u64) -> String {
        match self.index(addr).map(|i| &self.allocs[i]) {
            Some(&(start, ref a)) => {
                let off = addr - start;
                if off < a.data.len() as u64 {
                    format!("offset {off} of the {}-byte allocation at {start:#x}", a.data.len())
                } else {
                    format!("{} bytes past the end of the {}-byte allocation at {start:#x}", off - a.data.len() as u64, a.data.len())
                }
            }
            None => "below every allocation".into(),
        }
    }

    /// Host write: marks bytes initialised.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> bool {
        match self.find_mut(addr, data.len()) {
            Some((a, off)) => {
                a.data[off..off + data.len()].copy_from_slice(data);
                a.init[off..off + data.len()].fill(1);
                true
            }
            None => false,
        }
    }

    /// Host read: uninitialised bytes read as whatever is there (zero).
    pub fn read(&self, addr: u64, out: &mut [u8]) -> bool {
        match self.find(addr, out.len()) {
            Some((_, a, off)) => {
                out.copy_from_slice(&a.data[off..off + out.len()]);
                true
            }
            None => false,
        }
    }

    pub fn fill(&mut self, addr: u64, byte: u8, len: usize) -> bool {
        match self.find_mut(addr, len) {
            Some((a, off)) => {
                a.data[off..off + len].fill(byte);
                a.init[off..off + len].fill(1);
                true
            }
            None => false,
        }
    }
}

/// Who touched a shared byte since the last barrier, for the race detector.
#[derive(Clone, Copy, Default)]
struct Access {
    write_tid: u32,
    write_epoch: u32,
    write_warp_epoch: u32,
    read_tid: u32,
    read_epoch: u32,
    read_warp_epoch: u32,
    /// Warp of all readers in this epoch, or `MANY_WARPS` (then `SharedMemory::read_sets` has one entry per warp).
    read_warp: u32,
    read_many: bool,
    /// The accessing warp's own vector-clock component at the access (see `SharedMemory::vc`).
    write_clock: u32,
    read_clock: u32,
}

/// The reads of one byte by one warp in the current epoch, kept once several warps read it and mbarriers are in use.
#[derive(Clone, Copy)]
struct WarpRead {
    warp: u32,
    clock: u32,
    warp_epoch: u32,
    tid: u32,
    many_lanes: bool,
}

const MANY_WARPS: u32 = u32::MAX;

/// A race found by the detector.
pub struct Race {
    pub offset: u32,
    pub other_tid: u32,
    pub other_wrote: bool,
}

/// Shared memory of the block being run.
pub struct SharedMemory {
    pub data: Vec<u8>,
    pub init: Vec<u8>,
    /// Bytes that a queued async copy will write (`exec`'s PENDING_* kinds).
    pub pending: Vec<u8>,
    /// Per byte: how many unretired wgmma.mma_async read it, and the total over all bytes (0: nothing to check).
    pub async_readers: Vec<u16>,
    pub async_read_bytes: usize,
    access: Vec<Access>,
    pub race_check: bool,
    /// Increments at every block start and barrier: accesses from an older epoch are ordered before this one.
    pub epoch: u32,
    /// Per warp: changes at every `bar.warp.sync`, ordering accesses of lanes of that warp.
    pub warp_epoch: Vec<u32>,
    next_warp_epoch: u32,
    /// Happens-before between warps that synchronise only through mbarriers: `vc[w][v]` is the latest clock of warp
    /// `v` that warp `w` is ordered after (own component `vc[w][w]` starts at 1 and grows at every release). An access
    /// by warp `v` at clock `c` is ordered before warp `w`'s accesses once `vc[w][v] >= c`. This extends the epoch
    /// rule: barriers still order everything before them; the clocks only add order inside an epoch.
    pub vc: Vec<Vec<u32>>,
    /// Set by the first `mbarrier.init` of the block: only then are per-warp read sets kept (they cost a map entry
    /// per byte that several warps read, which kernels without mbarriers never need).
    pub hb_active: bool,
    read_sets: std::collections::HashMap<u32, (u32, Vec<WarpRead>)>,
    /// Proxy fences: per byte (event, thread) of its last generic-proxy write (event 0: written by the async proxy),
    /// per thread the event of its last `fence.proxy.async`; `events` numbers both, from 0 at every block.
    generic_writes: Vec<(u32, u32)>,
    proxy_fences: Vec<u32>,
    events: u32,
}

impl SharedMemory {
    pub fn new(bytes: usize, warps: usize, race_check: bool) -> Self {
        SharedMemory {
            data: vec![0; bytes],
            init: vec![0; bytes],
            pending: vec![0; bytes],
            async_readers: vec![0; bytes],
            async_read_bytes: 0,
            access: if race_check { vec![Access::default(); bytes] } else { Vec::new() },
            race_check,
            epoch: 0,
            warp_epoch: vec![0; warps],
            next_warp_epoch: 1,
            vc: Self::fresh_clocks(warps),
            hb_active: false,
            read_sets: std::collections::HashMap::new(),
            generic_writes: vec![(0, 0); bytes],
            proxy_fences: vec![0; warps * 32],
            events: 0,
        }
    }

    fn next_event(&mut self) -> u32 {
        // 2^32 shared writes in one block are far beyond what the interpreter runs; wrapping keeps it panic-free.
        self.events = self.events.wrapping_add(1);
        self.events
    }

    /// A write by the generic proxy (st, atom, cp.async landing) of thread `tid`.
    pub fn generic_write(&mut self, off: usize, len: usize, tid: u32) {
        let e = self.next_event();
        self.generic_writes[off..off + len].fill((e, tid));
    }

    /// A write by the async proxy (a TMA / bulk copy landing): the async proxy may read it without a fence.
    pub fn async_write(&mut self, off: usize, len: usize) {
        self.generic_writes[off..off + len].fill((0, 0));
    }

    /// `fence.proxy.async` by thread `tid`.
    pub fn proxy_fence(&mut self, tid: u32) {
        let e = self.next_event();
        self.proxy_fences[tid as usize] = e;
    }

    /// The first byte of `[off, off + len)` whose generic write no `fence.proxy.async` separates from an async-proxy
    /// read issued by `issuer`: neither the writer nor the issuer fenced after the write (PTX ISA §9.7.13.4.2; the
    /// usual pattern is: every writer fences, then a barrier, then one thread issues). Returns (offset, writer).
    pub fn unfenced_generic_write(&self, off: usize, len: usize, issuer: u32) -> Option<(u32, u32)> {
        (off..off + len).find_map(|i| {
            let (e, writer) = self.generic_writes[i];
            (e != 0 && self.proxy_fences[writer as usize] < e && self.proxy_fences[issuer as usize] < e).then_some((i as u32, writer))
        })
    }

    fn fresh_clocks(warps: usize) -> Vec<Vec<u32>> {
        (0..warps).map(|w| (0..warps).map(|v| (v == w) as u32).collect()).collect()
    }

    /// A release by warp `w` (mbarrier arrive): returns the clock it publishes and starts a new clock interval.
    pub fn release(&mut self, w: usize) -> Vec<u32> {
        let published = self.vc[w].clone();
        self.vc[w][w] += 1;
        published
    }

    /// An acquire by warp `w` (a successful mbarrier wait): orders it after everything `clock` covers.
    pub fn acquire(&mut self, w: usize, clock: &[u32]) {
        for (mine, &c) in self.vc[w].iter_mut().zip(clock) {
            *mine = (*mine).max(c);
        }
    }

    /// A new block: contents become uninitialised, earlier accesses no longer race.
    pub fn reset(&mut self) {
        self.init.fill(0);
        self.pending.fill(0);
        self.async_readers.fill(0);
        self.async_read_bytes = 0;
        self.generic_writes.fill((0, 0));
        self.proxy_fences.fill(0);
        self.events = 0;
        self.vc = Self::fresh_clocks(self.vc.len());
        self.hb_active = false;
        self.barrier();
    }

    pub fn barrier(&mut self) {
        self.epoch += 1;
        self.read_sets.clear();
    }

    pub fn warp_sync(&mut self, warp: usize) {
        self.warp_epoch[warp] = self.next_warp_epoch;
        self.next_warp_epoch += 1;
    }

    #[inline]
    fn ordered(&self, other_tid: u32, other_epoch: u32, other_warp_epoch: u32, other_clock: u32, tid: u32) -> bool {
        other_epoch != self.epoch
            || other_tid == tid
            || (other_tid / 32 == tid / 32 && other_warp_epoch != self.warp_epoch[(tid / 32) as usize])
            || self.clock_ordered(other_tid / 32, other_clock, tid / 32)
    }

    /// Whether warp `other`'s access at `clock` happens before warp `me`'s accesses through mbarrier edges.
    #[inline]
    fn clock_ordered(&self, other: u32, clock: u32, me: u32) -> bool {
        other != me && self.vc[me as usize][other as usize] >= clock
    }

    /// Writer check against the reads of a byte that several warps read: the first unordered reader's tid.
    fn unordered_reader(&self, i: usize, tid: u32, we: u32) -> Option<u32> {
        let warp = tid / 32;
        let (epoch, reads) = self.read_sets.get(&(i as u32))?;
        if *epoch != self.epoch {
            return None;
        }
        reads
            .iter()
            .find(|r| if r.warp == warp { !(r.warp_epoch != we || (!r.many_lanes && r.tid == tid)) } else { !self.clock_ordered(r.warp, r.clock, warp) })
            .map(|r| r.tid)
    }

    /// Adds a read to the per-warp read set of byte `i` (used once several warps read it while mbarriers exist).
    fn add_read(&mut self, i: usize, first: Option<WarpRead>, read: WarpRead) {
        let epoch = self.epoch;
        let entry = self.read_sets.entry(i as u32).or_insert_with(|| (epoch, Vec::new()));
        if entry.0 != epoch {
            *entry = (epoch, Vec::new());
        }
        for r in first.into_iter().chain(std::iter::once(read)) {
            match entry.1.iter_mut().find(|e| e.warp == r.warp) {
                Some(e) => {
                    e.many_lanes |= e.tid != r.tid || r.many_lanes;
                    *e = WarpRead { many_lanes: e.many_lanes, ..r };
                }
                None => entry.1.push(r),
            }
        }
    }

    /// Records a plain access by thread `tid` (linear id in the block) and reports the first conflicting byte.
    pub fn track(&mut self, off: usize, len: usize, tid: u32, write: bool) -> Option<Race> {
        let clock = self.vc[(tid / 32) as usize][(tid / 32) as usize];
        self.track_at(off, len, tid, write, clock)
    }

    /// `track` for an access made at an earlier clock of the thread's warp: the landing of an async copy is attributed
    /// to its issuing thread at the issue (a waiter that acquired the release is ordered after it).
    pub fn track_at(&mut self, off: usize, len: usize, tid: u32, write: bool, clock: u32) -> Option<Race> {
        if !self.race_check {
            return None;
        }
        let warp = tid / 32;
        let we = self.warp_epoch[warp as usize];
        for i in off..off + len {
            let a = self.access[i];
            if a.write_epoch == self.epoch && !self.ordered(a.write_tid, a.write_epoch, a.write_warp_epoch, a.write_clock, tid) {
                return Some(Race { offset: i as u32, other_tid: a.write_tid, other_wrote: true });
            }
            if write {
                if a.read_epoch == self.epoch {
                    let readers_ordered = if a.read_many && a.read_warp == MANY_WARPS {
                        match self.unordered_reader(i, tid, we) {
                            Some(other) => return Some(Race { offset: i as u32, other_tid: other, other_wrote: false }),
                            None => self.hb_active && self.read_sets.contains_key(&(i as u32)),
                        }
                    } else if a.read_many {
                        (a.read_warp == warp && a.read_warp_epoch != we) || self.clock_ordered(a.read_warp, a.read_clock, warp)
                    } else {
                        a.read_tid == tid || (a.read_tid / 32 == warp && a.read_warp_epoch != we) || self.clock_ordered(a.read_tid / 32, a.read_clock, warp)
                    };
                    if !readers_ordered {
                        return Some(Race { offset: i as u32, other_tid: a.read_tid, other_wrote: false });
                    }
                }
                let rec = &mut self.access[i];
                rec.write_tid = tid;
                rec.write_epoch = self.epoch;
                rec.write_warp_epoch = we;
                rec.write_clock = clock;
            } else if a.read_epoch != self.epoch {
                let rec = &mut self.access[i];
                rec.read_tid = tid;
                rec.read_epoch = self.epoch;
                rec.read_warp_epoch = we;
                rec.read_warp = warp;
                rec.read_many = false;
                rec.read_clock = clock;
            } else if a.read_tid != tid || a.read_many {
                let new_warp = a.read_warp != warp;
                if self.hb_active && (new_warp || a.read_warp == MANY_WARPS) {
                    // Several warps read this byte: keep each warp's latest read so a writer ordered after all of them
                    // by mbarriers is not reported.
                    let first = (a.read_warp != MANY_WARPS).then_some(WarpRead {
                        warp: a.read_warp,
                        clock: a.read_clock,
                        warp_epoch: a.read_warp_epoch,
                        tid: a.read_tid,
                        many_lanes: a.read_many,
                    });
                    self.add_read(i, first, WarpRead { warp, clock, warp_epoch: we, tid, many_lanes: false });
                }
                let rec = &mut self.access[i];
                rec.read_many = true;
                if new_warp {
                    rec.read_warp = MANY_WARPS;
                }
                rec.read_tid = tid;
                rec.read_warp_epoch = we;
                rec.read_clock = clock;
            }
        }
        None
    }
}
