//! Integer, bit, float, comparison and conversion instructions. Each runs a tight loop over the active lanes; the
//! operation is chosen once per instruction where it matters.

use super::{lanes, Warp};
use crate::float::{self, Format};
use crate::ir::*;

#[inline(always)]
fn signed(ty: Ty, v: u64) -> i64 {
    match ty.bits() {
        8 => v as i8 as i64,
        16 => v as i16 as i64,
        32 => v as i32 as i64,
        _ => v as i64,
    }
}

fn int_min_max(ty: Ty) -> (i128, i128) {
    let b = ty.bits();
    if ty.is_signed() {
        (-(1i128 << (b - 1)), (1i128 << (b - 1)) - 1)
    } else {
        (0, (1i128 << b) - 1)
    }
}

/// `op` on one lane's operands (already read raw); returns the raw result bits.
#[inline(always)]
fn int1(op: IntOp, ty: Ty, sat: bool, a: u64, b: u64, c: u64, d: u64) -> Result<u64, String> {
    let bits = ty.bits();
    let s = ty.is_signed();
    let wide = |x: u64| -> i128 {
        if s {
            signed(ty, x) as i128
        } else {
            ty.mask(x) as i128
        }
    };
    Ok(match op {
        IntOp::Add | IntOp::Sub => {
            let r = if op == IntOp::Add { wide(a) + wide(b) } else { wide(a) - wide(b) };
            if sat {
                let (lo, hi) = int_min_max(ty);
                r.clamp(lo, hi) as u64
            } else {
                r as u64
            }
        }
        IntOp::MulLo => (wide(a) * wide(b)) as u64,
        IntOp::MulHi => {
            let p = wide(a).wrapping_mul(wide(b));
            (p >> bits) as u64
        }
        IntOp::MulWide => {
            let p = wide(a) * wide(b);
            let wty = match ty {
                Ty::S16 => Ty::S32,
                Ty::U16 => Ty::U32,
                Ty::S32 => Ty::S64,
                _ => Ty::U64,
            };
            return Ok(wty.mask(p as u64));
        }
        IntOp::Mul24Lo => {
            let x = if s { ((a as i64) << 40 >> 40) as i128 } else { (a & 0xff_ffff) as i128 };
            let y = if s { ((b as i64) << 40 >> 40) as i128 } else { (b & 0xff_ffff) as i128 };
            (x * y) as u64
        }
        IntOp::MadLo => (wide(a).wrapping_mul(wide(b)).wrapping_add(wide(c))) as u64,
        IntOp::MadHi => ((wide(a).wrapping_mul(wide(b)) >> bits).wrapping_add(wide(c))) as u64,
        IntOp::MadWide => {
            let p = wide(a) * wide(b);
            let wty = if bits == 16 {
                if s {
                    Ty::S32
                } else {
                    Ty::U32
                }
            } else if s {
                Ty::S64
            } else {
                Ty::U64
            };
            let cw = if s { signed(wty, c) as i128 } else { wty.mask(c) as i128 };
            return Ok(wty.mask(p.wrapping_add(cw) as u64));
        }
        IntOp::Div => {
            if ty.mask(b) == 0 {
                return Ok(ty.mask(u64::MAX)); // undefined in PTX; the hardware answers all ones
            }
            if s {
                signed(ty, a).wrapping_div(signed(ty, b)) as u64
            } else {
                ty.mask(a) / ty.mask(b)
            }
        }
        IntOp::Rem => {
            if ty.mask(b) == 0 {
                return Ok(ty.mask(a));
            }
            if s {
                signed(ty, a).wrapping_rem(signed(ty, b)) as u64
            } else {
                ty.mask(a) % ty.mask(b)
            }
        }
        IntOp::Min => wide(a).min(wide(b)) as u64,
        IntOp::Max => wide(a).max(wide(b)) as u64,
        IntOp::Abs => wide(a).unsigned_abs() as u64,
        IntOp::Neg => wide(a).wrapping_neg() as u64,
        IntOp::And => a & b,
        IntOp::Or => a | b,
        IntOp::Xor => a ^ b,
        IntOp::Not => !a,
        IntOp::CNot => (ty.mask(a) == 0) as u64,
        IntOp::Shl => {
            let n = b as u32;
            if n >= bits {
                0
            } else {
                a << n
            }
        }
        IntOp::Shr => {
            let n = (b as u32).min(bits);
            if s {
                (signed(ty, a) >> n.min(63)) as u64
            } else if n >= bits {
                0
            } else {
                ty.mask(a) >> n
            }
        }
        IntOp::Popc => return Ok(ty.mask(a).count_ones() as u64),
        IntOp::Clz => return Ok((ty.mask(a).leading_zeros() - (64 - bits)) as u64),
        IntOp::Brev => ty.mask(a).reverse_bits() >> (64 - bits),
        IntOp::Bfind => {
            let v = if s && signed(ty, a) < 0 { ty.mask(!a) } else { ty.mask(a) };
            return Ok(if v == 0 { 0xffff_ffff } else { (63 - v.leading_zeros()) as u64 });
        }
        IntOp::Bfe => {
            let pos = (b & 0xff) as u32;
            let len = (c & 0xff) as u32;
            if len == 0 {
                return Ok(0);
            }
            let av = ty.mask(a);
            let mut r = 0u64;
            let sbit = if s { (av >> (pos + len - 1).min(bits - 1)) & 1 } else { 0 };
            for i in 0..bits {
                let bit = if i < len && pos + i < bits {
                    (av >> (pos + i)) & 1
                } else if i < len && !s {
                    0
                } else {
                    sbit
                };
                r |= bit << i;
            }
            r
        }
        IntOp::Bfi => {
            let pos = (c & 0xff) as u32;
            let len = (d & 0xff) as u32;
            let mut r = ty.mask(b);
            for i in 0..len {
                if pos + i >= bits {
                    break;
                }
                r = (r & !(1 << (pos + i))) | (((a >> i) & 1) << (pos + i));
            }
            r
        }
        IntOp::Sad => ((wide(a) - wide(b)).abs() + wide(c)) as u64,
        IntOp::Lop3 => {
            let lut = d as u8;
            let mut r = 0u64;
            for i in 0..8 {
                if lut >> i & 1 != 0 {
                    let pick = |bit: u32, v: u64| if i >> bit & 1 != 0 { v } else { !v };
                    r |= pick(2, a) & pick(1, b) & pick(0, c);
                }
            }
            r
        }
        IntOp::ShfL { wrap } | IntOp::ShfR { wrap } => {
            let n = if wrap { (c & 31) as u32 } else { (c as u32).min(32) };
            let v = (b & 0xffff_ffff) << 32 | (a & 0xffff_ffff);
            return Ok(if matches!(op, IntOp::ShfL { .. }) { (v << n) >> 32 & 0xffff_ffff } else { (v >> n) & 0xffff_ffff });
        }
        IntOp::Dp4a { a_signed: sa, b_signed: sb } => {
            let mut acc = c as u32 as i32 as i64;
            for i in 0..4 {
                let x = (a >> (8 * i)) as u8;
                let y = (b >> (8 * i)) as u8;
                let xv = if sa { x as i8 as i64 } else { x as i64 };
                let yv = if sb { y as i8 as i64 } else { y as i64 };
                acc += xv * yv;
            }
            return Ok(acc as u32 as u64);
        }
    })
}

