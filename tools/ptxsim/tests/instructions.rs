//! Hand-written PTX for each instruction family: one kernel per instruction under test, one case per thread.
//! Each thread loads raw 64-bit inputs a, b, c, exposes them as 32-bit (%ra..), 16-bit (%ha..), f32 (%fa..),
//! f64 (%da..) and predicate (%pa.. = low 32 bits != 0) registers, runs the body, and stores %d.

mod common;

use common::*;
use half::{bf16, f16};
use ptxsim::{Machine, Module};

fn kernel(body: &str) -> String {
    format!(
        r#"
.version 8.0
.target sm_90a
.address_size 64
.visible .entry k(.param .u64 out, .param .u64 ina, .param .u64 inb, .param .u64 inc)
{{
  .reg .b64 %a, %b, %c, %d, %addr, %off;
  .reg .b32 %ra, %rb, %rc, %rd, %hi, %tid;
  .reg .b16 %ha, %hb, %hc, %hd, %hx;
  .reg .b8 %ba, %bd;
  .reg .f32 %fa, %fb, %fc, %fd;
  .reg .f64 %da, %db, %dc, %dd;
  .reg .pred %pa, %pb, %pc, %pd, %pe;
  mov.u32 %tid, %tid.x;
  mul.wide.u32 %off, %tid, 8;
  ld.param.u64 %addr, [ina];
  add.s64 %addr, %addr, %off;
  ld.global.u64 %a, [%addr];
  ld.param.u64 %addr, [inb];
  add.s64 %addr, %addr, %off;
  ld.global.u64 %b, [%addr];
  ld.param.u64 %addr, [inc];
  add.s64 %addr, %addr, %off;
  ld.global.u64 %c, [%addr];
  mov.b64 {{%ra, %hi}}, %a;
  mov.b64 {{%rb, %hi}}, %b;
  mov.b64 {{%rc, %hi}}, %c;
  mov.b32 {{%ha, %hx}}, %ra;
  mov.b32 {{%hb, %hx}}, %rb;
  mov.b32 {{%hc, %hx}}, %rc;
  mov.b32 %fa, %ra;
  mov.b32 %fb, %rb;
  mov.b32 %fc, %rc;
  mov.b64 %da, %a;
  mov.b64 %db, %b;
  mov.b64 %dc, %c;
  setp.ne.b32 %pa, %ra, 0;
  setp.ne.b32 %pb, %rb, 0;
  setp.ne.b32 %pc, %rc, 0;
  mov.b64 %d, 0;
  {body}
  ld.param.u64 %addr, [out];
  add.s64 %addr, %addr, %off;
  st.global.u64 [%addr], %d;
  ret;
}}
"#
    )
}

/// Runs `body` once per (a, b, c) case; returns each thread's %d.
fn run(body: &str, cases: &[(u64, u64, u64)]) -> Vec<u64> {
    let module = Module::parse(&kernel(body)).unwrap_or_else(|e| panic!("{body}: {e}"));
    let mut m = Machine::new();
    let col = |f: fn(&(u64, u64, u64)) -> u64| cases.iter().map(f).collect::<Vec<u64>>();
    let (a, b, c) = (upload(&mut m, &col(|x| x.0)), upload(&mut m, &col(|x| x.1)), upload(&mut m, &col(|x| x.2)));
    let out = poisoned(&mut m, cases.len() * 8);
    let p = Params::new().ptr(out).ptr(a).ptr(b).ptr(c);
    m.launch(&module, "k", [1, 1, 1], [cases.len() as u32, 1, 1], 0, &p.0).unwrap_or_else(|e| panic!("{body}: {e}"));
    download(&m, out, cases.len())
}

/// Checks a 32-bit result op over (a, b, c) -> expected cases.
fn check32(body: &str, cases: &[(u32, u32, u32, u32)]) {
    let full = format!("{body}\n  cvt.u64.u32 %d, %rd;");
    let got = run(&full, &cases.iter().map(|c| (c.0 as u64, c.1 as u64, c.2 as u64)).collect::<Vec<_>>());
    for (c, g) in cases.iter().zip(got) {
        assert_eq!(g as u32, c.3, "{body} with a={:#x} b={:#x} c={:#x}: got {:#x}, want {:#x}", c.0, c.1, c.2, g as u32, c.3);
    }
}

fn check64(body: &str, cases: &[(u64, u64, u64, u64)]) {
    let got = run(body, &cases.iter().map(|c| (c.0, c.1, c.2)).collect::<Vec<_>>());
    for (c, g) in cases.iter().zip(got) {
        assert_eq!(g, c.3, "{body} with a={:#x} b={:#x} c={:#x}: got {g:#x}, want {:#x}", c.0, c.1, c.2, c.3);
    }
}

const fn n(v: i32) -> u32 {
    v as u32
}

