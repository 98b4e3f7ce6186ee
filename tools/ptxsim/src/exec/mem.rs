//! Loads, stores, atomics, async copies and ldmatrix/stmatrix, with bounds, initialisation, race and pending-copy
//! checks and the traffic counters.

use super::{fault, lanes, warp_fault, BlockCtx, Fault, Warp};
use crate::float;
use crate::ir::*;
use crate::memory::*;

/// Where one lane's access lands.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Loc {
    Global(u64),
    Shared(u32),
    Local(u32),
    Param(u32),
}

/// One queued `cp.async` of one thread.
#[derive(Clone, Debug)]
struct AsyncCopy {
    /// Commit group number, or `UNCOMMITTED`.
    group: u32,
    dst: u32,
    src: u64,
    bytes: u32,
    src_bytes: u32,
    line: u32,
}

pub(super) const UNCOMMITTED: u32 = u32::MAX;
/// `SharedMemory::pending` marks: bytes a `cp.async` will write, bytes a TMA / bulk copy will write.
pub(super) const PENDING_CP_ASYNC: u8 = 1;
pub(super) const PENDING_BULK: u8 = 2;

/// The async proxy's queue of copies not yet landed in shared memory, per thread of the block.
pub(crate) struct AsyncQueue {
    pending: Vec<Vec<AsyncCopy>>,
    committed: Vec<u32>,
}

impl AsyncQueue {
    pub fn new(threads: usize) -> Self {
        AsyncQueue { pending: vec![Vec::new(); threads], committed: vec![0; threads] }
    }
    pub fn reset(&mut self) {
        self.pending.iter_mut().for_each(Vec::clear);
        self.committed.fill(0);
    }
}

pub(super) fn cvta(w: &mut Warp, inst: &Inst, space: Space, to_space: bool, bits: u32, exec: u32) -> Result<(), Fault> {
    let window = match space {
        Space::Shared => SHARED_WINDOW,
        Space::Local => LOCAL_WINDOW,
        Space::Param => PARAM_WINDOW,
        _ => 0,
    };
    for l in lanes(exec) {
        let a = w.val(&inst.s[0], l);
        let v = if to_space { a.wrapping_sub(window) } else { a.wrapping_add(window) };
        w.set(inst.d[0], l, if bits == 32 { v & 0xffff_ffff } else { v });
    }
    Ok(())
}

pub(super) fn isspace(w: &mut Warp, inst: &Inst, space: Space, exec: u32) {
    for l in lanes(exec) {
        let a = w.val(&inst.s[0], l);
        let in_window = |base: u64| a >= base && a < base + WINDOW_SIZE;
        let r = match space {
            Space::Shared => in_window(SHARED_WINDOW),
            Space::Local => in_window(LOCAL_WINDOW),
            Space::Param => in_window(PARAM_WINDOW),
            _ => !(in_window(SHARED_WINDOW) || in_window(LOCAL_WINDOW) || in_window(PARAM_WINDOW)),
        };
        w.set(inst.d[0], l, r as u64);
    }
}

fn space_name(l: Loc) -> &'static str {
    match l {
        Loc::Global(_) => "global",
        Loc::Shared(_) => "shared",
        Loc::Local(_) => "local",
        Loc::Param(_) => "param",
    }
}

