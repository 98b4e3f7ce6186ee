//! wgmma (PTX ISA §9.7.15): warpgroup matrix multiply-accumulate with shared-memory matrix descriptors.
//!
//! Each warp executes its own quarter (../shared/HOPPER-ASYNC.md §0.1): warp `w` of the warpgroup computes rows
//! `16w..16w+15` of D from the same rows of A and all of B, at issue. Its D and A registers and the shared bytes it
//! read stay "in flight" until a `wgmma.wait_group` retires its group; touching such a register with another
//! instruction, or writing such a shared byte (plain store, atomic, async copy), is an error. A `wait_group` completes
//! for the whole warpgroup (HOPPER-ASYNC.md §9.1: kernels release a stage after one warp's wait), so it first waits
//! until every warp of the warpgroup has committed as many groups as the waiting warp, then retires those groups in
//! all four warps.
//!
//! Arithmetic: products of f16/bf16 inputs are exact in f64, the sum over K = 16 is kept in f64 and rounded once to
//! the accumulator type (as `mma.sync` here). The hardware truncates differently in the last bit (MMA-Sim's model,
//! HOPPER-ASYNC.md §1.6, not implemented); known-answer tests use small integers, where every model agrees.

use std::collections::VecDeque;

use super::mem::Loc;
use super::{warp_fault, BlockCtx, Fault, Flow, Warp};
use crate::float;
use crate::ir::*;
use crate::tensor_map::swizzle_offset;

/// One wgmma of one warp in flight.
struct WgOp {
    regs: Vec<u32>,
    /// Shared offsets of the 2-byte elements it read.
    smem: Vec<u32>,
}

/// The wgmma state of one warp.
#[derive(Default)]
pub(crate) struct WgState {
    uncommitted: Vec<WgOp>,
    /// Committed groups not yet retired, oldest first, with their commit numbers.
    groups: VecDeque<(u32, Vec<WgOp>)>,
    /// Groups committed so far.
    pub committed: u32,
    /// Per register: how many in-flight wgmmas use it (allocated at the first wgmma).
    inflight: Vec<u16>,
    pub inflight_total: u32,
    /// Lanes blocked in a `wait_group` until every warp of the warpgroup has committed `wait_target` groups.
    pub blocked: u32,
    pub wait_target: u32,
    /// PTX line of the oldest in-flight wgmma, for messages.
    pub oldest_line: u32,
    /// The warp has exited (a wait does not wait for it).
    pub exited: bool,
    /// A `wgmma.fence` has run: from then on, registers written by other instructions are marked in `written`
    /// until the next fence.
    pub tracking: bool,
    written: Vec<bool>,
}

impl WgState {
    /// `wgmma.fence`: later wgmmas may use every register written so far.
    pub fn fence(&mut self, num_regs: u32) {
        self.tracking = true;
        self.written.clear();
        self.written.resize(num_regs as usize, false);
    }

    /// Marks the destination registers of a non-wgmma instruction executed after a fence.
    pub fn mark_written(&mut self, inst: &Inst) {
        if self.tracking {
            for &r in inst.d.iter().flatten() {
                self.written[r as usize] = true;
            }
        }
    }

    /// Whether the warpgroup of warp `wi` has caught up with this warp's blocked wait.
    pub fn wait_ready(all: &[WgState], wi: usize) -> bool {
        let target = all[wi].wait_target;
        let first = wi / 4 * 4;
        (first..(first + 4).min(all.len())).all(|v| all[v].exited || all[v].committed >= target)
    }

    /// The first register of `inst` that an in-flight wgmma uses.
    pub fn touched(&self, inst: &Inst) -> Option<u32> {
        let busy = |r: u32| self.inflight.get(r as usize).is_some_and(|&c| c > 0);
        inst.d.iter().flatten().copied().find(|&r| busy(r)).or_else(|| {
            inst.s.iter().find_map(|s| match *s {
                Src::Reg(r) | Src::NotReg(r) if busy(r) => Some(r),
                _ => None,
            })
        })
    }
}