#[test]
fn integer_arithmetic() {
    check32("add.s32 %rd, %ra, %rb;", &[(1, 2, 0, 3), (u32::MAX, 1, 0, 0), (n(-5), 3, 0, n(-2))]);
    check32("add.sat.s32 %rd, %ra, %rb;", &[(i32::MAX as u32, 1, 0, i32::MAX as u32), (n(i32::MIN), n(-1), 0, n(i32::MIN)), (5, 6, 0, 11)]);
    check32("sub.s32 %rd, %ra, %rb;", &[(1, 2, 0, n(-1)), (0, n(i32::MIN), 0, n(i32::MIN))]);
    check32("mul.lo.s32 %rd, %ra, %rb;", &[(n(-3), 7, 0, n(-21)), (0x10000, 0x10000, 0, 0)]);
    check32("mul.hi.s32 %rd, %ra, %rb;", &[(n(-3), 7, 0, u32::MAX), (0x40000000, 8, 0, 2)]);
    check32("mul.hi.u32 %rd, %ra, %rb;", &[(u32::MAX, u32::MAX, 0, 0xffff_fffe)]);
    check32("mad.lo.s32 %rd, %ra, %rb, %rc;", &[(n(-3), 7, 100, 79)]);
    check32("div.s32 %rd, %ra, %rb;", &[(n(-7), 2, 0, n(-3)), (7, n(-2), 0, n(-3)), (n(i32::MIN), n(-1), 0, n(i32::MIN))]);
    check32("div.u32 %rd, %ra, %rb;", &[(u32::MAX, 2, 0, 0x7fff_ffff)]);
    check32("rem.s32 %rd, %ra, %rb;", &[(n(-7), 2, 0, n(-1)), (7, n(-3), 0, 1)]);
    check32("rem.u32 %rd, %ra, %rb;", &[(17, 5, 0, 2)]);
    check32("min.s32 %rd, %ra, %rb;", &[(n(-1), 1, 0, n(-1))]);
    check32("min.u32 %rd, %ra, %rb;", &[(n(-1), 1, 0, 1)]);
    check32("max.s32 %rd, %ra, %rb;", &[(n(-1), 1, 0, 1)]);
    check32("max.u32 %rd, %ra, %rb;", &[(n(-1), 1, 0, u32::MAX)]);
    check32("abs.s32 %rd, %ra;", &[(n(-9), 0, 0, 9), (n(i32::MIN), 0, 0, n(i32::MIN))]);
    check32("neg.s32 %rd, %ra;", &[(9, 0, 0, n(-9))]);
    check32("sad.u32 %rd, %ra, %rb, %rc;", &[(3, 10, 100, 107)]);
    check64("mul.wide.s32 %d, %ra, %rb;", &[(n(-3) as u64, 7, 0, (-21i64) as u64), (0x7fff_ffff, 0x7fff_ffff, 0, 0x3fff_ffff_0000_0001)]);
    check64("mul.wide.u32 %d, %ra, %rb;", &[(u32::MAX as u64, 2, 0, 0x1_ffff_fffe)]);
    check64("mad.wide.u32 %d, %ra, %rb, %c;", &[(u32::MAX as u64, 2, 5, 0x2_0000_0003)]);
    check64("mul.hi.u64 %d, %a, %b;", &[(u64::MAX, u64::MAX, 0, u64::MAX - 1)]);
    check64("mul.lo.u64 %d, %a, %b;", &[(1 << 40, 1 << 30, 0, 0), (3, 5, 0, 15)]);
    check64("add.s64 %d, %a, %b;", &[(u64::MAX, 2, 0, 1)]);
    check64("div.s64 %d, %a, %b;", &[((-9i64) as u64, 2, 0, (-4i64) as u64)]);
    check32("mul.wide.u16 %rd, %ha, %hb;", &[(0xffff, 0xffff, 0, 0xfffe_0001)]);
    check32("mul.lo.u16 %hd, %ha, %hb; cvt.u32.u16 %rd, %hd;", &[(0x1234, 0x100, 0, 0x3400)]);
}

#[test]
fn bit_operations() {
    check32("and.b32 %rd, %ra, %rb;", &[(0xf0f0, 0xff00, 0, 0xf000)]);
    check32("or.b32 %rd, %ra, %rb;", &[(0xf0f0, 0xff00, 0, 0xfff0)]);
    check32("xor.b32 %rd, %ra, %rb;", &[(0xf0f0, 0xff00, 0, 0x0ff0)]);
    check32("not.b32 %rd, %ra;", &[(0xf0f0, 0, 0, 0xffff_0f0f)]);
    check32("cnot.b32 %rd, %ra;", &[(0, 0, 0, 1), (5, 0, 0, 0)]);
    check32("shl.b32 %rd, %ra, %rb;", &[(1, 31, 0, 0x8000_0000), (1, 32, 0, 0), (3, 100, 0, 0)]);
    check32("shr.u32 %rd, %ra, %rb;", &[(0x8000_0000, 31, 0, 1), (0x8000_0000, 40, 0, 0)]);
    check32("shr.s32 %rd, %ra, %rb;", &[(0x8000_0000, 31, 0, u32::MAX), (0x8000_0000, 40, 0, u32::MAX), (0x4000_0000, 40, 0, 0)]);
    check32("bfe.u32 %rd, %ra, %rb, %rc;", &[(0xabcd_1234, 8, 12, 0xd12), (0xabcd_1234, 28, 8, 0xa), (5, 3, 0, 0)]);
    check32("bfe.s32 %rd, %ra, %rb, %rc;", &[(0xabcd_1234, 8, 12, 0xffff_fd12), (0xabcd_1234, 28, 8, 0xffff_fffa), (0x0000_0f00, 8, 4, 0xffff_ffff)]);
    check32("bfi.b32 %rd, %ra, %rb, %rc, 8;", &[(0xff, 0x1234_5678, 8, 0x1234_ff78), (0xab, 0, 28, 0xb000_0000)]);
    check32(
        "prmt.b32 %rd, %ra, %rb, %rc;",
        &[
            (0x4433_2211, 0x8877_6655, 0x3210, 0x4433_2211),
            (0x4433_2211, 0x8877_6655, 0x7654, 0x8877_6655),
            (0x4433_2211, 0x8877_6655, 0x0415, 0x1155_2266),
            (0x4433_22f1, 0x8877_6655, 0x8000, 0xfff1_f1f1),
        ],
    );
    check32("prmt.b32.f4e %rd, %ra, %rb, %rc;", &[(0x4433_2211, 0x8877_6655, 1, 0x5544_3322)]);
    check32("prmt.b32.b4e %rd, %ra, %rb, %rc;", &[(0x4433_2211, 0x8877_6655, 0, 0x6677_8811)]);
    check32("prmt.b32.rc8 %rd, %ra, %rb, %rc;", &[(0x4433_2211, 0, 2, 0x3333_3333)]);
    check32("prmt.b32.ecl %rd, %ra, %rb, %rc;", &[(0x4433_2211, 0, 1, 0x4433_2222)]);
    check32("prmt.b32.ecr %rd, %ra, %rb, %rc;", &[(0x4433_2211, 0, 1, 0x2222_2211)]);
    check32("prmt.b32.rc16 %rd, %ra, %rb, %rc;", &[(0x4433_2211, 0, 1, 0x4433_4433)]);
    check32("popc.b32 %rd, %ra;", &[(0xf0f0_0001, 0, 0, 9)]);
    check32("popc.b64 %rd, %a;", &[(0xffff_ffff, 0, 0, 32)]);
    check32("clz.b32 %rd, %ra;", &[(1, 0, 0, 31), (0, 0, 0, 32), (0x8000_0000, 0, 0, 0)]);
    check32("clz.b64 %rd, %a;", &[(1, 0, 0, 63)]);
    check32("brev.b32 %rd, %ra;", &[(1, 0, 0, 0x8000_0000), (0x0000_00f0, 0, 0, 0x0f00_0000)]);
    check32("bfind.u32 %rd, %ra;", &[(0x10, 0, 0, 4), (0, 0, 0, u32::MAX)]);
    check32("bfind.s32 %rd, %ra;", &[(n(-1), 0, 0, u32::MAX), (n(-17), 0, 0, 4)]);
    check64("shl.b64 %d, %a, %rb;", &[(1, 63, 0, 1 << 63), (1, 64, 0, 0)]);
    check64("shr.s64 %d, %a, %rb;", &[(1 << 63, 70, 0, u64::MAX)]);
    check32("dp4a.s32.s32 %rd, %ra, %rb, %rc;", &[(0x01ff_0203, 0x0102_0304, 10, (10 + 1 - 2 + 6 + 12) as u32)]);
}

