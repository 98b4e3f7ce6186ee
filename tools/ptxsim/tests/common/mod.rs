//! Helpers for the interpreter's tests: parameter packing and typed uploads/downloads.
#![allow(dead_code)]

use ptxsim::{Machine, Module};

/// Kernel parameters packed as the `.entry` declares them (each at its natural alignment).
#[derive(Default)]
pub struct Params(pub Vec<u8>);

impl Params {
    pub fn new() -> Self {
        Params(Vec::new())
    }
    fn push(mut self, bytes: &[u8]) -> Self {
        while self.0.len() % bytes.len() != 0 {
            self.0.push(0);
        }
        self.0.extend_from_slice(bytes);
        self
    }
    pub fn ptr(self, v: u64) -> Self {
        self.push(&v.to_le_bytes())
    }
    pub fn i32(self, v: i32) -> Self {
        self.push(&v.to_le_bytes())
    }
}

pub fn snippets() -> Module {
    Module::parse(include_str!("../fixtures/snippets.ptx")).expect("snippets.ptx parses")
}

pub fn upload<T: bytemuck::Pod>(m: &mut Machine, data: &[T]) -> u64 {
    let a = m.alloc(std::mem::size_of_val(data).max(1));
    m.write(a, bytemuck::cast_slice(data)).unwrap();
    a
}

/// An output buffer poisoned with 0xff bytes (initialised, so the kernel may also read-modify-write it).
pub fn poisoned(m: &mut Machine, bytes: usize) -> u64 {
    let a = m.alloc(bytes);
    m.memset(a, 0xff, bytes).unwrap();
    a
}

pub fn download<T: bytemuck::Pod>(m: &Machine, addr: u64, n: usize) -> Vec<T> {
    let mut out = vec![T::zeroed(); n];
    m.read(addr, bytemuck::cast_slice_mut(&mut out)).unwrap();
    out
}

/// Small deterministic pseudo-random numbers (xorshift) so the tests need no RNG crate.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u32(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 16) as u32
    }
    /// Uniform in [-scale, scale).
    pub fn f32(&mut self, scale: f32) -> f32 {
        (self.next_u32() as f32 / u32::MAX as f32 * 2.0 - 1.0) * scale
    }
}

/// (significand, exponent) of `x` with the exponent clamped to `min_exp` (subnormal significands below 1); zero gets
/// exponent -999 (MMA-Sim's `extract_significand_exponent`).
pub fn extract(x: f64, min_exp: i32) -> (f64, i32) {
    if x == 0.0 {
        return (0.0, -999);
    }
    let e = (((x.abs().to_bits() >> 52) & 0x7ff) as i32 - 1023).max(min_exp);
    (x / 2f64.powi(e), e)
}

/// MMA-Sim's `nv_fused_dot_add` for Hopper (wgmma; mma.sync without split K), transliterated (f64 arithmetic, exact at these sizes): every term
/// truncated to 25 fraction bits (13 for fp8) at the largest exponent, then RZ to f32 (13 fraction bits for fp8) or
/// RNE to f16.
pub fn mma_sim_hopper(c: f64, a: &[f64], b: &[f64], fp8: bool, f16_out: bool, a_min: i32, b_min: i32) -> f64 {
    let f64_sum = c + a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    if !f64_sum.is_finite() {
        return f64_sum;
    }
    let frac = if fp8 { 13 } else { 25 };
    let mut terms = vec![extract(c, if f16_out { -14 } else { -126 })];
    for (x, y) in a.iter().zip(b) {
        let ((sa, ea), (sb, eb)) = (extract(*x, a_min), extract(*y, b_min));
        terms.push((sa * sb, ea + eb));
    }
    let max_e = terms.iter().map(|t| t.1).max().unwrap();
    let sum: f64 = terms.iter().map(|&(s, e)| (s * 2f64.powi(frac + e - max_e)).trunc() * 2f64.powi(-frac)).sum();
    let v = sum * 2f64.powi(max_e);
    if f16_out {
        let (s, e) = extract(v, -14);
        (s * 1024.0).round_ties_even() / 1024.0 * 2f64.powi(e)
    } else {
        let (s, e) = extract(v, -126);
        let p = if fp8 { 13 } else { 23 };
        (s * 2f64.powi(p)).trunc() / 2f64.powi(p) * 2f64.powi(e)
    }
}
