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
//! Shapes: m64nNk8 with tf32 inputs, m64nNk16 with f16/bf16, m64nNk32 with e4m3/e5m2; every shape reads 32 bytes of K
//! per row.
//!
//! Arithmetic: the products of the inputs (tf32, f16, bf16, e4m3, e5m2) are exact in f64; per output element and
//! instruction, `float::dot_add` combines C and the K products as `Machine::tensor_arith` says: summed exactly and
//! rounded once (the default), or MMA-Sim's truncating Hopper model (HOPPER-ASYNC.md §1.6). Known-answer tests use
//! small integers, where every model agrees.

use std::collections::VecDeque;

use super::mem::Loc;
use super::{warp_fault, BlockCtx, Fault, Flow, Warp};
use crate::float;
use crate::ir::*;
use crate::tensor_map::swizzle_offset;

/// One wgmma of one warp in flight.
struct WgOp {
    regs: Vec<u32>,
    /// Shared offsets of the elements it read, `elem_bytes` bytes each.
    smem: Vec<u32>,
    elem_bytes: u32,
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

    /// Shared offset of element (mn, k) of `eb` bytes (HOPPER-ASYNC.md §1.4: the canonical layouts of PTX ISA
    /// §9.7.15.5.1.2.1, in 16-byte chunks of T = 16 / eb elements, then the absolute-address swizzle that TMA uses
    /// too).
    fn element(&self, mn: u32, k: u32, k_major: bool, eb: u32) -> u32 {
        let t = 16 / eb;
        let w = self.chunks;
        let off = match (k_major, self.mode) {
            (true, 0) => (mn % 8) * 16 + (mn / 8) * self.sbo + (k % t) * eb + (k / t) * self.lbo,
            (true, _) => (mn % 8) * 16 * w + (mn / 8) * self.sbo + k * eb,
            (false, 0) => (mn % t) * eb + (mn / t) * self.sbo + (k % 8) * 16 + (k / 8) * self.lbo,
            (false, _) => (mn % t) * eb + ((mn / t) % w) * 16 + (mn / (t * w)) * self.lbo + (k % 8) * 16 * w + (k / 8) * self.sbo,
        };
        swizzle_offset(self.start + off, self.mode)
    }
}

/// The format of a wgmma input type (tf32, f16, bf16, e4m3 or e5m2).
fn input_format(ty: Ty) -> float::Format {
    match ty {
        Ty::Tf32 => float::TF32,
        Ty::Bf16 => float::BF16,
        Ty::F16 => float::F16,
        Ty::E4m3 => float::E4M3,
        _ => float::E5M2,
    }
}

/// Exact value of a wgmma input element's bits; tf32 reads an f32 register or word and ignores its low 13 bits
/// (PTX ISA §9.7.15.5.2).
fn decode_input(ty: Ty, bits: u32) -> f64 {
    if ty == Ty::Tf32 {
        float::decode(bits >> 13, float::TF32)
    } else {
        float::decode(bits, input_format(ty))
    }
}