/// A matrix descriptor (PTX ISA §9.7.15.5.1.2.2; CUTLASS `GmmaDescriptor`).
struct Desc {
    start: u32,
    lbo: u32,
    sbo: u32,
    /// 16-byte chunks per swizzle row (1, 2, 4, 8) and the `swizzle_offset` mode (0, 1, 2, 3).
    chunks: u32,
    mode: u32,
}

impl Desc {
    fn decode(d: u64) -> Result<Desc, String> {
        let field = |shift: u32| (((d >> shift) & 0x3fff) << 4) as u32;
        if (d >> 49) & 7 != 0 {
            return Err(format!("wgmma descriptor {d:#x} has a non-zero matrix base offset: not supported (align swizzled buffers to the swizzle period)"));
        }
        let (chunks, mode) = match d >> 62 {
            0 => (1, 0),
            1 => (8, 3),
            2 => (4, 2),
            _ => (2, 1),
        };
        Ok(Desc { start: field(0), lbo: field(16), sbo: field(32), chunks, mode })
    }

    /// Shared offset of 16-bit element (mn, k) (HOPPER-ASYNC.md §1.4: the canonical layouts of PTX ISA
    /// §9.7.15.5.1.2.1, then the absolute-address swizzle that TMA uses too).
    fn element(&self, mn: u32, k: u32, k_major: bool) -> u32 {
        const T: u32 = 8; // 16-bit elements per 16-byte chunk
        let w = self.chunks;
        let off = match (k_major, self.mode) {
            (true, 0) => (mn % 8) * 16 + (mn / 8) * self.sbo + (k % T) * 2 + (k / T) * self.lbo,
            (true, _) => (mn % 8) * 16 * w + (mn / 8) * self.sbo + k * 2,
            (false, 0) => (mn % T) * 2 + (mn / T) * self.sbo + (k % 8) * 16 + (k / 8) * self.lbo,
            (false, _) => (mn % T) * 2 + ((mn / T) % w) * 16 + (mn / (T * w)) * self.lbo + (k % 8) * 16 * w + (k / 8) * self.sbo,
        };
        swizzle_offset(self.start + off, self.mode)
    }
}

fn decode16(ty: Ty, bits: u32) -> f64 {
    if ty == Ty::Bf16 {
        f32::from_bits(bits << 16) as f64
    } else {
        float::decode(bits, float::F16)
    }
}

