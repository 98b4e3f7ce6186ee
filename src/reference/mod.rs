//! CPU reference implementations in f32: the oracle every kernel and the whole forward pass are tested against.

pub mod attention;
pub mod fp8_gemm;
pub mod linear;
pub mod model;
pub mod moe;
pub mod norm;
pub mod rope;
pub mod sampling;
pub mod vision;
pub mod weights;
