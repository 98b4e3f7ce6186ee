//! Plan a multi-GPU layout: where the full Mistral Small 4's weights go on 2 H200s with FP8 weights (experts split
//! between the GPUs, expert parallelism; attention heads split, tensor parallelism) and how many KV-cache tokens each
//! GPU keeps room for.
//!
//! ```sh
//! cargo run --example plan            # 2x H200, FP8
//! cargo run --example plan -- 4       # 4x H100, FP8
//! ```

use small4::model::plan::{plan, FormatChoice, GpuSpec, MemoryPlan, Workload};
use small4::model::ModelConfig;
use small4::quant::WeightFormat;
use small4::{Error, Result};

/// The FP8 plan of the full model on `gpus` GPUs (2: H200s, else H100s).
pub fn fp8_plan(gpus: usize) -> Result<MemoryPlan> {
    let gpu = if gpus == 2 { GpuSpec::H200 } else { GpuSpec::H100_80GB };
    let name = format!("{gpus}x {}, FP8", gpu.name);
    plan(&ModelConfig::mistral_small_4(), &name, gpu, gpus, FormatChoice::all(WeightFormat::Fp8PerTensor), Workload::default())
}

fn main() -> Result<()> {
    let gpus = match std::env::args().nth(1) {
        Some(n) => n.parse().map_err(|_| Error::InvalidArgument(format!("{n} is not a GPU count")))?,
        None => 2,
    };
    let plan = fp8_plan(gpus)?;
    println!("{plan}");
    for gpu in &plan.gpus {
        println!(
            "GPU {}: {:.1} GiB of weights, room for {} KV-cache tokens",
            gpu.rank,
            gpu.weight_bytes() as f64 / (1u64 << 30) as f64,
            gpu.kv_capacity_tokens
        );
    }
    Ok(())
}
