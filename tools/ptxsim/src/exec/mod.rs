//! The executor: blocks one at a time; inside a block, warps of 32 lanes run until every lane has exited or waits at
//! a barrier, then the next warp runs (so a `bar.sync` is a block rendezvous). Inside a warp, the lanes with the
//! smallest PC run together (min-PC reconvergence: structured code reconverges at post-dominators), so warp
//! collectives (shfl, vote, ldmatrix, mma) see the whole converged warp at once.

mod alu;
mod collective;
mod mbarrier;
mod mem;
mod tma;
mod wgmma;

use crate::counters::Counters;
use crate::float::TensorArith;
use crate::ir::*;
use crate::memory::{Allocation, GlobalMemory, SharedMemory, MARK_READ, MARK_WRITE};
use crate::{Module, SimError, Site};

pub(crate) use mbarrier::Mbarriers;
pub(crate) use mem::AsyncQueue;
pub(crate) use tma::BulkQueue;
pub(crate) use wgmma::WgState;

/// Barrier slots: ids 0..16 of `bar`/`barrier`, then the cluster barrier (`barrier.cluster`, one CTA per cluster).
const NUM_BARRIERS: usize = 17;
const CLUSTER_BARRIER: usize = 16;

/// Iterates the set bits of a lane mask.
#[inline(always)]
pub(crate) fn lanes(mut mask: u32) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if mask == 0 {
            None
        } else {
            let l = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            Some(l)
        }
    })
}

/// An error inside an instruction, before the kernel/block/thread/line are attached.
pub(crate) struct Fault {
    pub lane: Option<usize>,
    pub message: String,
}

pub(crate) fn fault<T>(lane: usize, message: impl Into<String>) -> Result<T, Fault> {
    Err(Fault { lane: Some(lane), message: message.into() })
}

pub(crate) fn warp_fault<T>(message: impl Into<String>) -> Result<T, Fault> {
    Err(Fault { lane: None, message: message.into() })
}

/// Per-block identifiers read by special registers.
#[derive(Clone, Copy)]
pub(crate) struct Ids {
    pub ctaid: [u32; 3],
    pub ntid: [u32; 3],
    pub nctaid: [u32; 3],
    pub dynamic_smem: u32,
    pub total_smem: u32,
}

pub(crate) struct Warp {
    pub index: u32,
    /// Registers as per-lane arrays: register r of lane l is `regs[r * 32 + l]`.
    pub regs: Vec<u64>,
    pub pc: [u32; 32],
    /// When Some(p), every runnable lane is at p (and `pc` may be stale for them).
    pub converged: Option<u32>,
    /// Lanes that exist and have not exited.
    pub live: u32,
    /// Lanes waiting at a barrier; `wait[id]` says which barrier.
    pub blocked: u32,
    pub wait: [u32; NUM_BARRIERS],
    /// The phase of barrier `id` these lanes wait for to complete.
    pub wait_phase: [u32; NUM_BARRIERS],
    /// The phase of the cluster barrier this warp's last `barrier.cluster.arrive` counted in.
    pub cluster_arrive_phase: u32,
    /// Lanes blocked in an mbarrier wait (also in `blocked`), each on (barrier offset, phase count that releases it).
    pub mbar_blocked: u32,
    pub mbar_wait: [(u32, u32); 32],
    pub tid: [[u32; 3]; 32],
    pub ids: Ids,
    pub clock: u64,
    /// `.local` memory of the 32 lanes: lane l owns `local[l*local_bytes..]`.
    pub local: Vec<u8>,
    pub local_init: Vec<u8>,
    pub local_bytes: usize,
}

impl Warp {
    #[inline(always)]
    pub fn val(&self, s: &Src, lane: usize) -> u64 {
        match *s {
            Src::Reg(r) => self.regs[r as usize * 32 + lane],
            Src::Imm(v) => v,
            Src::NotReg(r) => (self.regs[r as usize * 32 + lane] == 0) as u64,
            Src::Special(sr) => self.special(sr, lane),
        }
    }

    #[inline(always)]
    pub fn set(&mut self, d: Option<u32>, lane: usize, v: u64) {
        if let Some(r) = d {
            self.regs[r as usize * 32 + lane] = v;
        }
    }

    /// Linear thread index in the block.
    pub fn linear_tid(&self, lane: usize) -> u32 {
        self.index * 32 + lane as u32
    }

    fn special(&self, s: SReg, lane: usize) -> u64 {
        let lt = |n: u32| if n >= 32 { u32::MAX } else { (1u32 << n) - 1 };
        (match s {
            SReg::Tid(d) => self.tid[lane][d as usize],
            SReg::Ntid(d) => self.ids.ntid[d as usize],
            SReg::Ctaid(d) => self.ids.ctaid[d as usize],
            SReg::Nctaid(d) => self.ids.nctaid[d as usize],
            SReg::LaneId => lane as u32,
            SReg::WarpId => self.index,
            SReg::NWarpId => (self.ids.ntid[0] * self.ids.ntid[1] * self.ids.ntid[2]).div_ceil(32),
            SReg::SmId | SReg::GridId | SReg::ClusterCtaRank | SReg::ClusterCtaid(_) | SReg::IsExplicitCluster => 0,
            SReg::NSmId | SReg::ClusterNCtaRank | SReg::ClusterNctaid(_) => 1,
            SReg::ClusterId(d) => self.ids.ctaid[d as usize],
            SReg::NClusterId(d) => self.ids.nctaid[d as usize],
            SReg::LaneMaskEq => 1 << lane,
            SReg::LaneMaskLt => lt(lane as u32),
            SReg::LaneMaskLe => lt(lane as u32 + 1),
            SReg::LaneMaskGt => !lt(lane as u32 + 1),
            SReg::LaneMaskGe => !lt(lane as u32),
            SReg::Clock => self.clock as u32,
            SReg::Clock64 | SReg::GlobalTimer => return self.clock,
            SReg::DynamicSmemSize => self.ids.dynamic_smem,
            SReg::TotalSmemSize => self.ids.total_smem,
        }) as u64
    }

