//! Warp collectives: shfl, vote, redux, match and mma.sync. They run once for the whole converged warp; the member
//! mask must name exactly the lanes executing the instruction (anything else is undefined on hardware and an error
//! here).

use super::{lanes, warp_fault, Fault, Warp};
use crate::float::{self, TensorArith};
use crate::ir::*;

pub(super) fn check_converged(_w: &Warp, name: &str, member: u32, exec: u32) -> Result<(), Fault> {
    if member != exec {
        return warp_fault(format!(
            "{name}: member mask {member:#010x} but the lanes executing it are {exec:#010x} (lanes named in the mask must be converged and not exited)"
        ));
    }
    Ok(())
}

pub(super) fn shfl(w: &mut Warp, inst: &Inst, mode: ShflMode, exec: u32, mask: u32) -> Result<(), Fault> {
    if exec == 0 {
        return Ok(());
    }
    let l0 = exec.trailing_zeros() as usize;
    let member = w.val(&inst.s[3], l0) as u32;
    check_converged(w, "shfl.sync", member, exec)?;
    let _ = mask;
    let mut out = [(0u64, false); 32];
    for l in lanes(exec) {
        let b = w.val(&inst.s[1], l) as u32 & 0x1f;
        let c = w.val(&inst.s[2], l) as u32;
        let cval = c & 0x1f;
        let seg = (c >> 8) & 0x1f;
        let lane = l as i32;
        let max_lane = ((l as u32 & seg) | (cval & !seg)) as i32;
        let min_lane = (l as u32 & seg) as i32;
        let (j, p) = match mode {
            ShflMode::Up => (lane - b as i32, lane - b as i32 >= max_lane),
            ShflMode::Down => (lane + b as i32, lane + b as i32 <= max_lane),
            ShflMode::Bfly => ((l as u32 ^ b) as i32, ((l as u32 ^ b) as i32) <= max_lane),
            ShflMode::Idx => ((min_lane as u32 | (b & !seg)) as i32, ((min_lane as u32 | (b & !seg)) as i32) <= max_lane),
        };
        let j = if p { j as usize } else { l };
        if exec >> j & 1 == 0 {
            return Err(Fault { lane: Some(l), message: format!("shfl.sync reads lane {j}, which is not executing the shuffle") });
        }
        out[l] = (w.val(&inst.s[0], j), p);
    }
    for l in lanes(exec) {
        w.set(inst.d[0], l, out[l].0 & 0xffff_ffff);
        if inst.d.len() > 1 {
            w.set(inst.d[1], l, out[l].1 as u64);
        }
    }
    Ok(())
}

pub(super) fn elect(w: &mut Warp, inst: &Inst, exec: u32) -> Result<(), Fault> {
    let member = w.val(&inst.s[0], exec.trailing_zeros() as usize) as u32;
    check_converged(w, "elect.sync", member, exec)?;
    let leader = exec.trailing_zeros() as u64;
    for l in lanes(exec) {
        w.set(inst.d[0], l, leader);
        if inst.d.len() > 1 {
            w.set(inst.d[1], l, (l as u64 == leader) as u64);
        }
    }
    Ok(())
}

pub(super) fn vote(w: &mut Warp, inst: &Inst, mode: VoteMode, exec: u32, _mask: u32) -> Result<(), Fault> {
    if exec == 0 {
        return Ok(());
    }
    let member = w.val(&inst.s[1], exec.trailing_zeros() as usize) as u32;
    check_converged(w, "vote.sync", member, exec)?;
    let mut ballot = 0u32;
    for l in lanes(exec) {
        if w.val(&inst.s[0], l) != 0 {
            ballot |= 1 << l;
        }
    }
    let v = match mode {
        VoteMode::All => (ballot == exec) as u64,
        VoteMode::Any => (ballot != 0) as u64,
        VoteMode::Uni => (ballot == exec || ballot == 0) as u64,
        VoteMode::Ballot => ballot as u64,
    };
    for l in lanes(exec) {
        w.set(inst.d[0], l, v);
    }
    Ok(())
}