#[test]
fn compare_and_select() {
    check32("setp.lt.s32 %pd, %ra, %rb; selp.u32 %rd, 7, 9, %pd;", &[(n(-1), 1, 0, 7), (1, n(-1), 0, 9)]);
    check32("setp.lo.u32 %pd, %ra, %rb; selp.u32 %rd, 7, 9, %pd;", &[(n(-1), 1, 0, 9)]);
    check32("setp.hs.u32 %pd, %ra, %rb; selp.u32 %rd, 7, 9, %pd;", &[(n(-1), 1, 0, 7)]);
    check32("setp.lt.and.s32 %pd, %ra, %rb, %pc; selp.u32 %rd, 7, 9, %pd;", &[(1, 2, 1, 7), (1, 2, 0, 9)]);
    check32("setp.lt.or.s32 %pd|%pe, %ra, %rb, %pc; selp.u32 %rd, 7, 9, %pe;", &[(1, 2, 0, 9), (3, 2, 0, 7), (3, 2, 1, 7)]);
    let nan = f32::NAN.to_bits();
    let one = 1f32.to_bits();
    check32("setp.lt.f32 %pd, %fa, %fb; selp.u32 %rd, 7, 9, %pd;", &[(nan, one, 0, 9), (0, one, 0, 7)]);
    check32("setp.ltu.f32 %pd, %fa, %fb; selp.u32 %rd, 7, 9, %pd;", &[(nan, one, 0, 7), (one, 0, 0, 9)]);
    check32("setp.nan.f32 %pd, %fa, %fb; selp.u32 %rd, 7, 9, %pd;", &[(nan, one, 0, 7), (one, one, 0, 9)]);
    check32("setp.num.f32 %pd, %fa, %fb; selp.u32 %rd, 7, 9, %pd;", &[(nan, one, 0, 9), (one, one, 0, 7)]);
    check32("setp.ne.f32 %pd, %fa, %fb; selp.u32 %rd, 7, 9, %pd;", &[(nan, nan, 0, 9)]);
    check32("setp.neu.f32 %pd, %fa, %fb; selp.u32 %rd, 7, 9, %pd;", &[(nan, nan, 0, 7)]);
    check32("slct.u32.s32 %rd, %ra, %rb, %rc;", &[(1, 2, n(-1), 2), (1, 2, 0, 1)]);
    check32("slct.u32.f32 %rd, %ra, %rb, %fc;", &[(1, 2, (-0.5f32).to_bits(), 2), (1, 2, 0.5f32.to_bits(), 1)]);
    check32("set.lt.u32.s32 %rd, %ra, %rb;", &[(1, 2, 0, u32::MAX), (2, 1, 0, 0)]);
    check32("and.pred %pd, %pa, %pb; or.pred %pe, %pd, %pc; not.pred %pe, %pe; selp.u32 %rd, 7, 9, %pe;", &[(1, 1, 0, 9), (0, 1, 0, 7), (0, 0, 1, 9)]);
    check32("xor.pred %pd, %pa, %pb; selp.u32 %rd, 7, 9, %pd;", &[(1, 1, 0, 9), (1, 0, 0, 7)]);
    check32("mov.u32 %rd, 5; @%pa mov.u32 %rd, 6; @!%pb add.u32 %rd, %rd, 10;", &[(1, 1, 0, 6), (0, 0, 0, 15), (1, 0, 0, 16)]);
}

fn f(v: f32) -> u32 {
    v.to_bits()
}

#[test]
fn float_arithmetic() {
    let nan = f32::NAN.to_bits();
    check32("add.f32 %fd, %fa, %fb; mov.b32 %rd, %fd;", &[(f(1.5), f(2.25), 0, f(3.75)), (f(1e30), f(-1e30), 0, 0)]);
    check32("sub.rn.f32 %fd, %fa, %fb; mov.b32 %rd, %fd;", &[(f(1.5), f(2.25), 0, f(-0.75))]);
    check32("mul.f32 %fd, %fa, %fb; mov.b32 %rd, %fd;", &[(f(1.5), f(-2.0), 0, f(-3.0))]);
    // fma rounds once: (1+2^-23)*(1-2^-23) + -1 = -2^-46 exactly, where a separate multiply would give 0.
    check32("fma.rn.f32 %fd, %fa, %fb, %fc; mov.b32 %rd, %fd;", &[(f(1.0 + f32::EPSILON), f(1.0 - f32::EPSILON), f(-1.0), f(-(2f32.powi(-46))))]);
    check32("mad.rn.f32 %fd, %fa, %fb, %fc; mov.b32 %rd, %fd;", &[(f(2.0), f(3.0), f(1.0), f(7.0))]);
    check32("div.rn.f32 %fd, %fa, %fb; mov.b32 %rd, %fd;", &[(f(1.0), f(3.0), 0, f(1.0 / 3.0)), (f(1.0), 0, 0, f(f32::INFINITY))]);
    check32("div.full.f32 %fd, %fa, %fb; mov.b32 %rd, %fd;", &[(f(6.0), f(3.0), 0, f(2.0))]);
    check32("rcp.rn.f32 %fd, %fa; mov.b32 %rd, %fd;", &[(f(4.0), 0, 0, f(0.25)), (f(3.0), 0, 0, f(1.0 / 3.0))]);
    check32(
        "sqrt.rn.f32 %fd, %fa; mov.b32 %rd, %fd;",
        &[(f(2.0), 0, 0, f(2f32.sqrt())), (f(-1.0), 0, 0, nan & 0xffc0_0000 | 0x0040_0000)].map(|c| {
            if c.0 == f(-1.0) {
                (c.0, c.1, c.2, f32::NAN.to_bits())
            } else {
                c
            }
        })[..1],
    );
    check32(
        "min.f32 %fd, %fa, %fb; mov.b32 %rd, %fd;",
        &[(nan, f(2.0), 0, f(2.0)), (f(-0.0), f(0.0), 0, f(-0.0)), (f(0.0), f(-0.0), 0, f(-0.0)), (f(1.0), f(-3.0), 0, f(-3.0))],
    );
    check32("max.f32 %fd, %fa, %fb; mov.b32 %rd, %fd;", &[(f(2.0), nan, 0, f(2.0)), (f(-0.0), f(0.0), 0, f(0.0)), (f(1.0), f(-3.0), 0, f(1.0))]);
    check32("abs.f32 %fd, %fa; mov.b32 %rd, %fd;", &[(f(-2.5), 0, 0, f(2.5))]);
    check32("neg.f32 %fd, %fa; mov.b32 %rd, %fd;", &[(f(2.5), 0, 0, f(-2.5))]);
    check32("add.sat.f32 %fd, %fa, %fb; mov.b32 %rd, %fd;", &[(f(0.75), f(0.5), 0, f(1.0)), (f(-0.75), f(0.5), 0, 0)]);
    // .ftz flushes a subnormal input to zero.
    check32("add.ftz.f32 %fd, %fa, %fb; mov.b32 %rd, %fd;", &[(1, 0, 0, 0)]);
    check32("add.f32 %fd, %fa, %fb; mov.b32 %rd, %fd;", &[(1, 0, 0, 1)]);
    check32("copysign.f32 %fd, %fa, %fb; mov.b32 %rd, %fd;", &[(f(-1.0), f(3.0), 0, f(-3.0))]);
    check64("add.f64 %dd, %da, %db; mov.b64 %d, %dd;", &[(0.1f64.to_bits(), 0.2f64.to_bits(), 0, (0.1f64 + 0.2).to_bits())]);
    check64("fma.rn.f64 %dd, %da, %db, %dc; mov.b64 %d, %dd;", &[(3f64.to_bits(), 0.1f64.to_bits(), 1f64.to_bits(), 3f64.mul_add(0.1, 1.0).to_bits())]);
    check64("div.rn.f64 %dd, %da, %db; mov.b64 %d, %dd;", &[(1f64.to_bits(), 3f64.to_bits(), 0, (1.0f64 / 3.0).to_bits())]);
    // Approximate functions: within the manual's stated error (checked loosely here).
    for (op, x, want) in [
        ("ex2.approx.f32", 3.5f32, 3.5f32.exp2()),
        ("lg2.approx.f32", 10.0, 10f32.log2()),
        ("rsqrt.approx.f32", 2.0, 1.0 / 2f32.sqrt()),
        ("rcp.approx.f32", 3.0, 1.0 / 3.0),
        ("sin.approx.f32", 0.5, 0.5f32.sin()),
        ("cos.approx.f32", 0.5, 0.5f32.cos()),
        ("tanh.approx.f32", 0.5, 0.5f32.tanh()),
        ("sqrt.approx.f32", 2.0, 2f32.sqrt()),
        ("ex2.approx.ftz.f32", -2.0, 0.25),
    ] {
        let got = run(&format!("{op} %fd, %fa; mov.b32 %rd, %fd; cvt.u64.u32 %d, %rd;"), &[(f(x) as u64, 0, 0)]);
        let g = f32::from_bits(got[0] as u32);
        assert!((g - want).abs() <= want.abs() * 1e-6, "{op}({x}) = {g}, want {want}");
    }
}