impl BlockCtx<'_> {
    /// The location of `space` address `a`.
    #[inline]
    pub(crate) fn resolve(&self, space: Space, a: u64) -> Loc {
        match space {
            Space::Global | Space::Const => Loc::Global(a),
            Space::Shared => Loc::Shared(a as u32),
            Space::Local => Loc::Local(a as u32),
            Space::Param => Loc::Param(a as u32),
            Space::Generic => {
                let inw = |b: u64| a >= b && a < b + WINDOW_SIZE;
                if inw(SHARED_WINDOW) {
                    Loc::Shared((a - SHARED_WINDOW) as u32)
                } else if inw(LOCAL_WINDOW) {
                    Loc::Local((a - LOCAL_WINDOW) as u32)
                } else if inw(PARAM_WINDOW) {
                    Loc::Param((a - PARAM_WINDOW) as u32)
                } else {
                    Loc::Global(a)
                }
            }
        }
    }

    #[inline]
    pub(super) fn addr_of(w: &Warp, inst: &Inst, lane: usize) -> u64 {
        let a = inst.addr.expect("memory instruction has an address");
        a.base.map_or(0, |r| w.regs[r as usize * 32 + lane]).wrapping_add(a.offset as u64)
    }

    /// The programmatic-launch rule (`Pdl::hazard`) for an asynchronous copy's global bytes, checked when the copy is
    /// issued (it reads or writes them later, perhaps after the issuing thread's `griddepcontrol.wait`).
    pub(super) fn async_access_allowed(&self, w: &Warp, lane: usize, a: u64, len: usize, store: bool) -> Result<(), Fault> {
        if self.pdl.previous.is_none() || len == 0 {
            return Ok(());
        }
        if let Some((_, alloc, off)) = self.global.find(a, len) {
            if let Some((i, message)) = self.pdl.hazard(alloc, off, len, w.linear_tid(lane), store) {
                return fault(lane, format!("{message}: byte {i} of a {len}-byte asynchronous copy at {a:#x} ({})", self.global.describe(a)));
            }
        }
        Ok(())
    }

    fn shared_bounds(&self, off: u32, len: usize, lane: usize, what: &str) -> Result<usize, Fault> {
        let off = off as usize;
        if off + len > self.shared_size {
            return fault(
                lane,
                format!("out-of-bounds shared {what} of {len} bytes at shared offset {off:#x} (the block has {} bytes of shared memory)", self.shared_size),
            );
        }
        Ok(off)
    }

    fn local_bounds(&self, w: &Warp, off: u32, len: usize, lane: usize, what: &str) -> Result<usize, Fault> {
        let off = off as usize;
        if off + len > w.local_bytes {
            return fault(lane, format!("out-of-bounds local {what} of {len} bytes at local offset {off:#x} ({} bytes per thread)", w.local_bytes));
        }
        Ok(lane * w.local_bytes + off)
    }

    /// An L2 prefetch (`Op::PrefetchL2`): each active lane's range, clipped to the allocations it overlaps, joins
    /// `Counters::prefetch_sectors`. It reads no data (so no initialisation or programmatic-launch check: a GPU's
    /// prefetch has no architectural effect), and bytes outside every allocation count nothing, as a prefetch of an
    /// unmapped address is dropped on a GPU. `prefetch.L2 [a]` fetches a's whole 128-byte line: L2 allocates whole
    /// lines and a line prefetch fills all four of its 32-byte sectors (the unit a load would fill is the sector; a
    /// prefetch asks for the line). The bulk form's address and size must be multiples of 16 (PTX ISA, cp.async.bulk.prefetch).
    /// A lane's prefetch before its thread's `griddepcontrol.wait` joins `Counters::pre_wait_sectors` as a load would.
    pub(super) fn prefetch_l2(&mut self, w: &Warp, inst: &Inst, space: Space, bulk: bool, exec: u32) -> Result<(), Fault> {
        for l in lanes(exec) {
            let a = Self::addr_of(w, inst, l);
            let (start, bytes) = if bulk {
                let size = w.val(&inst.s[0], l);
                if size % 16 != 0 || a % 16 != 0 {
                    return fault(l, format!("cp.async.bulk.prefetch.L2 of {size} bytes at {a:#x}: the size and the address must be multiples of 16"));
                }
                (a, size)
            } else {
                match self.resolve(space, a) {
                    Loc::Global(a) => (a & !(crate::timing::L2_LINE_BYTES - 1), crate::timing::L2_LINE_BYTES),
                    // A generic address in the shared or local window: nothing of L2's.
                    _ => continue,
                }
            };
            let sectors = self.counters.prefetch_request(self.global.mapped_parts(start, bytes));
            // Issued before the thread's wait, it is DRAM traffic that overlaps the grid before, as a load there is.
            if self.pdl.before_wait(w.linear_tid(l)) {
                self.counters.pre_wait_prefetch(sectors);
            }
        }
        Ok(())
    }

    /// A kernel read of `out.len()` bytes: checked for bounds, initialisation, pending async copies and races.
    pub(crate) fn read(&mut self, w: &mut Warp, loc: Loc, lane: usize, out: &mut [u8]) -> Result<(), Fault> {
        let len = out.len();
        match loc {
            Loc::Global(a) => match (self.global.launch_seq, self.global.find_mut(a, len)) {
                (launch, Some((alloc, off))) => {
                    if let Some(i) = alloc.init[off..off + len].iter().position(|&b| b == 0) {
                        return fault(
                            lane,
                            format!("read of uninitialised global memory: byte {} of a {len}-byte read at {a:#x} ({})", i, self.global.describe(a)),
                        );
                    }
                    if let Some((i, message)) = self.pdl.hazard(alloc, off, len, w.linear_tid(lane), false) {
                        return fault(lane, format!("{message}: byte {i} of a {len}-byte read at {a:#x} ({})", self.global.describe(a)));
                    }
                    alloc.mark(off, len, MARK_READ, launch);
                    out.copy_from_slice(&alloc.data[off..off + len]);
                }
                (_, None) => return fault(lane, format!("out-of-bounds global read of {len} bytes at {a:#x} ({})", self.global.describe(a))),
            },
            Loc::Shared(o) => {
                let off = self.shared_bounds(o, len, lane, "read")?;
                if let Some(&kind) = self.shared.pending[off..off + len].iter().find(|&&p| p != 0) {
                    if kind == PENDING_BULK {
                        return fault(lane, format!("read of shared offset {off:#x} ({len} bytes) before the TMA / bulk copy writing it landed: wait on its mbarrier phase (try_wait/test_wait) before the read"));
                    }
                    return fault(lane, format!("read of shared offset {off:#x} ({len} bytes) that an in-flight cp.async will write: missing cp.async.wait_group/wait_all before the read"));
                }
                if let Some(i) = self.shared.init[off..off + len].iter().position(|&b| b == 0) {
                    return fault(lane, format!("read of uninitialised shared memory at offset {:#x}", off + i));
                }
                self.check_not_mbarrier(off, len, lane, "read")?;
                if let Some(r) = self.shared.track(off, len, w.linear_tid(lane), false) {
                    return fault(lane, self.race_message(&r, false));
                }
                out.copy_from_slice(&self.shared.data[off..off + len]);
            }
            Loc::Local(o) => {
                let at = self.local_bounds(w, o, len, lane, "read")?;
                if w.local_init[at..at + len].contains(&0) {
                    return fault(lane, format!("read of uninitialised local memory at offset {o:#x}"));
                }
                out.copy_from_slice(&w.local[at..at + len]);
            }
            Loc::Param(o) => {
                let o = o as usize;
                if o + len > self.params.len() {
                    return fault(lane, format!("out-of-bounds param read of {len} bytes at param offset {o} ({} bytes of params)", self.params.len()));
                }
                out.copy_from_slice(&self.params[o..o + len]);
            }
        }
        Ok(())
    }

    pub(crate) fn write(&mut self, w: &mut Warp, loc: Loc, lane: usize, data: &[u8], track: bool) -> Result<(), Fault> {
        let len = data.len();
        match loc {
            Loc::Global(a) => match (self.global.launch_seq, self.global.find_mut(a, len)) {
                (launch, Some((alloc, off))) => {
                    if let Some((i, message)) = self.pdl.hazard(alloc, off, len, w.linear_tid(lane), true) {
                        return fault(lane, format!("{message}: byte {i} of a {len}-byte write at {a:#x} ({})", self.global.describe(a)));
                    }
                    alloc.mark(off, len, MARK_WRITE, launch);
                    alloc.data[off..off + len].copy_from_slice(data);
                    alloc.init[off..off + len].fill(1);
                }
                (_, None) => return fault(lane, format!("out-of-bounds global write of {len} bytes at {a:#x} ({})", self.global.describe(a))),
            },
            Loc::Shared(o) => {
                let off = self.shared_bounds(o, len, lane, "write")?;
                if let Some(&kind) = self.shared.pending[off..off + len].iter().find(|&&p| p != 0) {
                    if kind == PENDING_BULK {
                        return fault(
                            lane,
                            format!("write to shared offset {off:#x} while a TMA / bulk copy to it is in flight (wait on its mbarrier phase first)"),
                        );
                    }
                    return fault(lane, format!("write to shared offset {off:#x} while a cp.async to it is in flight (missing cp.async.wait_group)"));
                }
                self.check_not_mbarrier(off, len, lane, "write")?;
                self.check_no_async_readers(off, len, lane)?;
                if track {
                    if let Some(r) = self.shared.track(off, len, w.linear_tid(lane), true) {
                        return fault(lane, self.race_message(&r, true));
                    }
                }
                self.shared.data[off..off + len].copy_from_slice(data);
                self.shared.init[off..off + len].fill(1);
                self.shared.generic_write(off, len, w.linear_tid(lane));
            }
            Loc::Local(o) => {
                let at = self.local_bounds(w, o, len, lane, "write")?;
                w.local[at..at + len].copy_from_slice(data);
                w.local_init[at..at + len].fill(1);
            }
            Loc::Param(o) => return fault(lane, format!("write to the param space at offset {o}: kernel parameters are read-only")),
        }
        Ok(())
    }

    /// A shared byte an unretired wgmma reads may not be overwritten (the buffer is released too early).
    #[inline]
    pub(super) fn check_no_async_readers(&self, off: usize, len: usize, lane: usize) -> Result<(), Fault> {
        if self.shared.async_read_bytes == 0 {
            return Ok(());
        }
        match self.shared.async_readers[off..off + len].iter().position(|&c| c > 0) {
            Some(i) => fault(lane, format!("write to shared offset {:#x}, which an unretired wgmma.mma_async still reads: the buffer is reused before the wgmma.wait_group that retires that wgmma", off + i)),
            None => Ok(()),
        }
    }

    /// An async-proxy read (wgmma operand, TMA / bulk store source) of bytes written by generic stores needs a
    /// `fence.proxy.async` between the two.
    pub(super) fn check_proxy_fenced(&self, off: usize, len: usize, issuer: u32, lane: usize, reader: &str) -> Result<(), Fault> {
        match self.shared.unfenced_generic_write(off, len, issuer) {
            Some((at, writer)) => fault(
                lane,
                format!(
                    "{reader} (async proxy) reads shared offset {at:#x}, which {} wrote with a generic-proxy store and no fence.proxy.async since (the writer, or this thread after it is ordered after the write, must execute fence.proxy.async)",
                    self.thread_name(writer)
                ),
            ),
            None => Ok(()),
        }
    }

    /// Only mbarrier instructions may touch an initialised mbarrier (PTX ISA §9.7.13.15.1).
    #[inline]
    fn check_not_mbarrier(&self, off: usize, len: usize, lane: usize, what: &str) -> Result<(), Fault> {
        if self.mbars.map.is_empty() {
            return Ok(());
        }
        match self.mbars.overlapping(off, len) {
            Some(at) => fault(lane, format!("plain {what} of {len} bytes at shared offset {off:#x} touches the initialised mbarrier at {at:#x} (only mbarrier instructions may access it until mbarrier.inval)")),
            None => Ok(()),
        }
    }

    pub(super) fn thread_name(&self, linear: u32) -> String {
        let [x, y, _] = self.ntid;
        format!("thread ({}, {}, {})", linear % x, linear / x % y, linear / (x * y))
    }

    fn race_message(&self, r: &Race, writing: bool) -> String {
        format!(
            "shared-memory race at offset {:#x}: this thread {} the byte that {} {} since the last barrier (missing bar.sync / __syncthreads, __syncwarp within a warp, or an mbarrier arrive -> wait pair ordering the two)",
            r.offset,
            if writing { "writes" } else { "reads" },
            self.thread_name(r.other_tid),
            if r.other_wrote { "wrote" } else { "read" }
        )
    }

    /// A load of `sectors` distinct sectors issued by the lanes `exec` of `w`: counted apart when one of them has not
    /// executed its `griddepcontrol.wait` yet (`Counters::pre_wait_sectors`).
    pub(super) fn count_if_before_wait(&mut self, w: &Warp, exec: u32, sectors: u64) {
        if lanes(exec).any(|l| self.pdl.before_wait(w.linear_tid(l))) {
            self.counters.pre_wait_load(sectors);
        }
    }

    /// Records the warp-wide request for the counters.
    fn count_request(&mut self, w: &Warp, inst: &Inst, space: Space, exec: u32, bytes: u32, write: bool) {
        let mut global = [(0u64, 0u32); 32];
        let mut shared = [(0u32, 0u32); 32];
        let (mut ng, mut ns) = (0, 0);
        for l in lanes(exec) {
            match self.resolve(space, Self::addr_of(w, inst, l)) {
                Loc::Global(a) => {
                    global[ng] = (a, bytes);
                    ng += 1;
                }
                Loc::Shared(o) => {
                    shared[ns] = (o, bytes);
                    ns += 1;
                }
                _ => {}
            }
        }
        if ng > 0 {
            let sectors = self.counters.global_request(&global[..ng], write);
            if !write {
                self.count_if_before_wait(w, exec, sectors);
            }
        }
        if ns > 0 {
            self.counters.shared_request(&shared[..ns]);
        }
    }

    pub(super) fn ld_st(&mut self, w: &mut Warp, inst: &Inst, exec: u32) -> Result<(), Fault> {
        let (space, ty, vec, store) = match inst.op {
            Op::Ld { space, ty, vec, .. } => (space, ty, vec, false),
            Op::St { space, ty, vec } => (space, ty, vec, true),
            _ => unreachable!(),
        };
        let eb = ty.bytes() as usize;
        let total = eb * vec as usize;
        if total > 16 && ty != Ty::B128 {
            return warp_fault(format!("{total}-byte vector access is not supported"));
        }
        self.count_request(w, inst, space, exec, total as u32, store);
        let mut buf = [0u8; 32];
        for l in lanes(exec) {
            let a = Self::addr_of(w, inst, l);
            if a % (total.min(16) as u64).max(1) != 0 && !matches!(space, Space::Param) {
                return fault(l, format!("misaligned {}-byte {} at {a:#x}", total, if store { "store" } else { "load" }));
            }
            let loc = self.resolve(space, a);
            if store {
                for e in 0..vec as usize {
                    let v = w.val(&inst.s[e], l);
                    buf[e * eb..(e + 1) * eb].copy_from_slice(&v.to_le_bytes()[..eb.min(8)]);
                }
                self.write(w, loc, l, &buf[..total], true)?;
            } else {
                self.read(w, loc, l, &mut buf[..total]).map_err(|f| Fault { message: format!("{} ({} space)", f.message, space_name(loc)), ..f })?;
                for e in 0..vec as usize {
                    let mut raw = [0u8; 8];
                    raw[..eb.min(8)].copy_from_slice(&buf[e * eb..e * eb + eb.min(8)]);
                    let v = u64::from_le_bytes(raw);
                    w.set(inst.d[e], l, if ty.is_signed() { ty.ext(v) } else { v });
                }
            }
        }
        Ok(())
    }

    pub(super) fn atom(&mut self, w: &mut Warp, inst: &Inst, exec: u32) -> Result<(), Fault> {
        let Op::Atom { space, op, ty, returns, vec } = inst.op else { unreachable!() };
        if vec != 1 {
            return warp_fault("vector atomics are not supported");
        }
        let eb = ty.bytes() as usize;
        self.count_request(w, inst, space, exec, eb as u32, false);
        let is_global = matches!(self.resolve(space, Self::addr_of(w, inst, exec.trailing_zeros() as usize)), Loc::Global(_));
        if is_global {
            self.counters.global_bytes_written += (exec.count_ones() as usize * eb) as u64;
        }
        let mut buf = [0u8; 8];
        for l in lanes(exec) {
            let a = Self::addr_of(w, inst, l);
            if a % eb as u64 != 0 {
                return fault(l, format!("misaligned {eb}-byte atomic at {a:#x}"));
            }
            let loc = self.resolve(space, a);
            self.read_untracked(w, loc, l, &mut buf[..eb])?;
            let old = u64::from_le_bytes(buf);
            let b = w.val(&inst.s[0], l);
            let c = if inst.s.len() > 1 { w.val(&inst.s[1], l) } else { 0 };
            let new = atom_apply(op, ty, old, b, c).map_err(|m| Fault { lane: Some(l), message: m })?;
            self.write(w, loc, l, &new.to_le_bytes()[..eb], false)?;
            if returns {
                w.set(inst.d[0], l, if ty.is_signed() { ty.ext(old) } else { old });
            }
            buf = [0; 8];
        }
        Ok(())
    }

    /// Atomic reads are not part of the race detector (atomics never race with each other).
    fn read_untracked(&mut self, w: &mut Warp, loc: Loc, lane: usize, out: &mut [u8]) -> Result<(), Fault> {
        let saved = self.shared.race_check;
        self.shared.race_check = false;
        let r = self.read(w, loc, lane, out);
        self.shared.race_check = saved;
        r
    }

    pub(super) fn cp_async(&mut self, w: &mut Warp, inst: &Inst, bytes: u32, zfill: bool, exec: u32) -> Result<(), Fault> {
        if !matches!(bytes, 4 | 8 | 16) {
            return warp_fault(format!("cp.async of {bytes} bytes (the sizes are 4, 8 and 16)"));
        }
        let mut ranges = Vec::new();
        for l in lanes(exec) {
            let dst = Self::addr_of(w, inst, l);
            let dst = match self.resolve(Space::Shared, dst) {
                Loc::Shared(o) => o,
                _ => unreachable!(),
            };
            let src = w.val(&inst.s[0], l).wrapping_add(w.val(&inst.s[1], l));
            let src_bytes = if zfill { (w.val(&inst.s[2], l) as u32).min(bytes) } else { bytes };
            let off = self.shared_bounds(dst, bytes as usize, l, "cp.async destination")?;
            if dst % bytes != 0 || src % bytes as u64 != 0 {
                return fault(l, format!("misaligned {bytes}-byte cp.async (shared {dst:#x}, global {src:#x})"));
            }
            if src_bytes > 0 && self.global.find(src, src_bytes as usize).is_none() {
                return fault(l, format!("out-of-bounds cp.async source: {src_bytes} bytes at {src:#x} ({})", self.global.describe(src)));
            }
            // The copy reads its source when it lands, perhaps after this thread's griddepcontrol.wait: the
            // programmatic-launch rule applies at the issue.
            self.async_access_allowed(w, l, src, src_bytes as usize, false)?;
            if src_bytes > 0 {
                ranges.push((src, src_bytes));
            }
            self.shared.pending[off..off + bytes as usize].fill(PENDING_CP_ASYNC);
            let tid = w.linear_tid(l) as usize;
            self.asyncq.pending[tid].push(AsyncCopy { group: UNCOMMITTED, dst, src, bytes, src_bytes, line: inst.line });
        }
        if !ranges.is_empty() {
            let sectors = self.counters.global_request(&ranges, false);
            self.count_if_before_wait(w, exec, sectors);
        }
        Ok(())
    }

    pub(super) fn cp_async_commit(&mut self, w: &mut Warp, exec: u32) {
        for l in lanes(exec) {
            let tid = w.linear_tid(l) as usize;
            let g = self.asyncq.committed[tid];
            for c in self.asyncq.pending[tid].iter_mut().filter(|c| c.group == UNCOMMITTED) {
                c.group = g;
            }
            self.asyncq.committed[tid] += 1;
        }
    }

    /// Lands every copy of the waiting threads except those in the `n` most recent committed groups
    /// (`u32::MAX`: wait_all, everything including uncommitted copies).
    pub(super) fn cp_async_wait(&mut self, w: &mut Warp, n: u32, exec: u32) -> Result<(), Fault> {
        for l in lanes(exec) {
            let tid = w.linear_tid(l) as usize;
            let committed = self.asyncq.committed[tid];
            // Land in issue order; the queue is taken out and put back so no allocation happens per wait.
            let mut queue = std::mem::take(&mut self.asyncq.pending[tid]);
            let mut kept = 0;
            let mut result = Ok(());
            for i in 0..queue.len() {
                let c = queue[i].clone();
                let lands = n == u32::MAX || (c.group != UNCOMMITTED && c.group + n < committed);
                if !lands {
                    queue.swap(kept, i);
                    kept += 1;
                } else if result.is_ok() {
                    result = self.land(w, l, &c);
                }
            }
            queue.truncate(kept);
            self.asyncq.pending[tid] = queue;
            result?;
        }
        Ok(())
    }

    fn land(&mut self, w: &mut Warp, l: usize, c: &AsyncCopy) -> Result<(), Fault> {
        let mut data = [0u8; 16];
        let data = &mut data[..c.bytes as usize];
        if c.src_bytes > 0 {
            self.read(w, Loc::Global(c.src), l, &mut data[..c.src_bytes as usize])
                .map_err(|f| Fault { message: format!("{} (source of the cp.async at PTX line {})", f.message, c.line), ..f })?;
        }
        let off = c.dst as usize;
        self.shared.pending[off..off + c.bytes as usize].fill(0);
        self.write(w, Loc::Shared(c.dst), l, data, true)
    }

    #[allow(clippy::needless_range_loop)] // matrix m, row r index both the rows and the supplying lane
    pub(super) fn ldmatrix(&mut self, w: &mut Warp, inst: &Inst, num: u32, trans: bool, exec: u32) -> Result<(), Fault> {
        if exec != u32::MAX {
            return warp_fault(format!("ldmatrix needs all 32 lanes of the warp converged (active {exec:#010x})"));
        }
        // rows[m][r] = the 8 b16 elements of row r of matrix m, read from the address lane 8m+r supplies.
        let mut rows = [[[0u16; 8]; 8]; 4];
        let mut ranges = [(0u32, 0u32); 32];
        let mut nr = 0;
        for m in 0..num as usize {
            for r in 0..8 {
                let lane = m * 8 + r;
                let a = Self::addr_of(w, inst, lane);
                if a % 16 != 0 {
                    return fault(lane, format!("ldmatrix row address {a:#x} is not 16-byte aligned"));
                }
                let loc = self.resolve(Space::Shared, a);
                if let Loc::Shared(o) = loc {
                    ranges[nr] = (o, 16);
                    nr += 1;
                }
                let mut buf = [0u8; 16];
                self.read(w, loc, lane, &mut buf)?;
                for c in 0..8 {
                    rows[m][r][c] = u16::from_le_bytes([buf[2 * c], buf[2 * c + 1]]);
                }
            }
        }
        self.counters.shared_request(&ranges[..nr]);
        for l in 0..32 {
            let (g, t) = (l / 4, l % 4);
            for m in 0..num as usize {
                let (lo, hi) = if trans { (rows[m][2 * t][g], rows[m][2 * t + 1][g]) } else { (rows[m][g][2 * t], rows[m][g][2 * t + 1]) };
                w.set(inst.d[m], l, lo as u64 | (hi as u64) << 16);
            }
        }
        Ok(())
    }

    #[allow(clippy::needless_range_loop)]
    pub(super) fn stmatrix(&mut self, w: &mut Warp, inst: &Inst, num: u32, trans: bool, exec: u32) -> Result<(), Fault> {
        if exec != u32::MAX {
            return warp_fault("stmatrix needs all 32 lanes of the warp converged");
        }
        let mut rows = [[[0u16; 8]; 8]; 4];
        for l in 0..32 {
            let (g, t) = (l / 4, l % 4);
            for m in 0..num as usize {
                let v = w.val(&inst.s[m], l);
                let (lo, hi) = (v as u16, (v >> 16) as u16);
                if trans {
                    rows[m][2 * t][g] = lo;
                    rows[m][2 * t + 1][g] = hi;
                } else {
                    rows[m][g][2 * t] = lo;
                    rows[m][g][2 * t + 1] = hi;
                }
            }
        }
        let mut ranges = Vec::new();
        for m in 0..num as usize {
            for r in 0..8 {
                let lane = m * 8 + r;
                let a = Self::addr_of(w, inst, lane);
                let loc = self.resolve(Space::Shared, a);
                if let Loc::Shared(o) = loc {
                    ranges.push((o, 16));
                }
                let mut buf = [0u8; 16];
                for c in 0..8 {
                    buf[2 * c..2 * c + 2].copy_from_slice(&rows[m][r][c].to_le_bytes());
                }
                self.write(w, loc, lane, &buf, true)?;
            }
        }
        self.counters.shared_request(&ranges);
        Ok(())
    }
}