impl BlockCtx<'_> {
    /// Reads element (mn, k) of a descriptor operand of type `ty`, recording it as read by the wgmma.
    fn wgmma_smem(&mut self, w: &mut Warp, desc: &Desc, (mn, k): (u32, u32), k_major: bool, ty: Ty, read: &mut Vec<u32>) -> Result<f64, Fault> {
        let eb = ty.bits() / 8;
        let off = desc.element(mn, k, k_major, eb);
        let mut b = [0u8; 4];
        let b = &mut b[..eb as usize];
        self.read(w, Loc::Shared(off), 0, b).map_err(|f| Fault { message: format!("{} (wgmma operand element ({mn}, {k}))", f.message), ..f })?;
        self.check_proxy_fenced(off as usize, eb as usize, w.linear_tid(0), 0, "wgmma.mma_async")?;
        read.push(off);
        Ok(decode_input(ty, b.iter().rev().fold(0, |v, &x| v << 8 | x as u32)))
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
        let (n, k) = (spec.n as usize, spec.k as usize);
        let mut read = Vec::new();
        // A: this warp's 16 rows x K.
        let mut a = [[0f64; 32]; 16];
        let (b_at, scale_at) = if spec.a_in_regs { (4, 5) } else { (1, 2) };
        if spec.a_in_regs {
            // The mma.m16n8kK A fragment (HOPPER-ASYNC.md §1.5): p elements per register, element i of a thread in
            // register i / p; row g + 8 ((i / p) % 2), column p q + i % p + 4 p (i / 2p).
            let bits = spec.a_ty.bits();
            let p = 32 / bits;
            for l in 0..32usize {
                let (g, q) = (l as u32 / 4, l as u32 % 4);
                for i in 0..4 * p {
                    let v = (w.val(&inst.s[(i / p) as usize], l) >> (bits * (i % p)) & ((1u64 << bits) - 1)) as u32;
                    let (row, col) = (g + 8 * ((i / p) % 2), p * q + i % p + 4 * p * (i / (2 * p)));
                    a[row as usize][col as usize] = decode_input(spec.a_ty, v);
                }
            }
        } else {
            let desc = Desc::decode(w.val(&inst.s[0], 0)).map_err(|m| Fault { lane: None, message: m })?;
            for (m, row) in a.iter_mut().enumerate() {
                for (kk, x) in row[..k].iter_mut().enumerate() {
                    *x = self.wgmma_smem(w, &desc, (16 * wr + m as u32, kk as u32), !spec.trans_a, spec.a_ty, &mut read)?;
                }
            }
        }
        let desc_b = Desc::decode(w.val(&inst.s[b_at], 0)).map_err(|m| Fault { lane: None, message: m })?;
        let mut b = vec![[0f64; 32]; n];
        for (col, bk) in b.iter_mut().enumerate() {
            for (kk, x) in bk[..k].iter_mut().enumerate() {
                *x = self.wgmma_smem(w, &desc_b, (col as u32, kk as u32), !spec.trans_b, spec.b_ty, &mut read)?;
            }
        }
        let sign = if spec.neg_a != spec.neg_b { -1.0 } else { 1.0 };
        let scale_d = w.val(&inst.s[scale_at], 0) != 0;
        let f16_d = spec.d_ty == Ty::F16;
        let d_format = if f16_d { float::F16 } else { float::F32 };
        let formats = (input_format(spec.a_ty), input_format(spec.b_ty));
        for l in 0..32usize {
            let (g, q) = (l / 4, l % 4);
            for i in 0..n / 2 {
                let (row, col) = (g + 8 * ((i >> 1) & 1), 8 * (i >> 2) + 2 * q + (i & 1));
                let reg = if f16_d { i >> 1 } else { i };
                let r = inst.d[reg].expect("checked at decode") as usize * 32 + l;
                // C is +0 when scale-d is false.
                let c = if !scale_d {
                    0.0
                } else if f16_d {
                    float::decode((w.regs[r] >> (16 * (i & 1))) as u32 & 0xffff, float::F16)
                } else {
                    f32::from_bits(w.regs[r] as u32) as f64
                };
                let d = float::dot_add(self.tensor_arith, c, d_format, &a[row][..k], &b[col][..k], sign, formats, d_format) as u64;
                if f16_d {
                    let shift = 16 * (i & 1);
                    w.regs[r] = (w.regs[r] & !(0xffff << shift)) | d << shift;
                } else {
                    w.regs[r] = d;
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
        let elem_bytes = spec.b_ty.bits() / 8;
        for &o in &read {
            for byte in o..o + elem_bytes {
                self.shared.async_readers[byte as usize] += 1;
            }
        }
        self.shared.async_read_bytes += elem_bytes as usize * read.len();
        self.wg[w.index as usize].uncommitted.push(WgOp { regs, smem: read, elem_bytes });
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
                    for &o in &op.smem {
                        for byte in o..o + op.elem_bytes {
                            self.shared.async_readers[byte as usize] -= 1;
                        }
                    }
                    self.shared.async_read_bytes -= op.elem_bytes as usize * op.smem.len();
                }
            }
        }
        Ok(Flow::Next)
    }
}
