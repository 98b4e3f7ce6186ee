//! mbarriers (PTX ISA §9.7.13.15): the state of each barrier of the running CTA, the arrive / transaction-count /
//! wait operations, and the happens-before edges they give the race detector (an arrive publishes the arriving warp's
//! vector clock into the barrier; the completion of a phase makes the joined clocks of its arrivals visible; a wait
//! that observes the completed phase acquires them).
//!
//! Scheduling: `test_wait` and `try_wait` block the waiting lanes until the phase they wait for completes (returning
//! true late is a legal outcome of a poll loop), so a spin loop lets the other warps run. When no warp can run,
//! `BlockCtx::run_block` first gives every blocked wait one `false` result (`try_wait` may time out, `test_wait` is a
//! poll), and reports a deadlock naming each waited-on barrier and its counts once a whole round changes no state.

use std::collections::BTreeMap;

use super::{fault, lanes, BlockCtx, Fault, Flow, Warp};
use crate::ir::*;
use crate::memory::Race;

/// Largest arrival count and |transaction count| (PTX ISA §9.7.13.15.1: 2^20 - 1).
const MAX_COUNT: i64 = (1 << 20) - 1;

/// One initialised mbarrier.
pub(crate) struct Mbar {
    /// Arrivals that complete a phase (`mbarrier.init` count, less `arrive_drop`s).
    pub expected: u32,
    /// Arrivals still missing in the current phase.
    pub pending: u32,
    /// Transaction bytes still expected in the current phase (negative when bytes arrived before their expect_tx).
    pub tx: i64,
    /// Completed phases.
    pub phase: u32,
    /// Whether some wait has returned true since the last completion (an arrive on the next phase before that is an
    /// error: PTX ISA §9.7.13.15.4).
    pub waited: bool,
    /// Joined clocks of the current phase's arrivals, and of everything up to the last completed phase.
    release: Vec<u32>,
    completed: Vec<u32>,
    pub init_line: u32,
}

/// The mbarriers of the running CTA, keyed by shared offset.
#[derive(Default)]
pub(crate) struct Mbarriers {
    pub map: BTreeMap<u32, Mbar>,
    /// Changes at every state change: the deadlock detector stops when a round of false waits changes nothing.
    pub version: u64,
}

impl Mbarriers {
    /// The barrier whose 8 bytes overlap `[off, off + len)`.
    pub fn overlapping(&self, off: usize, len: usize) -> Option<u32> {
        self.map.range(off.saturating_sub(7) as u32..(off + len) as u32).next().map(|(&at, _)| at)
    }

    /// Describes one barrier's state, for deadlock reports.
    pub fn describe(&self, off: u32) -> String {
        match self.map.get(&off) {
            Some(b) => format!(
                "mbarrier at shared offset {off:#x} (initialised at PTX line {}): phase {} incomplete, {} of {} arrivals missing, {} transaction bytes outstanding{}",
                b.init_line,
                b.phase,
                b.pending,
                b.expected,
                b.tx,
                if b.tx < 0 { " (more bytes completed than expected: the expect_tx count is too small)" } else { "" }
            ),
            None => format!("shared offset {off:#x}, which holds no mbarrier any more"),
        }
    }
}

impl Mbar {
    /// Joins a releasing clock (an arrive's, or an async copy's at its issue) into the current phase.
    pub(super) fn join_release(&mut self, clock: &[u32]) {
        for (r, &v) in self.release.iter_mut().zip(clock) {
            *r = (*r).max(v);
        }
    }

    pub(super) fn complete_if_done(&mut self) -> bool {
        if self.pending != 0 || self.tx != 0 {
            return false;
        }
        self.phase += 1;
        self.pending = self.expected;
        self.waited = false;
        for (c, &r) in self.completed.iter_mut().zip(&self.release) {
            *c = (*c).max(r);
        }
        true
    }
}

/// Whether a wait with `operand` (a parity bit, or a state from `mbarrier.arrive`) sees its phase complete, and the
/// completed-phase count that releases it otherwise.
fn wait_outcome(b: &Mbar, parity: bool, operand: u64, off: u32) -> Result<(bool, u32), String> {
    if parity {
        return Ok(((b.phase & 1) != (operand & 1) as u32, b.phase + 1));
    }
    if operand >> 63 == 0 {
        return Err(format!("mbarrier wait with state {operand:#x}, which no mbarrier.arrive returned"));
    }
    let sp = (operand >> 32) as u32 & 0x7fff_ffff;
    if sp > b.phase || sp + 1 < b.phase {
        return Err(format!("mbarrier wait with the state of phase {sp}; the barrier at shared offset {off:#x} is in phase {} (a state is valid for the current or the preceding phase only)", b.phase));
    }
    Ok((sp < b.phase, sp + 1))
}