pub(super) fn int(w: &mut Warp, inst: &Inst, op: IntOp, ty: Ty, sat: bool, exec: u32) -> Result<(), String> {
    let d = inst.d[0];
    let n = inst.s.len();
    // The common two-operand forms run without the generic dispatch.
    let rty = if ty == Ty::Pred { Ty::Pred } else { ty };
    macro_rules! fast2 {
        ($f:expr) => {{
            let (sa, sb) = (inst.s[0], inst.s[1]);
            for l in lanes(exec) {
                let v = $f(w.val(&sa, l), w.val(&sb, l));
                w.set(d, l, rty.mask(v));
            }
            return Ok(());
        }};
    }
    match (op, ty.bits(), sat) {
        (IntOp::Add, 32, false) => fast2!(|a: u64, b: u64| (a as u32).wrapping_add(b as u32) as u64),
        (IntOp::Add, 64, false) => fast2!(|a: u64, b: u64| a.wrapping_add(b)),
        (IntOp::Sub, 32, false) => fast2!(|a: u64, b: u64| (a as u32).wrapping_sub(b as u32) as u64),
        (IntOp::Sub, 64, false) => fast2!(|a: u64, b: u64| a.wrapping_sub(b)),
        (IntOp::And, _, _) => fast2!(|a: u64, b: u64| a & b),
        (IntOp::Or, _, _) => fast2!(|a: u64, b: u64| a | b),
        (IntOp::Xor, _, _) => fast2!(|a: u64, b: u64| a ^ b),
        (IntOp::MulLo, 32, _) => fast2!(|a: u64, b: u64| (a as u32).wrapping_mul(b as u32) as u64),
        (IntOp::MulLo, 64, _) => fast2!(|a: u64, b: u64| a.wrapping_mul(b)),
        (IntOp::Shl, 32, _) => fast2!(|a: u64, b: u64| if (b as u32) >= 32 { 0 } else { ((a as u32) << b as u32) as u64 }),
        _ => {}
    }
    let out_ty = match op {
        IntOp::MulWide | IntOp::MadWide | IntOp::Popc | IntOp::Clz | IntOp::Bfind | IntOp::Dp4a { .. } => Ty::B64,
        _ => rty,
    };
    for l in lanes(exec) {
        let g = |i: usize| if i < n { w.val(&inst.s[i], l) } else { 0 };
        let v = int1(op, ty, sat, g(0), g(1), g(2), g(3))?;
        w.set(d, l, out_ty.mask(v));
    }
    Ok(())
}