impl BlockCtx<'_> {
    /// Reads element (mn, k) of a descriptor operand, recording the bytes as read by the wgmma.
    fn wgmma_smem(&mut self, w: &mut Warp, desc: &Desc, (mn, k): (u32, u32), k_major: bool, ty: Ty, read: &mut Vec<u32>) -> Result<f64, Fault> {
        let off = desc.element(mn, k, k_major);
        let mut b = [0u8; 2];
        self.read(w, Loc::Shared(off), 0, &mut b).map_err(|f| Fault { message: format!("{} (wgmma operand element ({mn}, {k}))", f.message), ..f })?;
        self.check_proxy_fenced(off as usize, 2, w.linear_tid(0), 0, "wgmma.mma_async")?;
        read.push(off);
        Ok(decode16(ty, u16::from_le_bytes(b) as u32))
    }

    pub(super) fn wgmma(&mut self, w: &mut Warp, inst: &Inst, spec: WgmmaSpec, exec: u32) -> Result<(), Fault> {
        if exec != u32::MAX {
            return warp_fault(format!("wgmma.mma_async needs all 32 lanes of the warp converged (active {exec:#010x})"));
        }
        let threads = self.ntid.iter().product::<u32>();
        let group_first = w.index / 4 * 4;
        if threads < (group_first + 4) * 32 {
            return warp_fault(format!(
                "wgmma.mma_async in warp {}: the block's {threads} threads do not fill its warpgroup (warps {group_first}..{})",
                w.index,
                group_first + 3
            ));
        }
        if self.wgmma_fence_check {
            let st = &self.wg[w.index as usize];
            if !st.tracking {
                return warp_fault("wgmma.mma_async before any wgmma.fence in this warp (PTX ISA §9.7.15.7.1: the fence must precede the first wgmma)");
            }
            let a_regs = if spec.a_in_regs { &inst.s[..4] } else { &[] };
            let used = inst.d.iter().flatten().copied().chain(a_regs.iter().filter_map(|s| if let Src::Reg(r) = s { Some(*r) } else { None }));
            if let Some(r) = used.into_iter().find(|&r| st.written[r as usize]) {
                return warp_fault(format!(
                    "register #{r}, an accumulator or A fragment of this wgmma.mma_async, was written by another instruction after the last wgmma.fence: missing wgmma.fence (ptxas would serialise the wgmmas, warning C7515; Machine::wgmma_fence_check turns this check off)"
                ));
            }
        }
        // Descriptors and scale-d are warp-uniform operands (PTX ISA §9.7.15.5.2): the lanes must agree.
        let uniform: &[usize] = if spec.a_in_regs { &[4, 5] } else { &[0, 1, 2] };
        for &at in uniform {
            let v0 = w.val(&inst.s[at], 0);
            if let Some(l) = (1..32).find(|&l| w.val(&inst.s[at], l) != v0) {
                return warp_fault(format!(
                    "wgmma.mma_async operand {} differs between lanes 0 and {l} ({v0:#x} vs {:#x}): descriptors and scale-d must be the same in every lane",
                    at + 2,
                    w.val(&inst.s[at], l)
                ));
            }
        }
        let wr = w.index % 4;
        let n = spec.n as usize;
        let ty = spec.ab_ty;
        let mut read = Vec::new();
        // A: this warp's 16 rows x 16.
        let mut a = [[0f64; 16]; 16];
        let (b_at, scale_at) = if spec.a_in_regs { (4, 5) } else { (1, 2) };
        if spec.a_in_regs {
            for l in 0..32usize {
                let (g, q) = (l as u32 / 4, l as u32 % 4);
                for i in 0..8u32 {
                    let v = w.val(&inst.s[(i >> 1) as usize], l) >> (16 * (i & 1)) & 0xffff;
                    let (row, col) = (g + 8 * ((i >> 1) & 1), 2 * q + (i & 1) + 8 * (i >> 2));
                    a[row as usize][col as usize] = decode16(ty, v as u32);
                }
            }
        } else {
            let desc = Desc::decode(w.val(&inst.s[0], 0)).map_err(|m| Fault { lane: None, message: m })?;
            for (m, row) in a.iter_mut().enumerate() {
                for (k, x) in row.iter_mut().enumerate() {
                    *x = self.wgmma_smem(w, &desc, (16 * wr + m as u32, k as u32), !spec.trans_a, ty, &mut read)?;
                }
            }
        }
        let desc_b = Desc::decode(w.val(&inst.s[b_at], 0)).map_err(|m| Fault { lane: None, message: m })?;
        let mut b = vec![[0f64; 16]; n];
        for (col, bk) in b.iter_mut().enumerate() {
            for (k, x) in bk.iter_mut().enumerate() {
                *x = self.wgmma_smem(w, &desc_b, (col as u32, k as u32), !spec.trans_b, ty, &mut read)?;
            }
        }
        let sign = if spec.neg_a != spec.neg_b { -1.0 } else { 1.0 };
        let scale_d = w.val(&inst.s[scale_at], 0) != 0;
        let f16_d = spec.d_ty == Ty::F16;
        for l in 0..32usize {
            let (g, q) = (l / 4, l % 4);
            for i in 0..n / 2 {
                let (row, col) = (g + 8 * ((i >> 1) & 1), 8 * (i >> 2) + 2 * q + (i & 1));
                let reg = if f16_d { i >> 1 } else { i };
                let r = inst.d[reg].expect("checked at decode") as usize * 32 + l;
                let c = if !scale_d {
                    0.0
                } else if f16_d {
                    float::decode((w.regs[r] >> (16 * (i & 1))) as u32 & 0xffff, float::F16)
                } else {
                    f32::from_bits(w.regs[r] as u32) as f64
                };
                let mut acc = [0f64; 4];
                for k in 0..16 {
                    acc[k % 4] += a[row][k] * b[col][k];
                }
                let v = c + sign * ((acc[0] + acc[1]) + (acc[2] + acc[3]));
                if f16_d {
                    let h = float::encode(v, float::F16, Rnd::Rn, false) as u64;
                    let shift = 16 * (i & 1);
                    w.regs[r] = (w.regs[r] & !(0xffff << shift)) | h << shift;
                } else {
                    w.regs[r] = (v as f32).to_bits() as u64;
                }
            }
        }
        // In flight until the wait_group that retires it.
        let mut regs: Vec<u32> = inst.d.iter().flatten().copied().collect();
        if spec.a_in_regs {
            regs.extend(inst.s[..4].iter().filter_map(|s| if let Src::Reg(r) = s { Some(*r) } else { None }));
        }
        let st = &mut self.wg[w.index as usize];
        if st.inflight.is_empty() {
            st.inflight = vec![0; self.kernel.num_regs as usize];
        }
        if st.inflight_total == 0 {
            st.oldest_line = inst.line;
        }
        for &r in &regs {
            st.inflight[r as usize] += 1;
            st.inflight_total += 1;
        }
        for &o in &read {
            self.shared.async_readers[o as usize] += 1;
            self.shared.async_readers[o as usize + 1] += 1;
        }
        self.shared.async_read_bytes += 2 * read.len();
        self.wg[w.index as usize].uncommitted.push(WgOp { regs, smem: read });
        self.counters.wgmma_issued(&spec);
        Ok(())
    }

    pub(super) fn wgmma_commit(&mut self, w: &Warp) {
        let st = &mut self.wg[w.index as usize];
        let ops = std::mem::take(&mut st.uncommitted);
        st.groups.push_back((st.committed, ops));
        st.committed += 1;
    }

    /// `wgmma.wait_group n`: blocks until the warpgroup's other warps have committed as many groups, then retires,
    /// in all four warps, the groups older than this warp's `n` most recent.
    pub(super) fn wgmma_wait(&mut self, w: &Warp, n: u32, exec: u32) -> Result<Flow, Fault> {
        let target = self.wg[w.index as usize].committed;
        let first = w.index / 4 * 4;
        let group = first..(first + 4).min(self.wg.len() as u32);
        if group.clone().any(|v| !self.wg[v as usize].exited && self.wg[v as usize].committed < target) {
            let st = &mut self.wg[w.index as usize];
            st.blocked |= exec;
            st.wait_target = target;
            return Ok(Flow::WgBlock(exec));
        }
        let keep_from = target.saturating_sub(n);
        for v in group.clone() {
            // The wait completes for the warpgroup: what the other warps' wgmmas did happens before it returns.
            if v != w.index {
                let clock = self.shared.vc[v as usize].clone();
                self.shared.acquire(w.index as usize, &clock);
            }
        }
        for v in group {
            let st = &mut self.wg[v as usize];
            while st.groups.front().is_some_and(|(idx, _)| *idx < keep_from) {
                let (_, ops) = st.groups.pop_front().expect("checked");
                for op in ops {
                    for r in op.regs {
                        st.inflight[r as usize] -= 1;
                        st.inflight_total -= 1;
                    }
                    for o in op.smem {
                        self.shared.async_readers[o as usize] -= 1;
                        self.shared.async_readers[o as usize + 1] -= 1;
                    }
                    self.shared.async_read_bytes -= 2;
                }
            }
        }
        Ok(Flow::Next)
    }
}
