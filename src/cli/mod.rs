//! Commands of the `small4` binary that live outside main.rs.

pub mod hopper_probe;
pub mod logits;