pub(super) fn prmt(w: &mut Warp, inst: &Inst, mode: PrmtMode, exec: u32) {
    for l in lanes(exec) {
        let a = w.val(&inst.s[0], l) as u32;
        let b = w.val(&inst.s[1], l) as u32;
        let c = w.val(&inst.s[2], l) as u32;
        let bytes = (((b as u64) << 32) | a as u64).to_le_bytes();
        let sel: [u32; 4] = match mode {
            PrmtMode::Default => [c & 0xf, (c >> 4) & 0xf, (c >> 8) & 0xf, (c >> 12) & 0xf],
            PrmtMode::F4e => {
                let s = c & 3;
                [s, s + 1, s + 2, s + 3].map(|x| x & 7)
            }
            PrmtMode::B4e => {
                let s = c & 3;
                [8 - s, 7 - s, 6 - s, 5 - s].map(|x| x & 7)
            }
            PrmtMode::Rc8 => [c & 3; 4],
            PrmtMode::Ecl => {
                let s = c & 3;
                [0, 1, 2, 3].map(|i: u32| i.max(s))
            }
            PrmtMode::Ecr => {
                let s = c & 3;
                [0, 1, 2, 3].map(|i: u32| i.min(s))
            }
            PrmtMode::Rc16 => {
                let s = c & 1;
                [2 * s, 2 * s + 1, 2 * s, 2 * s + 1]
            }
        };
        let mut r = 0u32;
        for (i, &s) in sel.iter().enumerate() {
            let byte = if mode == PrmtMode::Default && s & 8 != 0 {
                // Sign-replicate mode: the msb of the selected byte fills the whole byte.
                if bytes[(s & 7) as usize] & 0x80 != 0 {
                    0xff
                } else {
                    0
                }
            } else {
                bytes[(s & 7) as usize]
            };
            r |= (byte as u32) << (8 * i);
        }
        w.set(inst.d[0], l, r as u64);
    }
}

/// PTX min/max: a NaN operand yields the other; -0 orders below +0.
fn fmin(a: f64, b: f64) -> f64 {
    if a.is_nan() {
        b
    } else if b.is_nan() || a < b || (a == b && a.is_sign_negative()) {
        a
    } else {
        b
    }
}

fn fmax(a: f64, b: f64) -> f64 {
    if a.is_nan() {
        b
    } else if b.is_nan() || a > b || (a == b && b.is_sign_negative()) {
        a
    } else {
        b
    }
}

/// One float operation at f64 precision (exact for add/mul of f32 or smaller, fma of f16); the caller rounds once.
fn fop(op: FloatOp, a: f64, b: f64, c: f64) -> f64 {
    match op {
        FloatOp::Add => a + b,
        FloatOp::Sub => a - b,
        FloatOp::Mul => a * b,
        FloatOp::Fma => a.mul_add(b, c),
        FloatOp::Div => a / b,
        FloatOp::Rcp => 1.0 / a,
        FloatOp::Sqrt => a.sqrt(),
        FloatOp::Rsqrt => 1.0 / a.sqrt(),
        FloatOp::Ex2 => a.exp2(),
        FloatOp::Lg2 => a.log2(),
        FloatOp::Sin => a.sin(),
        FloatOp::Cos => a.cos(),
        FloatOp::Tanh => a.tanh(),
        FloatOp::Min => fmin(a, b),
        FloatOp::Max => fmax(a, b),
        FloatOp::Abs => a.abs(),
        FloatOp::Neg => -a,
        FloatOp::Copysign => b.copysign(a),
    }
}

