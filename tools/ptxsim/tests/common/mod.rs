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
