//! TMA and bulk copies (PTX ISA §9.7.9.25): `cp.async.bulk.tensor` tile loads and stores through a tensor map,
//! non-tensor `cp.async.bulk` copies, and bulk async-groups.
//!
//! Policy (../shared/HOPPER-ASYNC.md §2.6): a load reads its whole source at issue (bounds and initialisation errors
//! name the issuing line), marks its destination bytes pending, and lands when a thread waits on its mbarrier (or
//! when no warp can run): landing writes the bytes, attributes them to the issuing thread at the issue for the race
//! detector, and performs the mbarrier's complete_tx, which carries the release. A read of a pending byte is
//! the "TMA destination read before its phase completed" error. A store snapshots its shared source at issue and
//! writes global memory at the `cp.async.bulk.wait_group` that retires its group (or at the end of the CTA).

use super::mem::{Loc, PENDING_BULK, UNCOMMITTED};
use super::{fault, lanes, warp_fault, BlockCtx, Fault, Warp};
use crate::ir::*;
use crate::memory::{SHARED_WINDOW, WINDOW_SIZE};
use crate::tensor_map::{swizzle_offset, TensorMap};

/// A load in flight: element `k` (`eb` bytes of `data`) goes to shared offset `dst[k]`.
pub(crate) struct PendingLoad {
    pub mbar: u32,
    dst: Vec<u32>,
    eb: u32,
    data: Vec<u8>,
    /// The transaction bytes it completes (the whole box, out-of-bounds elements included).
    bytes: u32,
    tid: u32,
    /// The issuing warp's clock published at the issue.
    clock: Vec<u32>,
    pub pc: u32,
    line: u32,
}

/// A store in flight: (global address, length) runs of `data`.
struct PendingStore {
    group: u32,
    writes: Vec<(u64, u32)>,
    data: Vec<u8>,
    line: u32,
}

/// The CTA's TMA / bulk copies in flight.
pub(crate) struct BulkQueue {
    pub loads: Vec<PendingLoad>,
    stores: Vec<Vec<PendingStore>>,
    committed: Vec<u32>,
}

impl BulkQueue {
    pub fn new(threads: usize) -> Self {
        BulkQueue { loads: Vec::new(), stores: (0..threads).map(|_| Vec::new()).collect(), committed: vec![0; threads] }
    }
}

/// A shared-space operand value as a CTA shared offset (a generic shared-window address is accepted too).
fn shared_offset(a: u64) -> u32 {
    if (SHARED_WINDOW..SHARED_WINDOW + WINDOW_SIZE).contains(&a) {
        (a - SHARED_WINDOW) as u32
    } else {
        a as u32
    }
}

