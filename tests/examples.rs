//! The examples/ programs, compiled into this test (each is a module here, its `main` unused) and checked: the
//! generate example gives the tokens `small4 generate` prints, the kernel example matches the reference, the plan
//! example splits the experts over the GPUs. `cargo test` also builds them as the programs users run.

#[allow(dead_code)]
#[path = "../examples/generate.rs"]
mod generate_example;
#[allow(dead_code)]
#[path = "../examples/plan.rs"]
mod plan_example;
#[allow(dead_code)]
#[path = "../examples/run_kernel.rs"]
mod run_kernel_example;

use small4::model::generator::GenerationBackend;

/// The ids `small4 generate --prompt-ids ... --max-tokens N` prints on its default (reference) backend.
fn cli_tokens(prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_small4"))
        .args(["generate", "--prompt-ids", &ids.join(","), "--max-tokens", &max_tokens.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "small4 generate failed: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().find_map(|l| l.strip_prefix("generated:")).expect("a `generated:` line");
    line.split_whitespace().map(|t| t.parse().unwrap()).collect()
}

#[test]
fn the_generate_example_gives_the_tokens_of_the_cli() {
    let prompt = generate_example::DEFAULT_PROMPT;
    let want = cli_tokens(&prompt, 8);
    assert_eq!(want.len(), 8);
    let got = generate_example::generate_tokens(GenerationBackend::Reference, None, &prompt, 8).unwrap();
    assert_eq!(got, want);
}

#[test]
fn the_kernel_example_matches_the_reference_on_the_interpreter() {
    let weight: Vec<f32> = (0..256).map(|i| 1.0 + (i % 5) as f32 / 10.0).collect();
    let x: Vec<f32> = (0..3 * 256).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
    let (out, max_diff) = run_kernel_example::rms_norm_on(&small4::device::simulator(), &x, &weight, 1e-6).unwrap();
    assert_eq!(out.len(), x.len());
    // bf16 output: one rounding of values below ~5 is at most 2^-6.
    assert!(max_diff < 1.0 / 64.0, "max difference {max_diff}");
    assert!(out.iter().any(|&v| v != 0.0));
}

#[test]
fn the_plan_example_splits_the_experts_over_two_gpus() {
    let plan = plan_example::fp8_plan(2).unwrap();
    assert_eq!(plan.gpus.len(), 2);
    assert!(plan.fits(1), "{plan}");
    // Expert parallelism: each GPU holds part of the weights, the two together all of them.
    let one = plan_example::fp8_plan(4).unwrap();
    assert!(plan.gpus[0].weight_bytes() > one.gpus[0].weight_bytes());
}
