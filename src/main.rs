//! The `small4` command line.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "small4", version, about = "Mistral Small 4 on Hopper GPUs: kernels, reference and engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print what ptxas reported for every kernel (registers, shared memory, spills) for sm_90a.
    Resources,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Resources => print!("{}", small4::kernels::KERNEL_RESOURCES_MARKDOWN),
    }
    Ok(())
}