impl BlockCtx<'_> {
    /// Reads and decodes the tensor map at generic address `a`.
    fn tensor_map(&mut self, w: &mut Warp, l: usize, a: u64) -> Result<TensorMap, Fault> {
        if a % 64 != 0 {
            return fault(l, format!("tensor map address {a:#x} is not 64-byte aligned"));
        }
        let loc = self.resolve(Space::Generic, a);
        if let Loc::Local(_) = loc {
            return fault(
                l,
                format!("tensor map at {a:#x} is in local memory: pass it as a `const __grid_constant__ CUtensorMap` parameter (or in global/constant memory)"),
            );
        }
        let mut bytes = [0u8; 128];
        self.read(w, loc, l, &mut bytes).map_err(|f| Fault { message: format!("{} (reading the tensor map)", f.message), ..f })?;
        let map = TensorMap::decode(&bytes);
        if map.interleave != 0 {
            return fault(l, "tensor map with an interleaved layout: not supported by the interpreter");
        }
        if matches!(map.data_type, 11 | 12) || map.oob_fill != 0 {
            return fault(l, "tensor map with a TFLOAT32 data type or the NaN OOB fill: not supported by the interpreter (the hardware's conversion and NaN bits are unverified)");
        }
        Ok(map)
    }

    /// The box of `map` at `coords`, element by element: (dense byte offset in the box, global address if in bounds).
    fn box_elements(map: &TensorMap, coords: &[i64]) -> (u32, Vec<(u32, Option<u64>)>) {
        let eb = map.element_bytes();
        let r = map.rank as usize;
        let mut n = [1u32; 5];
        let mut es = [1u32; 5];
        for i in 0..r {
            es[i] = if i == 0 { 1 } else { map.element_strides[i] };
            n[i] = map.box_dim[i].div_ceil(es[i]);
        }
        let total: u32 = n.iter().product();
        let mut out = Vec::with_capacity(total as usize);
        for idx in 0..total {
            let mut rest = idx;
            let mut addr = Some(map.global_address);
            for i in 0..r {
                let j = rest % n[i];
                rest /= n[i];
                let x = coords[i] + (j * es[i]) as i64;
                addr = match addr {
                    Some(a) if x >= 0 && (x as u64) < map.global_dim[i] => Some(a.wrapping_add(x as u64 * map.global_strides[i])),
                    _ => None,
                };
            }
            out.push((idx * eb, addr));
        }
        (eb * total, out)
    }

    /// The mbarrier operand (two sources from `at`) as a checked shared offset of an initialised barrier.
    fn copy_mbarrier(&self, w: &Warp, inst: &Inst, at: usize, l: usize) -> Result<u32, Fault> {
        let off = shared_offset(w.val(&inst.s[at], l).wrapping_add(w.val(&inst.s[at + 1], l)));
        if !self.mbars.map.contains_key(&off) {
            return fault(l, format!("async copy completing on shared offset {off:#x}, which holds no initialised mbarrier"));
        }
        Ok(off)
    }

    /// Queues a load of `data` (element `k` to `dst[k]`), marking the destination pending.
    #[allow(clippy::too_many_arguments)]
    fn queue_load(&mut self, w: &Warp, inst: &Inst, pc: u32, l: usize, mbar: u32, dst: Vec<u32>, eb: u32, data: Vec<u8>, bytes: u32) -> Result<(), Fault> {
        for &d in &dst {
            let r = d as usize..(d + eb) as usize;
            if self.shared.pending[r.clone()].iter().any(|&p| p != 0) {
                return fault(l, format!("async copy into shared offset {d:#x}, which an unfinished async copy already writes"));
            }
            self.check_not_mbarrier_bytes(r.start, eb as usize, l)?;
            self.check_no_async_readers(r.start, eb as usize, l)?;
            self.shared.pending[r].fill(PENDING_BULK);
        }
        let clock = self.shared.release(w.index as usize);
        self.loads_queue().push(PendingLoad { mbar, dst, eb, data, bytes, tid: w.linear_tid(l), clock, pc, line: inst.line });
        Ok(())
    }

    fn loads_queue(&mut self) -> &mut Vec<PendingLoad> {
        &mut self.bulk.loads
    }

    fn check_not_mbarrier_bytes(&self, off: usize, len: usize, l: usize) -> Result<(), Fault> {
        match self.mbars.overlapping(off, len) {
            Some(at) => fault(l, format!("async copy into shared offset {off:#x} overwrites the initialised mbarrier at {at:#x}")),
            None => Ok(()),
        }
    }

    pub(super) fn tma_load(&mut self, w: &mut Warp, inst: &Inst, pc: u32, dims: u32, exec: u32) -> Result<(), Fault> {
        let d = dims as usize;
        for l in lanes(exec) {
            if let Some(mask) = inst.s.get(4 + d) {
                let mask = w.val(mask, l) & 0xffff;
                if mask != 1 {
                    return fault(l, format!("multicast ctaMask {mask:#x}: clusters have one CTA in the interpreter (the mask must be 0x1)"));
                }
            }
            let map_addr = w.val(&inst.s[0], l).wrapping_add(w.val(&inst.s[1], l));
            let map = self.tensor_map(w, l, map_addr)?;
            if map.rank != dims {
                return fault(l, format!("{dims}d tensor copy with a rank-{} tensor map", map.rank));
            }
            let coords: Vec<i64> = (0..d).map(|i| w.val(&inst.s[2 + i], l) as u32 as i32 as i64).collect();
            let mbar = self.copy_mbarrier(w, inst, 2 + d, l)?;
            let dst = shared_offset(Self::addr_of(w, inst, l));
            if dst % 16 != 0 {
                return fault(l, format!("TMA destination shared offset {dst:#x} is not 16-byte aligned"));
            }
            let (bytes, elems) = Self::box_elements(&map, &coords);
            if dst as usize + bytes as usize > self.shared_size {
                return fault(
                    l,
                    format!("TMA box of {bytes} bytes at shared offset {dst:#x} overruns the block's {} bytes of shared memory", self.shared_size),
                );
            }
            let eb = map.element_bytes();
            let sectors = self.counters.async_copy(elems.iter().filter_map(|&(_, src)| src.map(|a| (a, eb))));
            self.count_if_before_wait(w, 1 << l, sectors);
            let mut data = vec![0u8; bytes as usize];
            let mut dsts = Vec::with_capacity(elems.len());
            for (lin, src) in elems {
                if let Some(a) = src {
                    let at = lin as usize;
                    self.read(w, Loc::Global(a), l, &mut data[at..at + eb as usize])
                        .map_err(|f| Fault { message: format!("{} (TMA source element)", f.message), ..f })?;
                }
                dsts.push(swizzle_offset(dst + lin, map.swizzle));
            }
            self.counters.global_bytes_read += bytes as u64;
            self.queue_load(w, inst, pc, l, mbar, dsts, eb, data, bytes)?;
        }
        Ok(())
    }

    pub(super) fn bulk_load(&mut self, w: &mut Warp, inst: &Inst, pc: u32, exec: u32) -> Result<(), Fault> {
        for l in lanes(exec) {
            if let Some(mask) = inst.s.get(5) {
                let mask = w.val(mask, l) & 0xffff;
                if mask != 1 {
                    return fault(l, format!("multicast ctaMask {mask:#x}: clusters have one CTA in the interpreter (the mask must be 0x1)"));
                }
            }
            let src = w.val(&inst.s[0], l).wrapping_add(w.val(&inst.s[1], l));
            let size = w.val(&inst.s[2], l) as u32;
            let mbar = self.copy_mbarrier(w, inst, 3, l)?;
            let dst = shared_offset(Self::addr_of(w, inst, l));
            if size % 16 != 0 || dst % 16 != 0 || src % 16 != 0 {
                return fault(l, format!("cp.async.bulk of {size} bytes from {src:#x} to shared {dst:#x}: size and both addresses must be multiples of 16"));
            }
            if dst as usize + size as usize > self.shared_size {
                return fault(
                    l,
                    format!("cp.async.bulk of {size} bytes at shared offset {dst:#x} overruns the block's {} bytes of shared memory", self.shared_size),
                );
            }
            let mut data = vec![0u8; size as usize];
            self.read(w, Loc::Global(src), l, &mut data).map_err(|f| Fault { message: format!("{} (cp.async.bulk source)", f.message), ..f })?;
            self.counters.global_bytes_read += size as u64;
            let sectors = self.counters.async_copy([(src, size)]);
            self.count_if_before_wait(w, 1 << l, sectors);
            let dsts = (0..size / 16).map(|k| dst + 16 * k).collect();
            self.queue_load(w, inst, pc, l, mbar, dsts, 16, data, size)?;
        }
        Ok(())
    }

    /// Lands the queued loads completing on `mbar` (all of them for None), in issue order.
    pub(super) fn land_loads(&mut self, mbar: Option<u32>) -> Result<(), Fault> {
        if self.bulk.loads.is_empty() {
            return Ok(());
        }
        let (landing, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.bulk.loads).into_iter().partition(|ld| mbar.is_none_or(|m| ld.mbar == m));
        self.bulk.loads = kept;
        for ld in landing {
            self.land_load(ld)?;
        }
        Ok(())
    }

    /// The issuing thread and PTX position of the first queued load (for errors raised while landing it).
    pub(super) fn first_load_site(&self) -> Option<(u32, u32)> {
        self.bulk.loads.first().map(|ld| (ld.tid, ld.pc))
    }

    fn land_load(&mut self, ld: PendingLoad) -> Result<(), Fault> {
        let own = ld.clock[(ld.tid / 32) as usize];
        for (k, &d) in ld.dst.iter().enumerate() {
            let (off, eb) = (d as usize, ld.eb as usize);
            self.shared.pending[off..off + eb].fill(0);
            if let Some(r) = self.shared.track_at(off, eb, ld.tid, true, own) {
                let other = self.thread_name(r.other_tid);
                return warp_fault(format!(
                    "the async copy issued at PTX line {} by {} writes shared offset {:#x}, which {other} {} without being ordered before the copy's issue (e.g. the consumer released the buffer before it finished reading it)",
                    ld.line,
                    self.thread_name(ld.tid),
                    r.offset,
                    if r.other_wrote { "wrote" } else { "read" }
                ));
            }
            self.shared.data[off..off + eb].copy_from_slice(&ld.data[k * eb..(k + 1) * eb]);
            self.shared.init[off..off + eb].fill(1);
            self.shared.async_write(off, eb);
        }
        let Some(b) = self.mbars.map.get_mut(&ld.mbar) else {
            return warp_fault(format!(
                "the mbarrier at shared offset {:#x} of the async copy issued at PTX line {} was invalidated before the copy completed",
                ld.mbar, ld.line
            ));
        };
        b.join_release(&ld.clock);
        b.tx -= ld.bytes as i64;
        b.complete_if_done();
        self.mbars.version += 1;
        Ok(())
    }

    pub(super) fn tma_store(&mut self, w: &mut Warp, inst: &Inst, dims: u32, exec: u32) -> Result<(), Fault> {
        let d = dims as usize;
        for l in lanes(exec) {
            let map_addr = w.val(&inst.s[0], l).wrapping_add(w.val(&inst.s[1], l));
            let map = self.tensor_map(w, l, map_addr)?;
            if map.rank != dims {
                return fault(l, format!("{dims}d tensor copy with a rank-{} tensor map", map.rank));
            }
            let coords: Vec<i64> = (0..d).map(|i| w.val(&inst.s[2 + i], l) as u32 as i32 as i64).collect();
            if let Some((i, c)) = coords.iter().enumerate().find(|(_, &c)| c < 0) {
                return fault(l, format!("TMA store with coordinate {i} = {c}: a store box may overhang the end of the tensor but not start before it (CUDA Programming Guide §4.11.2)"));
            }
            let src = shared_offset(Self::addr_of(w, inst, l));
            if src % 16 != 0 {
                return fault(l, format!("TMA store source shared offset {src:#x} is not 16-byte aligned"));
            }
            let (_, elems) = Self::box_elements(&map, &coords);
            let eb = map.element_bytes() as usize;
            let mut store = PendingStore { group: UNCOMMITTED, writes: Vec::new(), data: Vec::new(), line: inst.line };
            let mut buf = [0u8; 8];
            for (lin, dst) in elems {
                let Some(a) = dst else { continue };
                let off = swizzle_offset(src + lin, map.swizzle);
                self.read(w, Loc::Shared(off), l, &mut buf[..eb]).map_err(|f| Fault { message: format!("{} (TMA store source)", f.message), ..f })?;
                self.check_proxy_fenced(off as usize, eb, w.linear_tid(l), l, "the TMA store")?;
                self.async_access_allowed(w, l, a, eb, true)?;
                store.writes.push((a, eb as u32));
                store.data.extend_from_slice(&buf[..eb]);
            }
            self.counters.global_bytes_written += store.data.len() as u64;
            self.counters.async_copy(store.writes.iter().copied());
            self.bulk.stores[w.linear_tid(l) as usize].push(store);
        }
        Ok(())
    }

    pub(super) fn bulk_store(&mut self, w: &mut Warp, inst: &Inst, exec: u32) -> Result<(), Fault> {
        for l in lanes(exec) {
            let dst = w.val(&inst.s[0], l).wrapping_add(w.val(&inst.s[1], l));
            let size = w.val(&inst.s[2], l) as u32;
            let src = shared_offset(Self::addr_of(w, inst, l));
            if size % 16 != 0 || dst % 16 != 0 || src % 16 != 0 {
                return fault(l, format!("cp.async.bulk of {size} bytes from shared {src:#x} to {dst:#x}: size and both addresses must be multiples of 16"));
            }
            let mut data = vec![0u8; size as usize];
            self.read(w, Loc::Shared(src), l, &mut data).map_err(|f| Fault { message: format!("{} (cp.async.bulk source)", f.message), ..f })?;
            self.check_proxy_fenced(src as usize, size as usize, w.linear_tid(l), l, "the bulk store")?;
            self.async_access_allowed(w, l, dst, size as usize, true)?;
            self.counters.global_bytes_written += size as u64;
            self.counters.async_copy([(dst, size)]);
            self.bulk.stores[w.linear_tid(l) as usize].push(PendingStore { group: UNCOMMITTED, writes: vec![(dst, size)], data, line: inst.line });
        }
        Ok(())
    }

    pub(super) fn bulk_commit(&mut self, w: &Warp, exec: u32) {
        for l in lanes(exec) {
            let tid = w.linear_tid(l) as usize;
            let g = self.bulk.committed[tid];
            for s in self.bulk.stores[tid].iter_mut().filter(|s| s.group == UNCOMMITTED) {
                s.group = g;
            }
            self.bulk.committed[tid] += 1;
        }
    }

    /// Completes the bulk groups of the waiting threads but the `n` most recent (`.read` waits too: the sources were
    /// read at issue, and the global writes are done here so they are visible after either wait).
    pub(super) fn bulk_wait(&mut self, w: &mut Warp, n: u32, exec: u32) -> Result<(), Fault> {
        for l in lanes(exec) {
            let tid = w.linear_tid(l) as usize;
            let committed = self.bulk.committed[tid];
            let (done, kept): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.bulk.stores[tid]).into_iter().partition(|s| s.group != UNCOMMITTED && s.group + n < committed);
            self.bulk.stores[tid] = kept;
            for s in done {
                self.finish_store(w, l, &s)?;
            }
        }
        Ok(())
    }

    fn finish_store(&mut self, w: &mut Warp, l: usize, s: &PendingStore) -> Result<(), Fault> {
        let mut at = 0usize;
        for &(a, len) in &s.writes {
            self.write(w, Loc::Global(a), l, &s.data[at..at + len as usize], false)
                .map_err(|f| Fault { message: format!("{} (the async store issued at PTX line {})", f.message, s.line), ..f })?;
            at += len as usize;
        }
        Ok(())
    }

    /// At the end of the CTA: the stores nobody waited for still reach global memory.
    pub(super) fn flush_stores(&mut self, warps: &mut [Warp]) -> Result<(), (Fault, usize)> {
        for tid in 0..self.bulk.stores.len() {
            for s in std::mem::take(&mut self.bulk.stores[tid]) {
                let w = &mut warps[tid / 32];
                self.finish_store(w, tid % 32, &s).map_err(|f| (f, tid / 32))?;
            }
        }
        Ok(())
    }
}