#[test]
fn half_precision_arithmetic() {
    let h = |v: f32| f16::from_f32(v).to_bits() as u32;
    let b = |v: f32| bf16::from_f32(v).to_bits() as u32;
    check32("add.f16 %hd, %ha, %hb; cvt.u32.u16 %rd, %hd;", &[(h(1.5), h(0.25), 0, h(1.75)), (h(65504.0), h(65504.0), 0, 0x7c00)]);
    check32("mul.rn.bf16 %hd, %ha, %hb; cvt.u32.u16 %rd, %hd;", &[(b(1.5), b(-3.0), 0, b(-4.5))]);
    check32("fma.rn.bf16 %hd, %ha, %hb, %hc; cvt.u32.u16 %rd, %hd;", &[(b(1.5), b(2.0), b(0.25), b(3.25))]);
    check32("fma.rn.f16x2 %rd, %ra, %rb, %rc;", &[(h(1.5) | h(2.0) << 16, h(2.0) | h(-1.0) << 16, h(1.0) | h(0.5) << 16, h(4.0) | h(-1.5) << 16)]);
    check32("add.rn.bf16x2 %rd, %ra, %rb;", &[(b(1.0) | b(2.0) << 16, b(0.5) | b(-4.0) << 16, 0, b(1.5) | b(-2.0) << 16)]);
    check32("max.bf16x2 %rd, %ra, %rb;", &[(b(1.0) | b(2.0) << 16, b(0.5) | b(4.0) << 16, 0, b(1.0) | b(4.0) << 16)]);
    check32("neg.bf16x2 %rd, %ra;", &[(b(1.0) | b(-2.0) << 16, 0, 0, b(-1.0) | b(2.0) << 16)]);
}

/// Rounding by brute force over every value of a small format: the independent model the interpreter is checked
/// against. `values` are (bits, value) of every finite encoding; `inf` the +infinity bits if any.
fn brute_round(x: f64, values: &[(u32, f64)], sign_bit: u32, inf: Option<u32>, mode: &str, satfinite: bool) -> u32 {
    let max = values.iter().map(|v| v.1).fold(0.0, f64::max);
    let max_bits = values.iter().find(|v| v.1 == max).unwrap().0;
    let neg = x < 0.0 || (x == 0.0 && x.is_sign_negative());
    let a = x.abs();
    let sign = if neg { sign_bit } else { 0 };
    let pos: Vec<&(u32, f64)> = values.iter().filter(|v| v.1 >= 0.0 && v.0 & sign_bit == 0).collect();
    let below = pos.iter().filter(|v| v.1 <= a).max_by(|p, q| p.1.total_cmp(&q.1)).unwrap();
    let above = pos.iter().filter(|v| v.1 >= a).min_by(|p, q| p.1.total_cmp(&q.1));
    let to_zero = |_: ()| sign | below.0;
    let away = match above {
        Some(v) => sign | v.0,
        None => {
            // Beyond the largest finite value.
            let inf = match inf {
                Some(inf) if !(satfinite || mode == "rz" || (mode == "rm" && !neg) || (mode == "rp" && neg)) => inf,
                _ => return sign | max_bits,
            };
            // IEEE: round-to-nearest overflows to infinity only from max + half an ulp on.
            let prev = pos.iter().filter(|v| v.1 < max).map(|v| v.1).fold(0.0, f64::max);
            return if mode == "rn" && a < max + (max - prev) / 2.0 { sign | max_bits } else { sign | inf };
        }
    };
    if below.1 == a {
        return sign | below.0;
    }
    match mode {
        "rz" => to_zero(()),
        "rm" => {
            if neg {
                away
            } else {
                to_zero(())
            }
        }
        "rp" => {
            if neg {
                to_zero(())
            } else {
                away
            }
        }
        _ => {
            let up = above.unwrap();
            let (dl, du) = (a - below.1, up.1 - a);
            if dl < du || (dl == du && below.0 & 1 == 0) {
                to_zero(())
            } else {
                away
            }
        }
    }
}