    /// Lets lanes whose barrier phase has completed run again.
    fn release_completed(&mut self, bars: &[BarState; NUM_BARRIERS]) {
        for (id, bar) in bars.iter().enumerate() {
            if self.wait[id] != 0 && self.wait_phase[id] < bar.phase {
                self.materialize();
                self.blocked &= !self.wait[id];
                self.wait[id] = 0;
                self.converged = None;
            }
        }
    }

    /// Lets lanes whose mbarrier phase has completed re-run their wait (which then returns true); true if any.
    fn release_mbarrier_waits(&mut self, mbars: &Mbarriers) -> bool {
        let mut ready = 0u32;
        for l in lanes(self.mbar_blocked) {
            let (off, target) = self.mbar_wait[l];
            // A barrier invalidated meanwhile: re-running the wait reports it.
            if mbars.map.get(&off).is_none_or(|b| b.phase >= target) {
                ready |= 1 << l;
            }
        }
        if ready != 0 {
            self.materialize();
            self.blocked &= !ready;
            self.mbar_blocked &= !ready;
            self.converged = None;
        }
        ready != 0
    }

    /// Makes `pc` exact for every runnable lane and leaves converged mode.
    fn materialize(&mut self) {
        if let Some(p) = self.converged.take() {
            for l in lanes(self.live & !self.blocked) {
                self.pc[l] = p;
            }
        }
    }
}

/// What an instruction did to control flow (lanes not named go to pc + 1).
pub(crate) enum Flow {
    Next,
    /// These lanes jump to the target.
    Branch(u32, u32),
    /// These lanes exit.
    Exit(u32),
    /// These lanes call: save pc + 1 in the register, jump to the target.
    Call {
        target: u32,
        ret_reg: u32,
        lanes: u32,
    },
    /// These lanes return to the address each holds in the register.
    Return(u32, u32),
    /// These lanes wait at barrier `id` until `expected` threads (None = all live threads) arrived.
    Barrier {
        id: u32,
        lanes: u32,
        expected: Option<u32>,
        wait: bool,
    },
    /// These lanes wait in an mbarrier wait (their `mbar_wait` is set) and re-run it when released.
    MbarBlock(u32),
    /// These lanes wait until the cluster barrier phase of their warp's last arrive completes.
    ClusterWait(u32),
    /// These lanes wait in a `wgmma.wait_group` for the rest of their warpgroup (re-run it when released).
    WgBlock(u32),
}

#[derive(Clone, Copy, Default)]
struct BarState {
    /// Completed phases: a barrier with a thread count completes as soon as that many threads arrived.
    phase: u32,
    arrived: u32,
    expected: Option<u32>,
    /// bar.red accumulation: number of true predicates, and whether any arrival had a false one.
    popc: u32,
    any_false: bool,
}

/// The programmatic-dependent-launch state of a launch (PTX ISA `griddepcontrol`; the rules are in `Machine::programmatic`).
pub(crate) struct Pdl {
    /// The launch may start before its predecessor completes.
    pub programmatic: bool,
    /// The launch directly before it, with no host operation between them (its number and kernel), when programmatic:
    /// a thread's global accesses before its `griddepcontrol.wait` are checked against that launch's.
    pub previous: Option<(u64, String)>,
    /// Per thread of the running block: it executed `griddepcontrol.wait`.
    pub waited: Vec<bool>,
    /// Some thread of the grid executed `griddepcontrol.wait`.
    pub any_waited: bool,
    /// The kernel's code holds a `griddepcontrol.wait` (set by `launch`): its threads' loads before it are counted
    /// apart (`Counters::pre_wait_sectors`).
    pub kernel_waits: bool,
}

impl Pdl {
    /// Thread `tid` of the running block, in a kernel that waits, has not executed its `griddepcontrol.wait` yet.
    #[inline]
    pub fn before_wait(&self, tid: u32) -> bool {
        self.kernel_waits && !self.waited[tid as usize]
    }

    /// Why thread `tid`'s access of `[off, off + len)` of `alloc` (a store or atomic when `store`) is a hazard, if it
    /// is: before its wait, a thread may load only bytes the previous launch did not write, and store nothing the
    /// previous launch read or wrote. Returns the offending byte's index from `off` and the message.
    #[inline]
    pub fn hazard(&self, alloc: &Allocation, off: usize, len: usize, tid: u32, store: bool) -> Option<(usize, String)> {
        let (launch, kernel) = self.previous.as_ref()?;
        if self.waited[tid as usize] {
            return None;
        }
        let kinds = if store { MARK_READ | MARK_WRITE } else { MARK_WRITE };
        let i = alloc.marked(off, len, kinds, *launch)?;
        let (what, did) = if store {
            let wrote = alloc.marked(off + i, 1, MARK_WRITE, *launch).is_some();
            ("store/atomic to", if wrote { "wrote" } else { "read" })
        } else {
            ("load of", "wrote")
        };
        Some((
            i,
            format!(
                "programmatic launch hazard: {what} a global byte that the previous launch ({kernel}) {did}, before this thread executed griddepcontrol.wait (the previous grid may still be running)"
            ),
        ))
    }
}