fn atom_apply(op: AtomOp, ty: Ty, old: u64, b: u64, c: u64) -> Result<u64, String> {
    let f32op = |f: fn(f32, f32) -> f32| f(f32::from_bits(old as u32), f32::from_bits(b as u32)).to_bits() as u64;
    let halves = |fmt: float::Format, n: u32, f: fn(f64, f64) -> f64| {
        let mut out = 0u64;
        for h in 0..n {
            let x = float::decode((old >> (16 * h)) as u32 & 0xffff, fmt);
            let y = float::decode((b >> (16 * h)) as u32 & 0xffff, fmt);
            out |= (float::encode(f(x, y), fmt, Rnd::Rn, false) as u64) << (16 * h);
        }
        out
    };
    let s = ty.is_signed();
    let (so, sb) = (ty.ext(old) as i64, ty.ext(b) as i64);
    let (uo, ub) = (ty.mask(old), ty.mask(b));
    Ok(ty.mask(match (op, ty) {
        // The ISA: atom.add.f32 flushes subnormal inputs and results to sign-preserving zero.
        (AtomOp::Add, Ty::F32) => f32op(|x, y| float::ftz32(float::ftz32(x) + float::ftz32(y))),
        (AtomOp::Add, Ty::F64) => (f64::from_bits(old) + f64::from_bits(b)).to_bits(),
        (AtomOp::Add, Ty::F16) => halves(float::F16, 1, |x, y| x + y),
        (AtomOp::Add, Ty::F16x2) => halves(float::F16, 2, |x, y| x + y),
        (AtomOp::Add, Ty::Bf16) => halves(float::BF16, 1, |x, y| x + y),
        (AtomOp::Add, Ty::Bf16x2) => halves(float::BF16, 2, |x, y| x + y),
        (AtomOp::Min | AtomOp::Max, Ty::F32) => {
            let (x, y) = (f32::from_bits(old as u32), f32::from_bits(b as u32));
            (if (op == AtomOp::Min) == (y < x) { y } else { x }).to_bits() as u64
        }
        (AtomOp::Min | AtomOp::Max, Ty::Bf16 | Ty::Bf16x2 | Ty::F16 | Ty::F16x2) => {
            let fmt = if matches!(ty, Ty::Bf16 | Ty::Bf16x2) { float::BF16 } else { float::F16 };
            let n = if matches!(ty, Ty::Bf16x2 | Ty::F16x2) { 2 } else { 1 };
            if op == AtomOp::Min {
                halves(fmt, n, |x, y| x.min(y))
            } else {
                halves(fmt, n, |x, y| x.max(y))
            }
        }
        (_, t) if t.is_float() => return Err(format!("atomic {op:?} on {ty:?} is not supported")),
        (AtomOp::Add, _) => old.wrapping_add(b),
        (AtomOp::Min, _) => {
            if s {
                so.min(sb) as u64
            } else {
                uo.min(ub)
            }
        }
        (AtomOp::Max, _) => {
            if s {
                so.max(sb) as u64
            } else {
                uo.max(ub)
            }
        }
        (AtomOp::Inc, _) => {
            if uo >= ub {
                0
            } else {
                uo + 1
            }
        }
        (AtomOp::Dec, _) => {
            if uo == 0 || uo > ub {
                ub
            } else {
                uo - 1
            }
        }
        (AtomOp::And, _) => old & b,
        (AtomOp::Or, _) => old | b,
        (AtomOp::Xor, _) => old ^ b,
        (AtomOp::Exch, _) => b,
        (AtomOp::Cas, _) => {
            if uo == ub {
                c
            } else {
                old
            }
        }
    }))
}