fn all_values(bits: u32, decode: impl Fn(u32) -> f64) -> Vec<(u32, f64)> {
    (0..1u32 << bits).map(|b| (b, decode(b))).filter(|v| v.1.is_finite()).collect()
}

fn e5m2_value(b: u32) -> f64 {
    f16::from_bits((b as u16) << 8).to_f64()
}

fn e4m3_value(b: u32) -> f64 {
    if b & 0x7f == 0x7f {
        return f64::NAN;
    }
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((b >> 3) & 0xf) as i32;
    let man = (b & 7) as f64;
    sign * if e == 0 { man / 8.0 * 2f64.powi(-6) } else { (1.0 + man / 8.0) * 2f64.powi(e - 7) }
}

fn e2m1_value(b: u32) -> f64 {
    let v = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0][(b & 7) as usize];
    if b & 8 != 0 {
        -v
    } else {
        v
    }
}

/// Inputs that exercise every rounding path of a format with values around `scale`.
fn rounding_inputs(rng: &mut Rng, scale: f32) -> Vec<f32> {
    let mut v = vec![0.0, -0.0, 1.0, -1.0, scale, -scale, scale * 1.5, scale * 100.0, -scale * 100.0, 1e-7, -1e-7, 1e-30, 3.0e38];
    // Exact ties and near-ties of f16/bf16 around 1.
    v.extend([1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), 1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), 1.0 + 2f32.powi(-8) + 2f32.powi(-20)]);
    v.extend((0..200).map(|_| rng.f32(scale)));
    v.extend((0..50).map(|_| rng.f32(scale / 1000.0)));
    v
}

#[test]
fn cvt_rounding_to_f16_bf16_matches_brute_force() {
    let mut rng = Rng(99);
    let f16s = all_values(16, |b| f16::from_bits(b as u16).to_f64());
    let bf16s = all_values(16, |b| bf16::from_bits(b as u16).to_f64());
    for mode in ["rn", "rz", "rm", "rp"] {
        for (ty, values, inf, scale) in [("f16", &f16s, 0x7c00u32, 60000.0f32), ("bf16", &bf16s, 0x7f80, 1e30)] {
            let inputs = rounding_inputs(&mut rng, scale);
            let got =
                run(&format!("cvt.{mode}.{ty}.f32 %hd, %fa; cvt.u64.u16 %d, %hd;"), &inputs.iter().map(|x| (x.to_bits() as u64, 0, 0)).collect::<Vec<_>>());
            for (x, g) in inputs.iter().zip(got) {
                let want = brute_round(*x as f64, values, 0x8000, Some(inf), mode, false);
                assert_eq!(g as u32, want, "cvt.{mode}.{ty}.f32 of {x:e}: got {g:#x}, want {want:#x}");
            }
        }
    }
    // NaN -> canonical NaN; satfinite clamps.
    check32("cvt.rn.bf16.f32 %hd, %fa; cvt.u32.u16 %rd, %hd;", &[(f32::NAN.to_bits(), 0, 0, 0x7fff)]);
    check32("cvt.rn.satfinite.bf16.f32 %hd, %fa; cvt.u32.u16 %rd, %hd;", &[(f(f32::INFINITY), 0, 0, 0x7f7f)]);
    check32("cvt.rn.relu.bf16.f32 %hd, %fa; cvt.u32.u16 %rd, %hd;", &[(f(-3.0), 0, 0, 0)]);
    check32("cvt.rn.bf16x2.f32 %rd, %fa, %fb;", &[(f(1.0), f(-2.0), 0, 0x3f80_c000)]);
    check32("cvt.rz.f16x2.f32 %rd, %fa, %fb;", &[(f(1.0), f(1.0 + 2f32.powi(-11) * 1.5), 0, 0x3c00_3c00)]);
}

#[test]
fn cvt_rounding_to_fp8_fp4_matches_brute_force() {
    let mut rng = Rng(5);
    let e4 = all_values(8, e4m3_value);
    let e5 = all_values(8, e5m2_value);
    let e2 = all_values(4, e2m1_value);
    for (ty, values, inf, scale) in [("e4m3x2", &e4, None, 448.0f32), ("e5m2x2", &e5, Some(0x7cu32), 57344.0)] {
        let inputs = rounding_inputs(&mut rng, scale);
        let pairs: Vec<(u64, u64, u64)> = inputs.chunks(2).filter(|c| c.len() == 2).map(|c| (c[0].to_bits() as u64, c[1].to_bits() as u64, 0)).collect();
        let got = run(&format!("cvt.rn.satfinite.{ty}.f32 %hd, %fa, %fb; cvt.u64.u16 %d, %hd;"), &pairs);
        for (p, g) in pairs.iter().zip(got) {
            let (x, y) = (f32::from_bits(p.0 as u32), f32::from_bits(p.1 as u32));
            let want = brute_round(x as f64, values, 0x80, inf, "rn", true) << 8 | brute_round(y as f64, values, 0x80, inf, "rn", true);
            assert_eq!(g as u32, want, "cvt.rn.satfinite.{ty}.f32 of ({x:e}, {y:e})");
        }
        // And back: f16x2 from the packed pair is exact.
        let bytes: Vec<(u64, u64, u64)> = (0..256u64).step_by(3).map(|b| (b | ((255 - b) << 8), 0, 0)).collect();
        let got = run(&format!("cvt.rn.f16x2.{ty} %rd, %ha; cvt.u64.u32 %d, %rd;"), &bytes);
        let dec = if ty == "e4m3x2" { e4m3_value } else { e5m2_value };
        for (bb, g) in bytes.iter().zip(got) {
            for k in 0..2 {
                let v = dec(((bb.0 >> (8 * k)) & 0xff) as u32);
                let h = f16::from_bits((g >> (16 * k)) as u16).to_f64();
                assert!(h == v || (h.is_nan() && v.is_nan()), "{ty} byte {:#x} -> f16 {h}, want {v}", (bb.0 >> (8 * k)) & 0xff);
            }
        }
    }
    let inputs = rounding_inputs(&mut rng, 6.0);
    let pairs: Vec<(u64, u64, u64)> = inputs.chunks(2).filter(|c| c.len() == 2).map(|c| (c[0].to_bits() as u64, c[1].to_bits() as u64, 0)).collect();
    let got = run("cvt.rn.satfinite.e2m1x2.f32 %bd, %fa, %fb; cvt.u64.u8 %d, %bd;", &pairs);
    for (p, g) in pairs.iter().zip(got) {
        let (x, y) = (f32::from_bits(p.0 as u32), f32::from_bits(p.1 as u32));
        let want = brute_round(x as f64, &e2, 8, None, "rn", true) << 4 | brute_round(y as f64, &e2, 8, None, "rn", true);
        assert_eq!(g as u32, want, "cvt.rn.satfinite.e2m1x2.f32 of ({x}, {y})");
    }
    let got = run("cvt.u8.u32 %ba, %ra; cvt.rn.f16x2.e2m1x2 %rd, %ba; cvt.u64.u32 %d, %rd;", &(0..256u64).map(|b| (b, 0, 0)).collect::<Vec<_>>());
    for (b, g) in got.iter().enumerate() {
        for k in 0..2 {
            assert_eq!(f16::from_bits((g >> (16 * k)) as u16).to_f64(), e2m1_value((b as u32 >> (4 * k)) & 0xf), "e2m1 byte {b:#x}");
        }
    }
}