/// Everything one block run touches.
pub(crate) struct BlockCtx<'a> {
    pub kernel: &'a Kernel,
    /// `code[i].op.class()`, computed once per launch.
    pub classes: &'a [Class],
    pub global: &'a mut GlobalMemory,
    pub shared: &'a mut SharedMemory,
    pub shared_size: usize,
    pub params: &'a [u8],
    pub counters: &'a mut Counters,
    pub asyncq: &'a mut AsyncQueue,
    pub mbars: &'a mut Mbarriers,
    pub bulk: &'a mut BulkQueue,
    /// wgmma state per warp.
    pub wg: &'a mut Vec<WgState>,
    pub wgmma_fence_check: bool,
    /// How mma.sync and wgmma round their dot products.
    pub tensor_arith: TensorArith,
    pub ntid: [u32; 3],
    pub pdl: &'a mut Pdl,
}

/// Guard lanes: those of `mask` whose predicate passes.
#[inline(always)]
fn guard_mask(w: &Warp, guard: Option<(u32, bool)>, mask: u32) -> u32 {
    match guard {
        None => mask,
        Some((p, neg)) => {
            let mut m = 0;
            for l in lanes(mask) {
                if (w.regs[p as usize * 32 + l] != 0) != neg {
                    m |= 1 << l;
                }
            }
            m
        }
    }
}

/// Most warp-instructions one block may execute: a runaway loop becomes an error instead of a hang.
const STEP_LIMIT: u64 = 1 << 34;