fn half_format(ty: Ty) -> Format {
    match ty {
        Ty::Bf16 | Ty::Bf16x2 => float::BF16,
        _ => float::F16,
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn float(w: &mut Warp, inst: &Inst, op: FloatOp, ty: Ty, rnd: Rnd, ftz: bool, sat: bool, exec: u32) -> Result<(), String> {
    let d = inst.d[0];
    let n = inst.s.len();
    let satf = |v: f64| {
        if sat {
            if v.is_nan() {
                0.0
            } else {
                v.clamp(0.0, 1.0)
            }
        } else {
            v
        }
    };
    match ty {
        Ty::F32 => {
            let fz = |v: f32| if ftz { float::ftz32(v) } else { v };
            macro_rules! fast {
                ($f:expr) => {{
                    for l in lanes(exec) {
                        let a = fz(f32::from_bits(w.val(&inst.s[0], l) as u32));
                        let b = fz(f32::from_bits(w.val(&inst.s[1.min(n - 1)], l) as u32));
                        let c = fz(f32::from_bits(w.val(&inst.s[2.min(n - 1)], l) as u32));
                        let r: f32 = $f(a, b, c);
                        let r = if sat { satf(r as f64) as f32 } else { r };
                        w.set(d, l, fz(r).to_bits() as u64);
                    }
                    return Ok(());
                }};
            }
            let nearest = matches!(rnd, Rnd::Rn | Rnd::None);
            match op {
                FloatOp::Add if nearest => fast!(|a: f32, b: f32, _c: f32| a + b),
                FloatOp::Sub if nearest => fast!(|a: f32, b: f32, _c: f32| a - b),
                FloatOp::Mul if nearest => fast!(|a: f32, b: f32, _c: f32| a * b),
                FloatOp::Fma if nearest => fast!(|a: f32, b: f32, c: f32| a.mul_add(b, c)),
                FloatOp::Div if nearest => fast!(|a: f32, b: f32, _c: f32| a / b),
                FloatOp::Abs => fast!(|a: f32, _b: f32, _c: f32| f32::from_bits(a.to_bits() & 0x7fff_ffff)),
                FloatOp::Neg => fast!(|a: f32, _b: f32, _c: f32| f32::from_bits(a.to_bits() ^ 0x8000_0000)),
                _ => {}
            }
            for l in lanes(exec) {
                let g = |i: usize| fz(f32::from_bits(w.val(&inst.s[i.min(n - 1)], l) as u32)) as f64;
                let r = fop(op, g(0), g(1), g(2));
                let r = satf(float::f64_to_f32(r, rnd) as f64) as f32;
                w.set(d, l, fz(r).to_bits() as u64);
            }
        }
        Ty::F64 => {
            for l in lanes(exec) {
                let g = |i: usize| f64::from_bits(w.val(&inst.s[i.min(n - 1)], l));
                let r = satf(fop(op, g(0), g(1), g(2)));
                w.set(d, l, r.to_bits());
            }
        }
        Ty::F16 | Ty::Bf16 | Ty::F16x2 | Ty::Bf16x2 => {
            let f = half_format(ty);
            let halves = if matches!(ty, Ty::F16x2 | Ty::Bf16x2) { 2 } else { 1 };
            for l in lanes(exec) {
                let mut out = 0u64;
                for h in 0..halves {
                    let g = |i: usize| {
                        let bits = (w.val(&inst.s[i.min(n - 1)], l) >> (16 * h)) as u32 & 0xffff;
                        let v = float::decode(bits, f);
                        if ftz && v.abs() < 2f64.powi(1 - f.bias) {
                            0.0f64.copysign(v)
                        } else {
                            v
                        }
                    };
                    let r = satf(fop(op, g(0), g(1), g(2)));
                    let bits = match op {
                        // Sign-bit operations keep NaN payloads as the hardware does.
                        FloatOp::Abs => ((w.val(&inst.s[0], l) >> (16 * h)) & 0x7fff) as u32,
                        FloatOp::Neg => (((w.val(&inst.s[0], l) >> (16 * h)) & 0xffff) ^ 0x8000) as u32,
                        _ => float::encode(r, f, if rnd == Rnd::None { Rnd::Rn } else { rnd }, false),
                    };
                    out |= (bits as u64) << (16 * h);
                }
                w.set(d, l, out);
            }
        }
        _ => return Err(format!("float instruction on type {ty:?} is not supported")),
    }
    Ok(())
}

/// Reads an operand of a comparison as (value, is-float).
fn cmp_val(ty: Ty, v: u64, ftz: bool) -> f64 {
    match ty {
        Ty::F32 => {
            let f = f32::from_bits(v as u32);
            (if ftz { float::ftz32(f) } else { f }) as f64
        }
        Ty::F64 => f64::from_bits(v),
        Ty::F16 | Ty::Bf16 => float::decode(v as u32 & 0xffff, half_format(ty)),
        _ => unreachable!(),
    }
}

fn compare(cmp: Cmp, ty: Ty, a: u64, b: u64, ftz: bool) -> Result<bool, String> {
    if ty.is_float() {
        let (x, y) = (cmp_val(ty, a, ftz), cmp_val(ty, b, ftz));
        let nan = x.is_nan() || y.is_nan();
        return Ok(match cmp {
            Cmp::Eq => !nan && x == y,
            Cmp::Ne => !nan && x != y,
            Cmp::Lt => !nan && x < y,
            Cmp::Le => !nan && x <= y,
            Cmp::Gt => !nan && x > y,
            Cmp::Ge => !nan && x >= y,
            Cmp::Equ => nan || x == y,
            Cmp::Neu => nan || x != y,
            Cmp::Ltu => nan || x < y,
            Cmp::Leu => nan || x <= y,
            Cmp::Gtu => nan || x > y,
            Cmp::Geu => nan || x >= y,
            Cmp::Num => !nan,
            Cmp::Nan => nan,
            _ => return Err(format!("comparison {cmp:?} on a float type")),
        });
    }
    let (sa, sb) = (signed(ty, a), signed(ty, b));
    let (ua, ub) = (ty.mask(a), ty.mask(b));
    let s = ty.is_signed();
    Ok(match cmp {
        Cmp::Eq => ua == ub,
        Cmp::Ne => ua != ub,
        Cmp::Lt => {
            if s {
                sa < sb
            } else {
                ua < ub
            }
        }
        Cmp::Le => {
            if s {
                sa <= sb
            } else {
                ua <= ub
            }
        }
        Cmp::Gt => {
            if s {
                sa > sb
            } else {
                ua > ub
            }
        }
        Cmp::Ge => {
            if s {
                sa >= sb
            } else {
                ua >= ub
            }
        }
        Cmp::Lo => ua < ub,
        Cmp::Ls => ua <= ub,
        Cmp::Hi => ua > ub,
        Cmp::Hs => ua >= ub,
        _ => return Err(format!("comparison {cmp:?} on an integer type")),
    })
}

fn combine(c: Option<BoolOp>, x: bool, p: bool) -> bool {
    match c {
        None => x,
        Some(BoolOp::And) => x && p,
        Some(BoolOp::Or) => x || p,
        Some(BoolOp::Xor) => x ^ p,
    }
}

pub(super) fn setp(w: &mut Warp, inst: &Inst, cmp: Cmp, ty: Ty, comb: Option<BoolOp>, ftz: bool, exec: u32) -> Result<(), String> {
    if matches!(ty, Ty::F16x2 | Ty::Bf16x2) {
        return Err("setp on packed halves is not supported".into());
    }
    for l in lanes(exec) {
        let x = compare(cmp, ty, w.val(&inst.s[0], l), w.val(&inst.s[1], l), ftz)?;
        let c = if comb.is_some() { w.val(&inst.s[2], l) != 0 } else { false };
        w.set(inst.d[0], l, combine(comb, x, c) as u64);
        if inst.d.len() > 1 {
            w.set(inst.d[1], l, combine(comb, !x, c) as u64);
        }
    }
    Ok(())
}

pub(super) fn set(w: &mut Warp, inst: &Inst, cmp: Cmp, dty: Ty, ty: Ty, comb: Option<BoolOp>, exec: u32) -> Result<(), String> {
    for l in lanes(exec) {
        let x = compare(cmp, ty, w.val(&inst.s[0], l), w.val(&inst.s[1], l), false)?;
        let c = if comb.is_some() { w.val(&inst.s[2], l) != 0 } else { false };
        let r = combine(comb, x, c);
        let v = if dty == Ty::F32 {
            if r {
                1.0f32.to_bits() as u64
            } else {
                0
            }
        } else if r {
            dty.mask(u64::MAX)
        } else {
            0
        };
        w.set(inst.d[0], l, v);
    }
    Ok(())
}

pub(super) fn testp(w: &mut Warp, inst: &Inst, test: TestpKind, ty: Ty, exec: u32) {
    for l in lanes(exec) {
        let v = w.val(&inst.s[0], l);
        let x = if ty == Ty::F64 { f64::from_bits(v) } else { f32::from_bits(v as u32) as f64 };
        let normal = if ty == Ty::F64 { x.is_normal() } else { (x as f32).is_normal() };
        let r = match test {
            TestpKind::Finite => x.is_finite(),
            TestpKind::Infinite => x.is_infinite(),
            TestpKind::Number => !x.is_nan(),
            TestpKind::NotANumber => x.is_nan(),
            TestpKind::Normal => normal,
            TestpKind::Subnormal => x != 0.0 && x.is_finite() && !normal,
        };
        w.set(inst.d[0], l, r as u64);
    }
}

#[derive(Clone, Copy)]
pub(super) struct CvtSpec {
    pub dty: Ty,
    pub sty: Ty,
    pub rnd: Rnd,
    pub ftz: bool,
    pub sat: bool,
    pub satfinite: bool,
    pub relu: bool,
}

/// The scalar format of a float type (element format for packed types).
fn format_of(ty: Ty) -> Option<Format> {
    Some(match ty {
        Ty::F16 | Ty::F16x2 => float::F16,
        Ty::Bf16 | Ty::Bf16x2 => float::BF16,
        Ty::E4m3 | Ty::E4m3x2 => float::E4M3,
        Ty::E5m2 | Ty::E5m2x2 => float::E5M2,
        Ty::E2m1 | Ty::E2m1x2 => float::E2M1,
        Ty::F32 => float::F32,
        _ => return None,
    })
}

fn packed_elems(ty: Ty) -> u32 {
    match ty {
        Ty::F16x2 | Ty::Bf16x2 | Ty::E4m3x2 | Ty::E5m2x2 | Ty::E2m1x2 => 2,
        _ => 1,
    }
}

fn elem_bits(ty: Ty) -> u32 {
    ty.bits() / packed_elems(ty)
}

/// Reads one float element as f64 (exact).
fn read_float(ty: Ty, bits: u64, ftz: bool) -> f64 {
    match ty {
        Ty::F64 => f64::from_bits(bits),
        Ty::F32 | Ty::Tf32 => {
            let f = f32::from_bits(bits as u32);
            (if ftz { float::ftz32(f) } else { f }) as f64
        }
        _ => float::decode(bits as u32, format_of(ty).expect("float format")),
    }
}

/// Rounds a real value into a float element of `ty`.
fn write_float(ty: Ty, v: f64, c: &CvtSpec) -> u64 {
    let v = if c.relu && (v < 0.0 || (v == 0.0 && v.is_sign_negative())) { 0.0 } else { v };
    let v = if c.sat && !v.is_nan() {
        v.clamp(0.0, 1.0)
    } else if c.sat {
        0.0
    } else {
        v
    };
    let rnd = if c.rnd == Rnd::None { Rnd::Rn } else { c.rnd };
    match ty {
        Ty::F64 => v.to_bits(),
        Ty::F32 => {
            let f = float::f64_to_f32(v, rnd);
            let f = if c.satfinite && f.is_infinite() { f32::MAX.copysign(f) } else { f };
            (if c.ftz { float::ftz32(f) } else { f }).to_bits() as u64
        }
        Ty::Tf32 => (float::encode(v, float::TF32, rnd, c.satfinite) as u64) << 13,
        _ => float::encode(v, format_of(ty).expect("float format"), rnd, c.satfinite) as u64,
    }
}

fn round_integral(v: f64, rnd: Rnd) -> f64 {
    match rnd {
        Rnd::Rni | Rnd::Rn => v.round_ties_even(),
        Rnd::Rzi | Rnd::Rz => v.trunc(),
        Rnd::Rmi | Rnd::Rm => v.floor(),
        Rnd::Rpi | Rnd::Rp => v.ceil(),
        _ => v.trunc(),
    }
}

fn cvt1(c: &CvtSpec, a: u64, b: u64) -> Result<u64, String> {
    let (dty, sty) = (c.dty, c.sty);
    if dty.is_int() && sty.is_int() {
        let v: i128 = if sty.is_signed() { signed(sty, a) as i128 } else { sty.mask(a) as i128 };
        let v = if c.sat {
            let (lo, hi) = int_min_max(dty);
            v.clamp(lo, hi)
        } else {
            v
        };
        return Ok(dty.mask(v as u64));
    }
    if sty.is_int() {
        let v: i128 = if sty.is_signed() { signed(sty, a) as i128 } else { sty.mask(a) as i128 };
        let x = if dty == Ty::F64 { v as f64 } else { float::int_to_f64_for_rounding(v) };
        return Ok(write_float(dty, x, c));
    }
    if dty.is_int() {
        let x = read_float(sty, a, c.ftz);
        if x.is_nan() {
            return Ok(0);
        }
        let r = round_integral(x, c.rnd);
        let (lo, hi) = int_min_max(dty);
        let v = if r < lo as f64 {
            lo
        } else if r > hi as f64 {
            hi
        } else {
            r as i128
        };
        return Ok(dty.mask(v as u64));
    }
    // float -> float, possibly packed.
    let (dn, sn) = (packed_elems(dty), packed_elems(sty));
    let (deb, seb) = (elem_bits(dty), elem_bits(sty));
    let mut out = 0u64;
    for e in 0..dn {
        let x = if dn == sn {
            read_float(sty, if seb >= 64 { a } else { (a >> (seb * e)) & ((1u64 << seb) - 1) }, c.ftz)
        } else if dn == 2 && sn == 1 {
            // cvt.xx2.f32 d, a, b: `a` goes to the upper element, `b` to the lower.
            read_float(sty, if e == 1 { a } else { b }, c.ftz)
        } else {
            return Err(format!("cvt from {sty:?} to {dty:?} is not supported"));
        };
        let r = if dty == sty && matches!(c.rnd, Rnd::Rni | Rnd::Rzi | Rnd::Rmi | Rnd::Rpi) {
            if x.is_nan() {
                x
            } else {
                round_integral(x, c.rnd)
            }
        } else {
            x
        };
        let spec = CvtSpec { rnd: if dty == sty && matches!(c.rnd, Rnd::Rni | Rnd::Rzi | Rnd::Rmi | Rnd::Rpi) { Rnd::Rn } else { c.rnd }, ..*c };
        let bits = write_float(dty, r, &spec);
        out |= (bits & if deb >= 64 { u64::MAX } else { (1u64 << deb) - 1 }) << (deb * e);
    }
    Ok(out)
}

pub(super) fn cvt(w: &mut Warp, inst: &Inst, c: &CvtSpec, exec: u32) -> Result<(), String> {
    let d = inst.d[0];
    // Common exact widenings run without the generic path.
    match (c.dty, c.sty) {
        (Ty::F32, Ty::Bf16) => {
            for l in lanes(exec) {
                let v = (w.val(&inst.s[0], l) as u32 & 0xffff) << 16;
                w.set(d, l, v as u64);
            }
            return Ok(());
        }
        (Ty::Bf16x2, Ty::F32) | (Ty::Bf16, Ty::F32) if matches!(c.rnd, Rnd::Rn | Rnd::None) && !c.satfinite && !c.relu => {
            let two = c.dty == Ty::Bf16x2;
            for l in lanes(exec) {
                let hi = float::from_f32(f32::from_bits(w.val(&inst.s[0], l) as u32), float::BF16, Rnd::Rn, false);
                let v = if two { (hi << 16) | float::from_f32(f32::from_bits(w.val(&inst.s[1], l) as u32), float::BF16, Rnd::Rn, false) } else { hi };
                w.set(d, l, v as u64);
            }
            return Ok(());
        }
        _ => {}
    }
    let two = inst.s.len() > 1;
    for l in lanes(exec) {
        let a = w.val(&inst.s[0], l);
        let b = if two { w.val(&inst.s[1], l) } else { 0 };
        let v = cvt1(c, a, b)?;
        // Narrow signed integer results are kept sign-extended, as a register of the wider type would hold them.
        let v = if c.dty.is_signed() { signed(c.dty, v) as u64 } else { v };
        w.set(d, l, v);
    }
    Ok(())
}
