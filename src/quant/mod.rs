//! Weight formats on the CPU: bf16, FP8 e4m3 (per-tensor and 128x128 block scales), INT4 group-wise, NVFP4.

pub mod repack;