pub(super) fn redux(w: &mut Warp, inst: &Inst, op: AtomOp, ty: Ty, exec: u32, _mask: u32) -> Result<(), Fault> {
    let member = w.val(&inst.s[1], exec.trailing_zeros() as usize) as u32;
    check_converged(w, "redux.sync", member, exec)?;
    let vals: Vec<u64> = lanes(exec).map(|l| w.val(&inst.s[0], l) & 0xffff_ffff).collect();
    let r = match (op, ty) {
        (AtomOp::Add, _) => vals.iter().fold(0u32, |a, &v| a.wrapping_add(v as u32)) as u64,
        (AtomOp::And, _) => vals.iter().fold(u32::MAX, |a, &v| a & v as u32) as u64,
        (AtomOp::Or, _) => vals.iter().fold(0, |a, &v| a | v as u32) as u64,
        (AtomOp::Xor, _) => vals.iter().fold(0, |a, &v| a ^ v as u32) as u64,
        (AtomOp::Min, Ty::S32) => vals.iter().map(|&v| v as u32 as i32).min().unwrap_or(0) as u32 as u64,
        (AtomOp::Max, Ty::S32) => vals.iter().map(|&v| v as u32 as i32).max().unwrap_or(0) as u32 as u64,
        (AtomOp::Min, Ty::U32 | Ty::B32) => vals.iter().copied().min().unwrap_or(0),
        (AtomOp::Max, Ty::U32 | Ty::B32) => vals.iter().copied().max().unwrap_or(0),
        _ => return warp_fault(format!("redux.sync {op:?} on {ty:?} is not supported")),
    };
    for l in lanes(exec) {
        w.set(inst.d[0], l, r);
    }
    Ok(())
}

pub(super) fn match_(w: &mut Warp, inst: &Inst, all: bool, ty: Ty, exec: u32, _mask: u32) -> Result<(), Fault> {
    let member = w.val(&inst.s[1], exec.trailing_zeros() as usize) as u32;
    check_converged(w, "match.sync", member, exec)?;
    let vals: Vec<(usize, u64)> = lanes(exec).map(|l| (l, ty.mask(w.val(&inst.s[0], l)))).collect();
    for &(l, v) in &vals {
        let same: u32 = vals.iter().filter(|(_, x)| *x == v).map(|(j, _)| 1u32 << j).sum();
        if all {
            let all_equal = same == exec;
            w.set(inst.d[0], l, if all_equal { exec as u64 } else { 0 });
            if inst.d.len() > 1 {
                w.set(inst.d[1], l, all_equal as u64);
            }
        } else {
            w.set(inst.d[0], l, same as u64);
        }
    }
    Ok(())
}

/// Value of element `e` (of `32 / bits` packed in a register) of an mma A/B operand.
/// Every supported input type is exact in f32.
#[inline(always)]
fn mma_elem(ty: Ty, reg: u64, e: u32) -> f32 {
    let bits = ty.bits();
    let raw = ((reg >> (bits * e)) & ((1u64 << bits) - 1)) as u32;
    match ty {
        Ty::Bf16 => f32::from_bits(raw << 16),
        Ty::F16 => float::decode(raw, float::F16) as f32,
        Ty::E4m3 => float::decode(raw, float::E4M3) as f32,
        Ty::E5m2 => float::decode(raw, float::E5M2) as f32,
        // Tensor cores read only the tf32 bits of an f32 register.
        Ty::Tf32 => f32::from_bits(raw & 0xffff_e000),
        Ty::S8 => raw as u8 as i8 as f32,
        Ty::U8 => raw as f32,
        _ => f32::NAN,
    }
}