#[test]
fn cvt_between_integers_and_floats() {
    check32(
        "cvt.rn.f32.s32 %fd, %ra; mov.b32 %rd, %fd;",
        &[(n(-3), 0, 0, f(-3.0)), (0x7fff_ffff, 0, 0, f(2147483648.0)), (16777217, 0, 0, f(16777216.0)), (16777219, 0, 0, f(16777220.0))],
    );
    check32("cvt.rz.f32.u32 %fd, %ra; mov.b32 %rd, %fd;", &[(u32::MAX, 0, 0, f(4294967040.0))]);
    check32("cvt.rp.f32.u32 %fd, %ra; mov.b32 %rd, %fd;", &[(16777217, 0, 0, f(16777218.0))]);
    check64(
        "cvt.rn.f32.u64 %fd, %a; mov.b32 %rd, %fd; cvt.u64.u32 %d, %rd;",
        &[
            ((1u64 << 60) + (1 << 36) + 1, 0, 0, ((1u64 << 60) as f32).to_bits() as u64 + 1),
            ((1u64 << 60) + (1 << 36), 0, 0, ((1u64 << 60) as f32).to_bits() as u64),
        ],
    );
    check32(
        "cvt.rzi.s32.f32 %rd, %fa;",
        &[(f(-2.7), 0, 0, n(-2)), (f(3e9), 0, 0, i32::MAX as u32), (f(-3e9), 0, 0, n(i32::MIN)), (f32::NAN.to_bits(), 0, 0, 0)],
    );
    check32("cvt.rni.s32.f32 %rd, %fa;", &[(f(2.5), 0, 0, 2), (f(3.5), 0, 0, 4), (f(-2.5), 0, 0, n(-2))]);
    check32("cvt.rmi.s32.f32 %rd, %fa;", &[(f(-2.1), 0, 0, n(-3))]);
    check32("cvt.rpi.u32.f32 %rd, %fa;", &[(f(2.1), 0, 0, 3), (f(-5.0), 0, 0, 0)]);
    check64("cvt.rzi.s64.f64 %d, %da;", &[((-1e19f64).to_bits(), 0, 0, i64::MIN as u64), (7.9f64.to_bits(), 0, 0, 7)]);
    check32("cvt.sat.u8.s32 %rd, %ra;", &[(300, 0, 0, 255), (n(-4), 0, 0, 0), (17, 0, 0, 17)]);
    check32("cvt.s32.s8 %rd, %ra;", &[(0x80, 0, 0, n(-128))]);
    check32("cvt.u16.u32 %hd, %ra; cvt.u32.u16 %rd, %hd;", &[(0x12345, 0, 0, 0x2345)]);
    check64("cvt.s64.s32 %d, %ra;", &[(n(-2) as u64, 0, 0, (-2i64) as u64)]);
    check64("cvt.u64.u32 %d, %ra;", &[(n(-2) as u64, 0, 0, 0xffff_fffe)]);
    check32("cvt.f32.f16 %fd, %ha; mov.b32 %rd, %fd;", &[(0x3c00, 0, 0, f(1.0)), (0x0001, 0, 0, f(2f32.powi(-24)))]);
    check32("cvt.f32.bf16 %fd, %ha; mov.b32 %rd, %fd;", &[(0xc040, 0, 0, f(-3.0))]);
    check64("cvt.f64.f32 %dd, %fa; mov.b64 %d, %dd;", &[(f(0.1) as u64, 0, 0, (0.1f32 as f64).to_bits())]);
    check32("cvt.rn.f32.f64 %fd, %da; mov.b32 %rd, %fd;", &[(0, 0, 0, 0)]);
    check64("cvt.rn.f32.f64 %fd, %da; mov.b32 %rd, %fd; cvt.u64.u32 %d, %rd;", &[(0.1f64.to_bits(), 0, 0, f(0.1) as u64)]);
    check64("cvt.rz.f32.f64 %fd, %da; mov.b32 %rd, %fd; cvt.u64.u32 %d, %rd;", &[((1.0f64 + 2f64.powi(-24) * 1.5).to_bits(), 0, 0, f(1.0) as u64)]);
    check32("cvt.rni.f32.f32 %fd, %fa; mov.b32 %rd, %fd;", &[(f(2.5), 0, 0, f(2.0)), (f(-0.4), 0, 0, f(-0.0))]);
    check32("cvt.rmi.f32.f32 %fd, %fa; mov.b32 %rd, %fd;", &[(f(-2.5), 0, 0, f(-3.0))]);
    check32("cvt.sat.f32.f32 %fd, %fa; mov.b32 %rd, %fd;", &[(f(2.5), 0, 0, f(1.0)), (f(-1.0), 0, 0, 0)]);
    check32("cvt.rna.tf32.f32 %rd, %fa;", &[(f(1.0 + 2f32.powi(-11)), 0, 0, f(1.0 + 2f32.powi(-10))), (f(1.0 + 2f32.powi(-12)), 0, 0, f(1.0))]);
}

#[test]
fn memory_forms_and_state_spaces() {
    // Shared v2/v4 round trip, local, param reads through a generic pointer, cache hints and cvta.
    let body = r#"
  .shared .align 16 .b8 sm[64];
  .local .align 8 .b8 lm[16];
  .reg .b64 %s, %g, %pol, %lp;
  .reg .b32 %x<4>;
  mov.u64 %s, sm;
  add.s64 %s, %s, %off;
  add.s64 %s, %s, %off;
  st.shared.v4.u32 [%s], {%ra, %rb, %rc, %ra};
  ld.shared.v2.u32 {%x0, %x1}, [%s+8];
  cvta.shared.u64 %g, %s;
  ld.v4.u32 {%x0, %x1, %x2, %x3}, [%g];
  mov.u64 %lp, lm;
  st.local.v2.u32 [%lp], {%x1, %x2};
  ld.local.u32 %x3, [%lp+4];
  createpolicy.fractional.L2::evict_last.b64 %pol, 1.0;
  ld.param.u64 %g, [ina];
  add.s64 %g, %g, %off;
  ld.global.nc.L1::no_allocate.L2::cache_hint.u32 %x0, [%g], %pol;
  ldu.global.u32 %x2, [%g];
  add.u32 %rd, %x3, %x0;
  add.u32 %rd, %rd, %x2;
  cvt.u64.u32 %d, %rd;
  "#;
    // x3 = c (local), x0 = x2 = low 32 bits of a.
    let got = run(body, &[(5, 6, 7), (100, 0, 1)]);
    assert_eq!(got, vec![7 + 10, 1 + 200]);
}