impl BlockCtx<'_> {
    /// Runs one warp until all its lanes have exited or wait at a barrier.
    fn run_warp(&mut self, w: &mut Warp, bars: &mut [BarState; NUM_BARRIERS], steps: &mut u64) -> Result<(), (Fault, u32)> {
        let kernel: &Kernel = self.kernel;
        let code = &kernel.code;
        loop {
            let runnable = w.live & !w.blocked;
            if runnable == 0 {
                return Ok(());
            }
            let (pc, mask) = match w.converged {
                Some(p) => (p, runnable),
                None => {
                    let mut min = u32::MAX;
                    for l in lanes(runnable) {
                        min = min.min(w.pc[l]);
                    }
                    let mut mask = 0;
                    for l in lanes(runnable) {
                        if w.pc[l] == min {
                            mask |= 1 << l;
                        }
                    }
                    if mask == runnable {
                        w.converged = Some(min);
                    }
                    (min, mask)
                }
            };
            let inst = &code[pc as usize];
            let exec = guard_mask(w, inst.guard, mask);
            *steps += 1;
            w.clock += 1;
            if *steps > STEP_LIMIT {
                return Err((Fault { lane: None, message: format!("more than {STEP_LIMIT} warp instructions in one block: runaway loop?") }, pc));
            }
            self.counters.count(self.classes[pc as usize], exec, w.index, inst);
            match inst.op {
                Op::Bar { .. } => self.counters.block_barriers += 1,
                Op::CpAsyncWait(n) => {
                    self.counters.async_waits += 1;
                    // wait_all (u32::MAX) leaves no group in flight.
                    self.counters.async_groups_left_in_flight += if n == u32::MAX { 0 } else { n as u64 };
                }
                _ => {}
            }
            let st = &mut self.wg[w.index as usize];
            if (st.inflight_total > 0 || st.tracking) && exec != 0 && !matches!(inst.op, Op::Wgmma(_) | Op::WgmmaFence | Op::WgmmaCommit | Op::WgmmaWait(_)) {
                if let Some(r) = st.touched(inst) {
                    let message = format!(
                        "register #{r} of an unfinished wgmma.mma_async (in flight since PTX line {}) accessed before the wgmma.wait_group that retires it",
                        st.oldest_line
                    );
                    return Err((Fault { lane: None, message }, pc));
                }
                st.mark_written(inst);
            }
            let flow = if exec == 0 && !matches!(inst.op, Op::Bar { .. } | Op::Shfl(_) | Op::Vote(_)) {
                Flow::Next
            } else {
                self.exec(w, inst, pc, exec, mask).map_err(|f| (f, pc))?
            };
            match flow {
                Flow::Next => self.advance(w, pc, mask),
                Flow::Branch(target, taken) => {
                    if taken == mask {
                        match w.converged {
                            Some(_) => w.converged = Some(target),
                            None => lanes(mask).for_each(|l| w.pc[l] = target),
                        }
                    } else if taken == 0 {
                        self.advance(w, pc, mask);
                    } else {
                        w.materialize();
                        for l in lanes(mask) {
                            w.pc[l] = if taken >> l & 1 != 0 { target } else { pc + 1 };
                        }
                    }
                }
                Flow::Call { target, ret_reg, lanes: calling } => {
                    for l in lanes(calling) {
                        w.regs[ret_reg as usize * 32 + l] = pc as u64 + 1;
                    }
                    w.materialize();
                    for l in lanes(mask) {
                        w.pc[l] = if calling >> l & 1 != 0 { target } else { pc + 1 };
                    }
                }
                Flow::Return(reg, returning) => {
                    w.materialize();
                    for l in lanes(mask) {
                        w.pc[l] = if returning >> l & 1 != 0 { w.regs[reg as usize * 32 + l] as u32 } else { pc + 1 };
                    }
                }
                Flow::Exit(exiting) => {
                    w.live &= !exiting;
                    self.wg[w.index as usize].exited = w.live == 0;
                    self.advance(w, pc, mask & !exiting);
                }
                Flow::Barrier { id, lanes: arriving, expected, wait } => {
                    w.materialize();
                    for l in lanes(mask) {
                        w.pc[l] = pc + 1;
                    }
                    let b = &mut bars[id as usize];
                    if b.arrived > 0 && b.expected != expected {
                        return Err((Fault { lane: None, message: format!("barrier {id} used with thread counts {:?} and {:?}", b.expected, expected) }, pc));
                    }
                    b.expected = expected;
                    b.arrived += arriving.count_ones();
                    if let Op::Bar { kind: BarKind::RedPopc | BarKind::RedAnd | BarKind::RedOr, .. } = inst.op {
                        for l in lanes(arriving) {
                            let v = w.val(&inst.s[inst.s.len() - 1], l) != 0;
                            b.popc += v as u32;
                            b.any_false |= !v;
                        }
                    }
                    if wait {
                        w.blocked |= arriving;
                        w.wait[id as usize] |= arriving;
                        w.wait_phase[id as usize] = b.phase;
                    } else if id as usize == CLUSTER_BARRIER {
                        w.cluster_arrive_phase = b.phase;
                    }
                    if let Some(e) = b.expected.filter(|&e| b.arrived >= e) {
                        // A counted barrier (named-barrier producer/consumer) completes at this arrival.
                        b.arrived -= e;
                        b.phase += 1;
                        self.shared.barrier();
                        self.mbars.version += 1;
                        w.release_completed(&*bars);
                    }
                }
                Flow::MbarBlock(blocked) => {
                    w.materialize();
                    for l in lanes(mask) {
                        w.pc[l] = if blocked >> l & 1 != 0 { pc } else { pc + 1 };
                    }
                    w.blocked |= blocked;
                    w.mbar_blocked |= blocked;
                }
                Flow::WgBlock(blocked) => {
                    w.materialize();
                    for l in lanes(mask) {
                        w.pc[l] = if blocked >> l & 1 != 0 { pc } else { pc + 1 };
                    }
                    w.blocked |= blocked;
                }
                Flow::ClusterWait(waiting) => {
                    w.materialize();
                    for l in lanes(mask) {
                        w.pc[l] = pc + 1;
                    }
                    if bars[CLUSTER_BARRIER].phase <= w.cluster_arrive_phase {
                        w.blocked |= waiting;
                        w.wait[CLUSTER_BARRIER] |= waiting;
                        w.wait_phase[CLUSTER_BARRIER] = w.cluster_arrive_phase;
                    }
                }
            }
        }
    }

    #[inline(always)]
    fn advance(&self, w: &mut Warp, pc: u32, mask: u32) {
        match w.converged {
            Some(_) => w.converged = Some(pc + 1),
            None => lanes(mask).for_each(|l| w.pc[l] = pc + 1),
        }
    }

    /// Runs the whole block to completion.
    #[allow(clippy::needless_range_loop)] // warps and barriers are indexed while other elements are borrowed
    pub fn run_block(&mut self, warps: &mut [Warp]) -> Result<(), SimError> {
        let mut bars = [BarState::default(); NUM_BARRIERS];
        let mut steps = 0u64;
        // The mbarrier state version at the last round that gave every blocked wait a false result.
        let mut false_round: Option<u64> = None;
        loop {
            for wi in 0..warps.len() {
                warps[wi].release_completed(&bars);
                warps[wi].release_mbarrier_waits(self.mbars);
                if self.wg[wi].blocked != 0 && WgState::wait_ready(self.wg, wi) {
                    let w = &mut warps[wi];
                    w.materialize();
                    w.blocked &= !self.wg[wi].blocked;
                    w.converged = None;
                    self.wg[wi].blocked = 0;
                }
                if warps[wi].live & !warps[wi].blocked != 0 {
                    let w = &mut warps[wi];
                    self.run_warp(w, &mut bars, &mut steps).map_err(|(f, pc)| self.error(w, f, pc))?;
                }
            }
            let live_threads: u32 = warps.iter().map(|w| w.live.count_ones()).sum();
            if live_threads == 0 {
                return self.flush_stores(warps).map_err(|(f, wi)| self.error(&warps[wi], f, 0));
            }
            // Complete every barrier whose arrivals are all in.
            let mut released = false;
            for id in 0..NUM_BARRIERS {
                let b = bars[id];
                let waiting: u32 = warps.iter().map(|w| (w.wait[id] & w.live).count_ones()).sum();
                if (b.arrived == 0 && waiting == 0) || b.expected.is_some() {
                    continue; // counted barriers complete at the arrival that fills them
                }
                let expected = b.expected.unwrap_or(live_threads);
                // barrier.cluster waits do not arrive: only the arrivals complete it.
                if b.arrived >= expected || (b.expected.is_none() && waiting == live_threads && id != CLUSTER_BARRIER) {
                    self.shared.barrier();
                    self.mbars.version += 1;
                    for w in warps.iter_mut() {
                        let lanes_waiting = w.wait[id];
                        // bar.red: deliver the reduction to every waiting thread's destination.
                        for l in lanes(lanes_waiting) {
                            let inst = &self.kernel.code[w.pc[l] as usize - 1];
                            if let Op::Bar { kind, .. } = inst.op {
                                let v = match kind {
                                    BarKind::RedPopc => b.popc as u64,
                                    BarKind::RedAnd => !b.any_false as u64,
                                    BarKind::RedOr => (b.popc > 0) as u64,
                                    _ => continue,
                                };
                                w.set(inst.d[0], l, v);
                            }
                        }
                        w.blocked &= !lanes_waiting;
                        w.wait[id] = 0;
                        w.converged = None;
                    }
                    bars[id] = BarState { phase: b.phase + 1, ..BarState::default() };
                    released = true;
                }
            }
            released |= warps.iter().any(|w| (0..NUM_BARRIERS).any(|id| w.wait[id] != 0 && w.wait_phase[id] < bars[id].phase));
            released |= (0..warps.len()).any(|wi| self.wg[wi].blocked != 0 && WgState::wait_ready(self.wg, wi));
            released |= warps.iter().any(|w| lanes(w.mbar_blocked).any(|l| self.mbars.map.get(&w.mbar_wait[l].0).is_none_or(|b| b.phase >= w.mbar_wait[l].1)));
            if !released && !self.bulk.loads.is_empty() {
                // Nothing can run: the async copies in flight land now.
                let site = self.first_load_site();
                if let Err(f) = self.land_loads(None) {
                    let (tid, pc) = site.unwrap_or((0, 0));
                    let w = &warps[(tid / 32) as usize];
                    return Err(self.error(w, Fault { lane: Some((tid % 32) as usize), ..f }, pc));
                }
                continue;
            }
            if !released && warps.iter().any(|w| w.mbar_blocked != 0) && false_round != Some(self.mbars.version) {
                // Nothing can run: every blocked mbarrier wait returns false once (a try_wait timeout / test_wait poll).
                false_round = Some(self.mbars.version);
                for w in warps.iter_mut() {
                    w.materialize();
                    for l in lanes(w.mbar_blocked) {
                        let inst = &self.kernel.code[w.pc[l] as usize];
                        w.set(inst.d[0], l, 0);
                        w.pc[l] += 1;
                    }
                    w.blocked &= !w.mbar_blocked;
                    w.mbar_blocked = 0;
                    w.converged = None;
                }
                continue;
            }
            if !released {
                return Err(self.deadlock(warps, &bars, live_threads));
            }
        }
    }

    /// The deadlock report: every mbarrier some warp waits on (with its counts), and the block barriers' arrivals.
    fn deadlock(&self, warps: &[Warp], bars: &[BarState; NUM_BARRIERS], live_threads: u32) -> SimError {
        let mut parts = Vec::new();
        let mut first = None;
        for w in warps {
            let mut seen = Vec::new();
            for l in lanes(w.mbar_blocked & w.live) {
                let off = w.mbar_wait[l].0;
                first.get_or_insert((w, l, w.pc[l]));
                if !seen.contains(&off) {
                    seen.push(off);
                    let line = self.kernel.code[w.pc[l] as usize].line;
                    parts.push(format!("warp {} waits at PTX line {line} on the {}", w.index, self.mbars.describe(off)));
                }
            }
        }
        for w in warps {
            let wg_lanes = self.wg[w.index as usize].blocked & w.live;
            if wg_lanes != 0 {
                let lane = wg_lanes.trailing_zeros() as usize;
                first.get_or_insert((w, lane, w.pc[lane]));
                parts.push(format!(
                    "warp {} waits at wgmma.wait_group (PTX line {}) for the other warps of its warpgroup to commit their wgmma groups",
                    w.index, self.kernel.code[w.pc[lane] as usize].line
                ));
            }
        }
        let bar_waiting: u32 = warps.iter().map(|w| (w.blocked & !w.mbar_blocked & !self.wg[w.index as usize].blocked & w.live).count_ones()).sum();
        if bar_waiting > 0 {
            let arrived: u32 = bars.iter().map(|b| b.arrived).sum();
            parts.push(format!("{arrived} of {live_threads} live threads wait at a barrier that can never complete"));
            if first.is_none() {
                let w = warps.iter().find(|w| w.blocked & w.live != 0).unwrap_or(&warps[0]);
                let lane = ((w.blocked & w.live).trailing_zeros() as usize).min(31);
                first = Some((w, lane, w.pc[lane].saturating_sub(1)));
            }
        }
        let (w, lane, pc) = first.unwrap_or((&warps[0], 0, 0));
        self.error(w, Fault { lane: Some(lane), message: format!("deadlock: {}", parts.join("; ")) }, pc)
    }

    pub fn error(&self, w: &Warp, f: Fault, pc: u32) -> SimError {
        let lane = f.lane.unwrap_or_else(|| (w.live.trailing_zeros() as usize).min(31));
        let line = self.kernel.code.get(pc as usize).map_or(0, |i| i.line);
        SimError { site: Some(Site { kernel: self.kernel.name.clone(), block: w.ids.ctaid, thread: w.tid[lane], line }), message: f.message }
    }

    /// Executes one instruction (at `pc`) for the lanes in `exec` (guard passed); `mask` is every lane at this PC.
    fn exec(&mut self, w: &mut Warp, inst: &Inst, pc: u32, exec: u32, mask: u32) -> Result<Flow, Fault> {
        match &inst.op {
            Op::Mov(ty) => {
                let ty = *ty;
                let d = inst.d[0];
                let s = &inst.s[0];
                for l in lanes(exec) {
                    let v = ty.mask(w.val(s, l));
                    w.set(d, l, v);
                }
            }
            Op::Pack { parts, bits } => {
                for l in lanes(exec) {
                    let mut v = 0u64;
                    for p in 0..*parts as usize {
                        let m = if *bits >= 64 { u64::MAX } else { (1u64 << bits) - 1 };
                        v |= (w.val(&inst.s[p], l) & m) << (p as u32 * bits);
                    }
                    w.set(inst.d[0], l, v);
                }
            }
            Op::Unpack { parts, bits } => {
                for l in lanes(exec) {
                    let v = w.val(&inst.s[0], l);
                    for p in 0..*parts as usize {
                        let m = if *bits >= 64 { u64::MAX } else { (1u64 << bits) - 1 };
                        w.set(inst.d[p], l, (v >> (p as u32 * bits)) & m);
                    }
                }
            }
            Op::Int { op, ty, sat } => alu::int(w, inst, *op, *ty, *sat, exec).map_err(|m| Fault { lane: None, message: m })?,
            Op::Prmt(mode) => alu::prmt(w, inst, *mode, exec),
            Op::Float { op, ty, rnd, ftz, sat, approx: _ } => {
                alu::float(w, inst, *op, *ty, *rnd, *ftz, *sat, exec).map_err(|m| Fault { lane: None, message: m })?
            }
            Op::Setp { cmp, ty, combine, ftz } => alu::setp(w, inst, *cmp, *ty, *combine, *ftz, exec).map_err(|m| Fault { lane: None, message: m })?,
            Op::Set { cmp, dty, ty, combine } => alu::set(w, inst, *cmp, *dty, *ty, *combine, exec).map_err(|m| Fault { lane: None, message: m })?,
            Op::Selp(ty) => {
                for l in lanes(exec) {
                    let v = if w.val(&inst.s[2], l) != 0 { w.val(&inst.s[0], l) } else { w.val(&inst.s[1], l) };
                    w.set(inst.d[0], l, ty.mask(v));
                }
            }
            Op::Slct { ty, cty } => {
                for l in lanes(exec) {
                    let c = w.val(&inst.s[2], l);
                    let pick_a = if *cty == Ty::F32 { f32::from_bits(c as u32) >= 0.0 } else { c as u32 as i32 >= 0 };
                    let v = if pick_a { w.val(&inst.s[0], l) } else { w.val(&inst.s[1], l) };
                    w.set(inst.d[0], l, ty.mask(v));
                }
            }
            Op::Cvt { dty, sty, rnd, ftz, sat, satfinite, relu } => {
                let c = alu::CvtSpec { dty: *dty, sty: *sty, rnd: *rnd, ftz: *ftz, sat: *sat, satfinite: *satfinite, relu: *relu };
                alu::cvt(w, inst, &c, exec).map_err(|m| Fault { lane: None, message: m })?
            }
            Op::Cvta { space, to_space, bits } => mem::cvta(w, inst, *space, *to_space, *bits, exec)?,
            Op::IsSpace(space) => mem::isspace(w, inst, *space, exec),
            Op::Ld { .. } | Op::St { .. } => self.ld_st(w, inst, exec)?,
            Op::Atom { .. } => self.atom(w, inst, exec)?,
            Op::CpAsync { bytes, zfill } => self.cp_async(w, inst, *bytes, *zfill, exec)?,
            Op::CpAsyncCommit => self.cp_async_commit(w, exec),
            Op::CpAsyncWait(n) => self.cp_async_wait(w, *n, exec)?,
            Op::Bra(target) => return Ok(Flow::Branch(*target, exec)),
            Op::Exit => return Ok(Flow::Exit(exec)),
            Op::Trap => return warp_fault("trap executed (a device-side assert or __trap)"),
            Op::Bar { kind, id_is_operand, has_count } => {
                if exec != mask && exec != 0 {
                    return warp_fault("barrier under a predicate that differs between converged lanes");
                }
                let l0 = mask.trailing_zeros() as usize;
                let id = if *id_is_operand { w.val(&inst.s[0], l0) as u32 } else { 0 };
                if id >= 16 {
                    return warp_fault(format!("barrier id {id} out of range 0..16"));
                }
                let expected = if *has_count { Some(w.val(&inst.s[1], l0) as u32) } else { None };
                if exec == 0 {
                    return Ok(Flow::Next);
                }
                return Ok(Flow::Barrier { id, lanes: exec, expected, wait: *kind != BarKind::Arrive });
            }
            Op::BarWarp => {
                let member = w.val(&inst.s[0], exec.trailing_zeros() as usize) as u32;
                collective::check_converged(w, "bar.warp.sync", member, mask)?;
                self.shared.warp_sync(w.index as usize);
            }
            Op::Fence | Op::Nop => {}
            Op::ProxyFence => lanes(exec).for_each(|l| self.shared.proxy_fence(w.linear_tid(l))),
            Op::GridDepWait => {
                for l in lanes(exec) {
                    self.pdl.waited[w.linear_tid(l) as usize] = true;
                }
                self.pdl.any_waited |= exec != 0;
            }
            Op::GridDepLaunchDependents => {
                if let Some(l) = lanes(exec).find(|&l| self.pdl.programmatic && !self.pdl.waited[w.linear_tid(l) as usize]) {
                    return fault(
                        l,
                        "programmatic launch hazard: griddepcontrol.launch_dependents before this thread executed griddepcontrol.wait (a dependent grid could start before the grids this one depends on completed)",
                    );
                }
            }
            Op::CreatePolicy => lanes(exec).for_each(|l| w.set(inst.d[0], l, 0)),
            Op::Shfl(mode) => collective::shfl(w, inst, *mode, exec, mask)?,
            Op::Vote(mode) => collective::vote(w, inst, *mode, exec, mask)?,
            Op::Activemask => lanes(exec).for_each(|l| w.set(inst.d[0], l, mask as u64)),
            Op::Elect => collective::elect(w, inst, exec)?,
            Op::Mbar(op) => return self.mbarrier(w, inst, *op, exec),
            Op::SetMaxNReg(n) => {
                if !(24..=256).contains(n) || n % 8 != 0 {
                    return warp_fault(format!("setmaxnreg register count {n} (must be a multiple of 8 in 24..=256)"));
                }
                if exec != w.live {
                    return warp_fault(format!(
                        "setmaxnreg.sync.aligned needs every live lane of the warp converged (active {exec:#010x}, live {:#010x})",
                        w.live
                    ));
                }
            }
            Op::Mapa => {
                for l in lanes(exec) {
                    let rank = w.val(&inst.s[1], l);
                    if rank != 0 {
                        return fault(l, format!("mapa to cluster rank {rank}: clusters have one CTA in the interpreter"));
                    }
                    let a = w.val(&inst.s[0], l);
                    w.set(inst.d[0], l, a);
                }
            }
            Op::GetCtaRank => lanes(exec).for_each(|l| w.set(inst.d[0], l, 0)),
            Op::Wgmma(spec) => self.wgmma(w, inst, *spec, exec)?,
            Op::WgmmaFence => self.wg[w.index as usize].fence(self.kernel.num_regs),
            Op::WgmmaCommit => self.wgmma_commit(w),
            Op::WgmmaWait(n) => return self.wgmma_wait(w, *n, exec),
            Op::TmaLoad { dims } => self.tma_load(w, inst, pc, *dims, exec)?,
            Op::TmaStore { dims } => self.tma_store(w, inst, *dims, exec)?,
            Op::PrefetchL2 { space, bulk } => self.prefetch_l2(w, inst, *space, *bulk, exec)?,
            Op::BulkLoad => self.bulk_load(w, inst, pc, exec)?,
            Op::BulkStore => self.bulk_store(w, inst, exec)?,
            Op::BulkCommit => self.bulk_commit(w, exec),
            Op::BulkWait { n, read: _ } => self.bulk_wait(w, *n, exec)?,
            Op::ClusterArrive => return Ok(Flow::Barrier { id: CLUSTER_BARRIER as u32, lanes: exec, expected: None, wait: false }),
            Op::ClusterWait => return Ok(Flow::ClusterWait(exec)),
            Op::Testp { test, ty } => alu::testp(w, inst, *test, *ty, exec),
            Op::Redux { op, ty } => collective::redux(w, inst, *op, *ty, exec, mask)?,
            Op::Match { all, ty } => collective::match_(w, inst, *all, *ty, exec, mask)?,
            Op::Ldmatrix { num, trans } => self.ldmatrix(w, inst, *num, *trans, exec)?,
            Op::Stmatrix { num, trans } => self.stmatrix(w, inst, *num, *trans, exec)?,
            Op::Mma { shape, a, b, c, d } => {
                collective::mma(w, inst, *shape, [*a, *b, *c, *d], exec, self.tensor_arith)?;
                self.counters.tensor_ops += 1;
                self.counters.tensor_flops += 2 * (shape.m * shape.n * shape.k) as u64;
            }
            Op::Call { target, ret_reg, copies, .. } => {
                for l in lanes(exec) {
                    copy_local(w, l, copies);
                }
                return Ok(Flow::Call { target: *target, ret_reg: *ret_reg, lanes: exec });
            }
            Op::Return(reg) => return Ok(Flow::Return(*reg, exec)),
            Op::CopyLocal(copies) => {
                for l in lanes(exec) {
                    copy_local(w, l, copies);
                }
            }
            Op::AssertFail(args) => {
                let l = exec.trailing_zeros() as usize;
                let arg = |i: usize| -> u64 {
                    let at = l * w.local_bytes + args.get(i).copied().unwrap_or(0) as usize;
                    let mut b = [0u8; 8];
                    let n = 8.min(w.local_bytes.saturating_sub(at - l * w.local_bytes));
                    b[..n].copy_from_slice(&w.local[at..at + n]);
                    u64::from_le_bytes(b)
                };
                let message = self.c_string(arg(0));
                let file = self.c_string(arg(1));
                return fault(l, format!("device-side assertion failed: {message} ({file}:{})", arg(2) as u32));
            }
            Op::Unsupported(name) => return warp_fault(format!("unsupported instruction {name}")),
        }
        Ok(Flow::Next)
    }
}