impl BlockCtx<'_> {
    /// The shared offset of lane `l`'s mbarrier operand, checked for space, alignment and bounds.
    fn mbar_offset(&self, w: &Warp, inst: &Inst, l: usize) -> Result<u32, Fault> {
        let a = Self::addr_of(w, inst, l);
        let space = if w.val(&inst.s[0], l) == 1 { Space::Shared } else { Space::Generic };
        let off = match self.resolve(space, a) {
            super::mem::Loc::Shared(o) => o,
            _ => return fault(l, format!("mbarrier address {a:#x} is not in shared memory")),
        };
        if off % 8 != 0 {
            return fault(l, format!("mbarrier at shared offset {off:#x} is not 8-byte aligned"));
        }
        if off as usize + 8 > self.shared_size {
            return fault(l, format!("mbarrier at shared offset {off:#x} lies outside the block's {} bytes of shared memory", self.shared_size));
        }
        Ok(off)
    }

    fn mbar_race(&self, r: &Race, off: u32, what: &str) -> String {
        let other = self.thread_name(r.other_tid);
        if r.other_wrote {
            format!("{what} on the mbarrier at shared offset {off:#x} is not ordered after its mbarrier.init by {other} (missing bar.sync, or fence.mbarrier_init and a cluster barrier, between init and use)")
        } else {
            format!("{what} on the mbarrier at shared offset {off:#x} while {other} may still use it (not ordered after that use)")
        }
    }

    pub(super) fn mbarrier(&mut self, w: &mut Warp, inst: &Inst, op: MbarOp, exec: u32) -> Result<Flow, Fault> {
        if op == MbarOp::PendingCount {
            for l in lanes(exec) {
                let state = w.val(&inst.s[0], l);
                w.set(inst.d[0], l, state & 0xffff_ffff);
            }
            return Ok(Flow::Next);
        }
        let nwarps = self.shared.vc.len();
        let published = matches!(op, MbarOp::Arrive { .. }).then(|| self.shared.release(w.index as usize));
        let mut acquired: Option<Vec<u32>> = None;
        let mut blocked = 0u32;
        for l in lanes(exec) {
            let off = self.mbar_offset(w, inst, l)?;
            let tid = w.linear_tid(l);
            let name = self.thread_name(tid);
            match op {
                MbarOp::Init => {
                    let count = w.val(&inst.s[1], l) as i64;
                    if !(1..=MAX_COUNT).contains(&count) {
                        return fault(l, format!("mbarrier.init count {count} outside 1..={MAX_COUNT}"));
                    }
                    if let Some(b) = self.mbars.map.get(&off) {
                        return fault(
                            l,
                            format!("mbarrier at shared offset {off:#x} initialised again (first at PTX line {}) without mbarrier.inval", b.init_line),
                        );
                    }
                    if let Some(r) = self.shared.track(off as usize, 8, tid, true) {
                        return fault(l, self.mbar_race(&r, off, "mbarrier.init"));
                    }
                    self.shared.init[off as usize..off as usize + 8].fill(1);
                    self.shared.hb_active = true;
                    let count = count as u32;
                    let fresh = Mbar {
                        expected: count,
                        pending: count,
                        tx: 0,
                        phase: 0,
                        waited: false,
                        release: vec![0; nwarps],
                        completed: vec![0; nwarps],
                        init_line: inst.line,
                    };
                    self.mbars.map.insert(off, fresh);
                }
                MbarOp::Inval => {
                    if self.mbars.map.remove(&off).is_none() {
                        return fault(l, format!("mbarrier.inval at shared offset {off:#x}, which holds no initialised mbarrier"));
                    }
                    if let Some(r) = self.shared.track(off as usize, 8, tid, true) {
                        return fault(l, self.mbar_race(&r, off, "mbarrier.inval"));
                    }
                }
                _ => {
                    if !self.mbars.map.contains_key(&off) {
                        return fault(l, format!("mbarrier operation on shared offset {off:#x}, which holds no initialised mbarrier (missing mbarrier.init)"));
                    }
                    let what = match op {
                        MbarOp::Arrive { .. } => "arrive",
                        MbarOp::ExpectTx => "expect_tx",
                        MbarOp::CompleteTx => "complete_tx",
                        _ => "wait",
                    };
                    if let Some(r) = self.shared.track(off as usize, 8, tid, false) {
                        return fault(l, self.mbar_race(&r, off, &format!("mbarrier {what}")));
                    }
                    let b = self.mbars.map.get_mut(&off).expect("checked above");
                    match op {
                        MbarOp::Arrive { expect_tx, no_complete, drop } => {
                            let (tx, count) = if expect_tx {
                                (w.val(&inst.s[1], l) as u32 as i64, inst.s.get(2).map_or(1, |s| w.val(s, l) as u32))
                            } else {
                                (0, inst.s.get(1).map_or(1, |s| w.val(s, l) as u32))
                            };
                            if b.phase > 0 && !b.waited {
                                return fault(l, format!(
                                    "arrive on phase {} of the mbarrier at shared offset {off:#x} before any test_wait/try_wait observed phase {} complete (PTX ISA 9.7.13.15.4: the phase ran ahead)",
                                    b.phase, b.phase - 1
                                ));
                            }
                            if count == 0 || count > b.pending {
                                return fault(
                                    l,
                                    format!(
                                        "arrive with count {count} on the mbarrier at shared offset {off:#x}, which has {} of {} arrivals pending in phase {}",
                                        b.pending, b.expected, b.phase
                                    ),
                                );
                            }
                            b.tx += tx;
                            if b.tx.abs() > MAX_COUNT {
                                return fault(l, format!("transaction count {} of the mbarrier at shared offset {off:#x} exceeds {MAX_COUNT}", b.tx));
                            }
                            if drop {
                                b.expected -= count;
                            }
                            let pending_before = b.pending;
                            b.pending -= count;
                            if let Some(c) = &published {
                                b.join_release(c);
                            }
                            let state = 1u64 << 63 | (b.phase as u64) << 32 | pending_before as u64;
                            if b.complete_if_done() && no_complete {
                                return fault(
                                    l,
                                    format!("mbarrier.arrive.noComplete by {name} completed phase {} of the mbarrier at shared offset {off:#x}", b.phase - 1),
                                );
                            }
                            w.set(inst.d[0], l, state);
                        }
                        MbarOp::ExpectTx | MbarOp::CompleteTx => {
                            let n = w.val(&inst.s[1], l) as u32 as i64;
                            b.tx += if op == MbarOp::ExpectTx { n } else { -n };
                            if b.tx.abs() > MAX_COUNT {
                                return fault(l, format!("transaction count {} of the mbarrier at shared offset {off:#x} exceeds {MAX_COUNT}", b.tx));
                            }
                            b.complete_if_done();
                        }
                        MbarOp::Wait { parity } => {
                            let v = w.val(&inst.s[1], l);
                            let (mut done, mut target) = wait_outcome(b, parity, v, off).map_err(|m| Fault { lane: Some(l), message: m })?;
                            if !done && self.bulk.loads.iter().any(|ld| ld.mbar == off) {
                                // The phase is incomplete: the TMA / bulk copies completing on this barrier land now
                                // (in issue order), then the wait looks again.
                                self.land_loads(Some(off))?;
                                let b = self.mbars.map.get(&off).expect("landing keeps the barrier");
                                (done, target) = wait_outcome(b, parity, v, off).map_err(|m| Fault { lane: Some(l), message: m })?;
                            }
                            let b = self.mbars.map.get_mut(&off).expect("checked above");
                            if done {
                                b.waited = true;
                                let acq = acquired.get_or_insert_with(|| vec![0; nwarps]);
                                for (a, &c) in acq.iter_mut().zip(&b.completed) {
                                    *a = (*a).max(c);
                                }
                                w.set(inst.d[0], l, 1);
                            } else {
                                blocked |= 1 << l;
                                w.mbar_wait[l] = (off, target);
                            }
                            continue; // a wait changes no barrier state
                        }
                        MbarOp::Init | MbarOp::Inval | MbarOp::PendingCount => unreachable!(),
                    }
                }
            }
            self.mbars.version += 1;
        }
        if let Some(acq) = acquired {
            self.shared.acquire(w.index as usize, &acq);
            // Clocks are per warp, so lanes of one warp are ordered like after a __syncwarp: a successful wait
            // orders the warp's earlier accesses (and the copies its lanes issued) before its later ones.
            self.shared.warp_sync(w.index as usize);
        }
        Ok(if blocked == 0 { Flow::Next } else { Flow::MbarBlock(blocked) })
    }
}