#[test]
fn atomics_and_reductions_on_global_and_shared() {
    // Each thread: shared add of b, shared max of b, global f32 add of a into cells[0], and a CAS of cells[1] from
    // 77 to 100 + tid (exactly one thread can win). %d = (shared sum after the barrier, old value seen by the CAS).
    let body = r#"
  .shared .align 8 .b8 cell[8];
  .reg .b64 %p, %s;
  .reg .b32 %old, %x, %new;
  ld.param.u64 %p, [inc];
  mov.u64 %s, cell;
  setp.eq.u32 %pd, %tid, 0;
  @%pd st.shared.v2.u32 [%s], {0, -5};
  bar.sync 0;
  atom.shared.add.u32 %old, [%s], %rb;
  red.shared.max.s32 [%s+4], %rb;
  red.global.add.f32 [%p+320], %fa;
  add.u32 %new, %tid, 100;
  atom.global.cas.b32 %old, [%p+324], 77, %new;
  bar.sync 0;
  ld.shared.v2.u32 {%x, %hi}, [%s];
  add.u32 %x, %x, %hi;
  mov.b64 %d, {%x, %old};
  "#;
    let module = Module::parse(&kernel(body)).unwrap();
    let mut m = Machine::new();
    let threads = 40usize;
    let a: Vec<u64> = (0..threads).map(|i| (i as f32 * 0.25).to_bits() as u64).collect();
    let b: Vec<u64> = (0..threads as u64).map(|i| i + 1).collect();
    // inc: 40 unused c inputs, then the two global cells (f32 sum = 0.5, CAS word = 77).
    let mut inc = vec![0u64; threads + 1];
    inc[threads] = 0.5f32.to_bits() as u64 | 77 << 32;
    let (ad, bd, cd) = (upload(&mut m, &a), upload(&mut m, &b), upload(&mut m, &inc));
    let out = poisoned(&mut m, threads * 8);
    m.launch(&module, "k", [1, 1, 1], [threads as u32, 1, 1], 0, &Params::new().ptr(out).ptr(ad).ptr(bd).ptr(cd).0).unwrap();
    let got = download::<u64>(&m, out, threads);
    let shared_sum = (1..=threads as u32).sum::<u32>() + threads as u32; // sum of b, plus max(b) = 40
    assert!(got.iter().all(|&g| g as u32 == shared_sum), "{got:?}");
    let winners: Vec<usize> = (0..threads).filter(|&t| (got[t] >> 32) as u32 == 77).collect();
    assert_eq!(winners.len(), 1);
    let cells = download::<u32>(&m, cd + threads as u64 * 8, 2);
    assert_eq!(f32::from_bits(cells[0]), 0.5 + (0..threads).map(|i| i as f32 * 0.25).sum::<f32>());
    assert_eq!(cells[1], 100 + winners[0] as u32);
    assert!(got.iter().enumerate().all(|(t, &g)| t == winners[0] || (g >> 32) as u32 == cells[1]));
}

#[test]
fn divergence_reconverges_and_barriers_count_arrivals() {
    // Lanes take different paths through a loop whose trip count depends on the lane; all meet at the shuffle.
    let body = r#"
  .reg .b32 %i, %acc, %s;
  mov.u32 %acc, 0;
  mov.u32 %i, 0;
LOOP:
  setp.ge.u32 %pd, %i, %ra;
  @%pd bra DONE;
  add.u32 %acc, %acc, %i;
  setp.eq.u32 %pe, %i, 2;
  @%pe bra SKIP;
  add.u32 %acc, %acc, 100;
SKIP:
  add.u32 %i, %i, 1;
  bra.uni LOOP;
DONE:
  shfl.sync.bfly.b32 %s, %acc, 1, 31, -1;
  bar.red.popc.u32 %rd, 0, %pa;
  mov.b64 %d, {%acc, %s};
  add.u32 %rd, %rd, 0;
  "#;
    let cases: Vec<(u64, u64, u64)> = (0..64u64).map(|t| (t % 7, 0, 0)).collect();
    let got = run(body, &cases);
    let acc = |k: u64| (0..k).map(|i| i + if i == 2 { 0 } else { 100 }).sum::<u64>();
    for t in 0..64u64 {
        assert_eq!(got[t as usize], acc(t % 7) | acc((t ^ 1) % 7) << 32, "thread {t}");
    }
}

#[test]
fn unsupported_instruction_names_itself_and_its_line() {
    let src = kernel("tensormap.replace.tile.global_address.shared::cta.b1024.b64 [%addr], %a;");
    let module = Module::parse(&src).unwrap();
    let mut m = Machine::new();
    let buf = upload(&mut m, &[0u64; 1]);
    let e = m.launch(&module, "k", [1, 1, 1], [1, 1, 1], 0, &Params::new().ptr(buf).ptr(buf).ptr(buf).ptr(buf).0).unwrap_err();
    let line = src.lines().position(|l| l.contains("tensormap")).unwrap() as u32 + 1;
    assert!(e.message.contains("unsupported instruction tensormap.replace.tile.global_address.shared::cta.b1024.b64"), "{e}");
    assert_eq!(e.site.unwrap().line, line);
}

#[test]
fn inline_asm_scopes_shadow_registers() {
    check32("mov.u32 %rd, 1; { .reg .b32 %rd; mov.u32 %rd, 5; } add.u32 %rd, %rd, %ra;", &[(10, 0, 0, 11)]);
}

