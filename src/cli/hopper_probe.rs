//! `small4 hopper-probe`: the interpreter's side of the Hopper probe program (tools/ptxsim/tests/fixtures/hopper.cu,
//! `ptxsim::hopper_probe`), the probe step of tools/gpu/run.sh. `simulate` writes the dumps the GPU program writes,
//! computed on the interpreter; `settle` compares a folder of dumps with the interpreter's models and prints one
//! verdict line per probe.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};

use ptxsim::hopper_probe::{self, Outcome, Verdict};

#[derive(Subcommand)]
pub enum HopperProbeCommand {
    /// Runs every probe kernel on the PTX interpreter with the GPU program's inputs and writes its dumps
    /// (hopper_gpu_*.bin) into --out, as `hopper-probe DIR` does on a GPU.
    Simulate(SimulateArgs),
    /// Compares the dumps in --dumps with the interpreter's models, bit for bit: one verdict line per probe (the
    /// arithmetic probes under both TensorArith models). Exit status 0 when every dump matches the interpreter's
    /// model, 3 when one differs, 1 when one could not be compared.
    Settle(SettleArgs),
}

#[derive(Args)]
pub struct SimulateArgs {
    /// The PTX nvcc produced for the probe program (`nvcc -ptx` of hopper.cu).
    #[arg(long)]
    ptx: PathBuf,
    /// Where the dumps go.
    #[arg(long)]
    out: PathBuf,
    /// Sum tensor-core products exactly and round once (TensorArith::ExactRoundOnce) instead of the interpreter's
    /// Hopper model (HopperTruncated): a stand-in GPU that disagrees with the model, to see a verdict differ.
    #[arg(long)]
    exact: bool,
}

#[derive(Args)]
pub struct SettleArgs {
    /// The PTX nvcc produced for the probe program.
    #[arg(long)]
    ptx: PathBuf,
    /// The folder of hopper_gpu_*.bin dumps (the GPU's, or `simulate`'s).
    #[arg(long)]
    dumps: PathBuf,
    /// Also write the verdicts as tab-separated lines (dump, question, counts, outcome, conclusion) for
    /// tools/gpu/section.py.
    #[arg(long)]
    tsv: Option<PathBuf>,
}

fn module(ptx: &Path) -> anyhow::Result<ptxsim::Module> {
    let src = std::fs::read_to_string(ptx).with_context(|| format!("reading the probe's PTX {}", ptx.display()))?;
    ptxsim::Module::parse(&src).with_context(|| format!("parsing {}", ptx.display()))
}

/// Runs `small4 hopper-probe ...`; returns the process exit status.
pub fn hopper_probe_command(command: &HopperProbeCommand) -> anyhow::Result<u8> {
    match command {
        HopperProbeCommand::Simulate(args) => {
            let arith = if args.exact { ptxsim::TensorArith::ExactRoundOnce } else { ptxsim::TensorArith::HopperTruncated };
            hopper_probe::simulate(&module(&args.ptx)?, arith, &args.out)?;
            println!(
                "hopper-probe simulate: {} dumps written to {} (the interpreter, TensorArith::{})",
                hopper_probe::Probe::ALL.len(),
                args.out.display(),
                hopper_probe::model_name(arith)
            );
            Ok(0)
        }
        HopperProbeCommand::Settle(args) => {
            let verdicts = hopper_probe::settle(&module(&args.ptx)?, &args.dumps);
            for v in &verdicts {
                println!("VERDICT {}", v.line());
            }
            if let Some(path) = &args.tsv {
                std::fs::write(path, tsv(&verdicts)).with_context(|| format!("writing {}", path.display()))?;
            }
            let count = |o: Outcome| verdicts.iter().filter(|v| v.outcome() == o).count();
            let (matches, differs, unsettled) = (count(Outcome::Matches), count(Outcome::Differs), count(Outcome::NotCompared));
            println!("hopper-probe settle: {matches} of {} dumps match the interpreter's model, {differs} differ, {unsettled} not compared", verdicts.len());
            Ok(if unsettled > 0 {
                1
            } else if differs > 0 {
                3
            } else {
                0
            })
        }
    }
}

fn tsv(verdicts: &[Verdict]) -> String {
    let clean = |s: &str| s.replace(['\t', '\n'], " ");
    verdicts
        .iter()
        .map(|v| {
            let outcome = match v.outcome() {
                Outcome::Matches => "matches",
                Outcome::Differs => "DIFFERS",
                Outcome::NotCompared => "NOT SETTLED",
            };
            format!("{}\t{}\t{}\t{outcome}\t{}\n", v.probe.file(), clean(v.probe.question()), clean(&v.counts()), clean(&v.conclusion()))
        })
        .collect()
}