/// Copies (from, to, bytes) between areas of one lane's local memory, with their initialisation.
fn copy_local(w: &mut Warp, lane: usize, copies: &[(u32, u32, u32)]) {
    let base = lane * w.local_bytes;
    for &(from, to, bytes) in copies {
        let (from, to, n) = (base + from as usize, base + to as usize, bytes as usize);
        w.local.copy_within(from..from + n, to);
        w.local_init.copy_within(from..from + n, to);
    }
}

impl BlockCtx<'_> {
    /// A NUL-terminated string in global memory (at most 512 bytes), for assertion messages.
    fn c_string(&self, addr: u64) -> String {
        let mut out = Vec::new();
        for i in 0..512 {
            let mut b = [0u8];
            match self.global.find(addr + i, 1) {
                Some((_, a, off)) if a.data[off] != 0 => {
                    b[0] = a.data[off];
                    out.push(b[0]);
                }
                _ => break,
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// The optional checks of a launch.
#[derive(Clone, Copy)]
pub(crate) struct Checks {
    pub race: bool,
    pub wgmma_fence: bool,
    pub tensor_arith: TensorArith,
}

/// Launches `entry` of `module`; see `Machine::launch`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch(
    global: &mut GlobalMemory,
    module: &Module,
    entry: &str,
    grid: [u32; 3],
    block: [u32; 3],
    dynamic_shared_bytes: u32,
    params: &[u8],
    checks: Checks,
    block_sample: Option<u64>,
    pdl: &mut Pdl,
) -> Result<Counters, SimError> {
    let kernel = module.kernel(entry).ok_or_else(|| SimError::host(format!("no kernel named {entry} in the module (have {:?})", module.entries())))?;
    let threads = block.iter().map(|&d| d as u64).product::<u64>();
    if threads == 0 || threads > 1024 || grid.contains(&0) {
        return Err(SimError::host(format!("bad launch shape: grid {grid:?}, block {block:?} (1..=1024 threads per block)")));
    }
    if params.len() < kernel.param_bytes as usize {
        return Err(SimError::host(format!("kernel {entry} takes {} parameter bytes, {} given", kernel.param_bytes, params.len())));
    }
    for v in &module.vars {
        global.map_fixed(v.addr, &v.bytes);
    }
    let shared_size = kernel.dynamic_offset as usize + dynamic_shared_bytes as usize;
    if shared_size > 227 * 1024 {
        return Err(SimError::host(format!("kernel {entry} needs {shared_size} bytes of shared memory; the limit is 227 KiB")));
    }
    let nwarps = threads.div_ceil(32) as usize;
    let mut shared = SharedMemory::new(shared_size, nwarps, checks.race);
    let mut counters = Counters { kernel: kernel.name.clone(), ..Counters::default() };
    counters.block_threads = threads as u32;
    counters.shared_bytes = shared_size as u32;
    let total_blocks = grid.iter().map(|&g| g as u64).product::<u64>();
    let sample = crate::counters::BlockSample::new(total_blocks, block_sample);
    let mut asyncq = AsyncQueue::new(threads as usize);
    let local_bytes = kernel.local_bytes as usize;
    let mut warps: Vec<Warp> = (0..nwarps)
        .map(|wi| {
            let mut tid = [[0u32; 3]; 32];
            let mut live = 0u32;
            for (l, t) in tid.iter_mut().enumerate() {
                let lin = (wi * 32 + l) as u32;
                if (lin as u64) < threads {
                    live |= 1 << l;
                    *t = [lin % block[0], lin / block[0] % block[1], lin / (block[0] * block[1])];
                }
            }
            Warp {
                index: wi as u32,
                regs: vec![0; kernel.num_regs as usize * 32],
                pc: [0; 32],
                converged: Some(0),
                live,
                blocked: 0,
                wait: [0; NUM_BARRIERS],
                wait_phase: [0; NUM_BARRIERS],
                cluster_arrive_phase: 0,
                mbar_blocked: 0,
                mbar_wait: [(0, 0); 32],
                tid,
                ids: Ids { ctaid: [0; 3], ntid: block, nctaid: grid, dynamic_smem: dynamic_shared_bytes, total_smem: shared_size as u32 },
                clock: 0,
                local: vec![0; local_bytes * 32],
                local_init: vec![0; local_bytes * 32],
                local_bytes,
            }
        })
        .collect();
    let live_masks: Vec<u32> = warps.iter().map(|w| w.live).collect();
    let classes: Vec<Class> = kernel.code.iter().map(|i| i.op.class()).collect();
    pdl.kernel_waits = kernel.code.iter().any(|i| matches!(i.op, Op::GridDepWait));
    for bz in 0..grid[2] {
        for by in 0..grid[1] {
            for bx in 0..grid[0] {
                if !sample.runs((bz as u64 * grid[1] as u64 + by as u64) * grid[0] as u64 + bx as u64) {
                    continue;
                }
                shared.reset();
                asyncq.reset();
                pdl.waited.clear();
                pdl.waited.resize(threads as usize, false);
                for (w, &live) in warps.iter_mut().zip(&live_masks) {
                    w.live = live;
                    w.blocked = 0;
                    w.wait = [0; NUM_BARRIERS];
                    w.wait_phase = [0; NUM_BARRIERS];
                    w.cluster_arrive_phase = 0;
                    w.mbar_blocked = 0;
                    w.converged = Some(0);
                    w.ids.ctaid = [bx, by, bz];
                    w.local_init.fill(0);
                }
                let mut mbars = Mbarriers::default();
                let mut bulk = BulkQueue::new(threads as usize);
                let mut wg: Vec<WgState> = (0..nwarps).map(|_| WgState::default()).collect();
                let mut ctx = BlockCtx {
                    kernel,
                    classes: &classes,
                    global,
                    shared: &mut shared,
                    shared_size,
                    params,
                    counters: &mut counters,
                    asyncq: &mut asyncq,
                    mbars: &mut mbars,
                    bulk: &mut bulk,
                    wg: &mut wg,
                    wgmma_fence_check: checks.wgmma_fence,
                    tensor_arith: checks.tensor_arith,
                    ntid: block,
                    pdl: &mut *pdl,
                };
                ctx.run_block(&mut warps)?;
                counters.end_block();
            }
        }
    }
    if pdl.programmatic && !pdl.any_waited {
        return Err(SimError::host(format!(
            "programmatic launch hazard: no thread of kernel {entry} executed griddepcontrol.wait, so nothing orders it after the grid before it"
        )));
    }
    counters.blocks = total_blocks;
    counters.blocks_run = sample.count();
    counters.programmatic = pdl.programmatic;
    counters.follows_launch = pdl.programmatic && pdl.previous.is_some();
    Ok(counters)
}