/// mma.sync.aligned.m16n8kK.row.col with the fragment layouts of the PTX ISA manual. With g = lane / 4 and
/// t = lane % 4 and p = 32 / element-bits elements per register:
///   A register r, element e: row g + 8 * (r % 2), column p * t + e + 4 * p * (r / 2)
///   B register r, element e: row (k) p * t + e + 4 * p * r, column g
///   C/D (32-bit elements) register r: row g + 8 * (r / 2), column 2 * t + r % 2;
///   C/D f16x2 register r, half e: row g + 8 * r, column 2 * t + e.
/// C and the products are combined by `float::dot_add` under `model` (by default summed exactly, rounded once).
pub(super) fn mma(w: &mut Warp, inst: &Inst, shape: MmaShape, [a_ty, b_ty, c_ty, d_ty]: [Ty; 4], exec: u32, model: TensorArith) -> Result<(), Fault> {
    if exec != u32::MAX {
        return warp_fault(format!("mma.sync needs all 32 lanes of the warp converged (active {exec:#010x})"));
    }
    let supported_ab = matches!(a_ty, Ty::Bf16 | Ty::F16 | Ty::E4m3 | Ty::E5m2 | Ty::Tf32 | Ty::S8 | Ty::U8);
    let k = shape.k as usize;
    if !supported_ab || a_ty.bits() != b_ty.bits() || a_ty.bits() * shape.k != 256 && a_ty.bits() * shape.k != 128 {
        return warp_fault(format!("mma.sync m16n8k{} with {a_ty:?}/{b_ty:?} inputs is not supported", shape.k));
    }
    let p = 32 / a_ty.bits();
    let a_regs = (16 * shape.k * a_ty.bits() / 1024) as usize;
    let b_regs = (8 * shape.k * b_ty.bits() / 1024) as usize;
    let acc_half = c_ty == Ty::F16;
    let c_regs = if acc_half { 2 } else { 4 };
    if inst.s.len() != a_regs + b_regs + c_regs {
        return warp_fault(format!("mma.sync operand count {} does not match the shape (expected {})", inst.s.len(), a_regs + b_regs + c_regs));
    }
    let mut a = [[0f64; 64]; 16];
    let mut b = [[0f64; 64]; 8];
    let mut c = [[0f64; 8]; 16];
    let mut c_int = [[0i64; 8]; 16];
    for l in 0..32usize {
        let (g, t) = ((l / 4) as u32, (l % 4) as u32);
        for r in 0..a_regs as u32 {
            let v = w.val(&inst.s[r as usize], l);
            for e in 0..p {
                a[(g + 8 * (r % 2)) as usize][(p * t + e + 4 * p * (r / 2)) as usize] = mma_elem(a_ty, v, e) as f64;
            }
        }
        for r in 0..b_regs as u32 {
            let v = w.val(&inst.s[a_regs + r as usize], l);
            for e in 0..p {
                b[g as usize][(p * t + e + 4 * p * r) as usize] = mma_elem(b_ty, v, e) as f64;
            }
        }
        for r in 0..c_regs as u32 {
            let v = w.val(&inst.s[a_regs + b_regs + r as usize], l);
            if acc_half {
                for e in 0..2 {
                    c[(g + 8 * r) as usize][(2 * t + e) as usize] = float::decode((v >> (16 * e)) as u32 & 0xffff, float::F16);
                }
            } else {
                let (row, col) = ((g + 8 * (r / 2)) as usize, (2 * t + r % 2) as usize);
                c[row][col] = f32::from_bits(v as u32) as f64;
                c_int[row][col] = v as u32 as i32 as i64;
            }
        }
    }
    let integer = matches!(a_ty, Ty::S8 | Ty::U8);
    // Float results as the accumulator type's bits: products of <= 16-bit-mantissa inputs are exact in f64, and C
    // plus the K products is rounded by `model` (the hardware's order is unspecified).
    let format = |ty: Ty| match ty {
        Ty::Bf16 => float::BF16,
        Ty::F16 => float::F16,
        Ty::E4m3 => float::E4M3,
        Ty::E5m2 => float::E5M2,
        Ty::Tf32 => float::TF32,
        _ => float::F32,
    };
    let (formats, c_format, d_format) = ((format(a_ty), format(b_ty)), format(c_ty), format(d_ty));
    let mut d = [[0u32; 8]; 16];
    let mut d_int = [[0i64; 8]; 16];
    for i in 0..16 {
        for j in 0..8 {
            if integer {
                let mut si = c_int[i][j];
                for kk in 0..k {
                    si += (a[i][kk] * b[j][kk]) as i64; // |products| < 2^15: exact
                }
                d_int[i][j] = si;
            } else {
                d[i][j] = float::dot_add(model, c[i][j], c_format, &a[i][..k], &b[j][..k], 1.0, formats, d_format);
            }
        }
    }
    for l in 0..32usize {
        let (g, t) = (l / 4, l % 4);
        for r in 0..inst.d.len() {
            let v = if d_ty == Ty::F16 {
                let mut v = 0u64;
                for e in 0..2 {
                    v |= (d[g + 8 * r][2 * t + e] as u64) << (16 * e);
                }
                v
            } else {
                let (row, col) = (g + 8 * (r / 2), 2 * t + r % 2);
                if integer {
                    d_int[row][col] as i32 as u32 as u64
                } else {
                    d[row][col] as u64
                }
            };
            w.set(inst.d[r], l, v);
        }
    }
    Ok(())
}