#[test]
fn lop3_funnel_shifts_testp_and_elect() {
    // 0x96 = a ^ b ^ c; 0xe8 = majority(a, b, c).
    check32("lop3.b32 %rd, %ra, %rb, %rc, 0x96;", &[(0xff00_ff00, 0xf0f0_f0f0, 0xcccc_cccc, 0xff00_ff00 ^ 0xf0f0_f0f0 ^ 0xcccc_cccc)]);
    check32("lop3.b32 %rd, %ra, %rb, %rc, 0xe8;", &[(0b1100, 0b1010, 0b0110, 0b1110)]);
    check32("shf.l.wrap.b32 %rd, %ra, %rb, %rc;", &[(0x8000_0001, 0x1234_5678, 4, 0x2345_6788), (0x8000_0001, 0x1234_5678, 36, 0x2345_6788)]);
    check32("shf.r.clamp.b32 %rd, %ra, %rb, %rc;", &[(0x8000_0001, 0x1234_5678, 4, 0x8800_0000), (0x8000_0001, 0x1234_5678, 40, 0x1234_5678)]);
    check32("testp.finite.f32 %pd, %fa; selp.u32 %rd, 1, 0, %pd;", &[(f(1.0), 0, 0, 1), (f(f32::INFINITY), 0, 0, 0), (f32::NAN.to_bits(), 0, 0, 0)]);
    check32("testp.subnormal.f32 %pd, %fa; selp.u32 %rd, 1, 0, %pd;", &[(1, 0, 0, 1), (f(1.0), 0, 0, 0)]);
    let got = run("elect.sync %rd|%pd, -1; selp.u32 %hi, 100, 0, %pd; add.u32 %rd, %rd, %hi; cvt.u64.u32 %d, %rd;", &[(0, 0, 0); 32]);
    assert_eq!(got[0], 100);
    assert!(got[1..].iter().all(|&g| g == 0));
}

fn run_result(body: &str, cases: &[(u64, u64, u64)]) -> Result<Vec<u64>, ptxsim::SimError> {
    let module = Module::parse(&kernel(body)).unwrap();
    let mut m = Machine::new();
    let col = |f: fn(&(u64, u64, u64)) -> u64| cases.iter().map(f).collect::<Vec<u64>>();
    let (a, b, c) = (upload(&mut m, &col(|x| x.0)), upload(&mut m, &col(|x| x.1)), upload(&mut m, &col(|x| x.2)));
    let out = poisoned(&mut m, cases.len() * 8);
    m.launch(&module, "k", [1, 1, 1], [cases.len() as u32, 1, 1], 0, &Params::new().ptr(out).ptr(a).ptr(b).ptr(c).0)?;
    Ok(download(&m, out, cases.len()))
}

#[test]
fn race_detector_orders_lanes_of_a_warp_by_syncwarp() {
    // Every lane stores its id, then reads its neighbour's; %pa says whether a __syncwarp separates the two.
    let body = r#"
  .shared .align 4 .b8 s[128];
  .reg .b64 %sa, %sb;
  .reg .b32 %v, %nb;
  mov.u64 %sa, s;
  mul.wide.u32 %sb, %tid, 4;
  add.s64 %sb, %sa, %sb;
  st.shared.u32 [%sb], %tid;
  @%pa bar.warp.sync -1;
  add.u32 %nb, %tid, 1;
  and.b32 %nb, %nb, 31;
  mul.wide.u32 %sb, %nb, 4;
  add.s64 %sb, %sa, %sb;
  ld.shared.u32 %v, [%sb];
  cvt.u64.u32 %d, %v;
  "#;
    let got = run_result(body, &[(1, 0, 0); 32]).unwrap();
    assert_eq!(got, (0..32u64).map(|t| (t + 1) % 32).collect::<Vec<_>>());
    let e = run_result(body, &[(0, 0, 0); 32]).unwrap_err();
    assert!(e.message.contains("shared-memory race") && e.message.contains("thread (1, 0, 0) wrote"), "{e}");
    // Atomics on one word from every lane are not races.
    let atomic = r#"
  .shared .align 4 .b8 s[4];
  .reg .b32 %v;
  setp.eq.u32 %pd, %tid, 0;
  @%pd st.shared.u32 [s], 0;
  bar.sync 0;
  atom.shared.add.u32 %v, [s], 1;
  bar.sync 0;
  ld.shared.u32 %v, [s];
  cvt.u64.u32 %d, %v;
  "#;
    assert_eq!(run_result(atomic, &[(0, 0, 0); 64]).unwrap(), vec![64; 64]);
}

#[test]
fn barrier_deadlock_and_divergent_shuffle_are_errors() {
    // Only even threads reach the barrier while odd ones wait at a second one: neither can complete.
    let deadlock = r#"
  and.b32 %hi, %tid, 1;
  setp.eq.u32 %pd, %hi, 0;
  @%pd bra EVEN;
  bar.sync 1;
  bra.uni END;
EVEN:
  bar.sync 0;
END:
  "#;
    let e = run_result(deadlock, &[(0, 0, 0); 64]).unwrap_err();
    assert!(e.message.contains("deadlock"), "{e}");
    let divergent = r#"
  setp.lt.u32 %pd, %tid, 16;
  @%pd bra SKIP;
  shfl.sync.bfly.b32 %rd, %tid, 1, 31, -1;
SKIP:
  "#;
    let e = run_result(divergent, &[(0, 0, 0); 32]).unwrap_err();
    assert!(e.message.contains("member mask 0xffffffff") && e.message.contains("0xffff0000"), "{e}");
}

#[test]
fn named_barriers_complete_at_their_thread_count() {
    // Warp 0 produces into shared memory and arrives at a barrier without waiting; warp 1 waits there, then reads.
    // Round r uses barrier 1 + r (re-arriving at a barrier before its phase completes would complete it early,
    // on hardware as here).
    let body = r#"
  .shared .align 4 .b8 s[256];
  .reg .b64 %sa;
  .reg .b32 %lane, %v, %round, %bid;
  mov.u64 %sa, s;
  and.b32 %lane, %tid, 31;
  mul.wide.u32 %off, %lane, 4;
  add.s64 %sa, %sa, %off;
  setp.lt.u32 %pd, %tid, 32;
  mov.u32 %round, 0;
  mov.u32 %rd, 0;
ROUND:
  @!%pd bra CONSUME;
  mad.lo.u32 %v, %round, 1000, %tid;
  mul.wide.u32 %off, %round, 128;
  add.s64 %off, %sa, %off;
  st.shared.u32 [%off], %v;
  add.u32 %bid, %round, 1;
  bar.arrive %bid, 64;
  bra.uni NEXT;
CONSUME:
  add.u32 %bid, %round, 1;
  bar.sync %bid, 64;
  mul.wide.u32 %off, %round, 128;
  add.s64 %off, %sa, %off;
  ld.shared.u32 %v, [%off];
  add.u32 %rd, %rd, %v;
NEXT:
  add.u32 %round, %round, 1;
  setp.lt.u32 %pe, %round, 2;
  @%pe bra ROUND;
  cvt.u64.u32 %d, %rd;
  mul.wide.u32 %off, %tid, 8;
  "#;
    let got = run_result(body, &[(0, 0, 0); 64]).unwrap();
    for t in 0..64u64 {
        let want = if t < 32 { 0 } else { (t - 32) + (1000 + t - 32) };
        assert_eq!(got[t as usize], want, "thread {t}");
    }
}
