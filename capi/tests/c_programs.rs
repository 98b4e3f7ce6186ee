//! The C programs of tests/c compiled against include/small4.h and the libraries this crate builds, run, and
//! checked: tests/c/generate.c (shared library) generates the tokens `small4 generate` prints for the same prompt;
//! tests/c/kernels.c (static library) runs kernels on its own buffers and checks them itself.

use std::path::{Path, PathBuf};
use std::process::Command;

const PROMPT: [u32; 4] = [5, 17, 300, 41];
const MAX_TOKENS: usize = 8;

/// The folder of this test's binary (target/debug/deps): cargo leaves the libraries of this crate
/// (libsmall4_capi.so / .a) there.
fn deps_dir() -> PathBuf {
    std::env::current_exe().unwrap().parent().unwrap().to_path_buf()
}

/// The profile folder (target/debug): it holds the `small4` binary that `cargo test --workspace` builds.
fn profile_dir() -> PathBuf {
    deps_dir().parent().unwrap().to_path_buf()
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Compiles `source`, then links it with `libraries` (after the source, as static linking needs), into
/// target/debug/c-tests.
fn compile_c(source: &str, output: &str, libraries: &[String]) -> PathBuf {
    let out_dir = profile_dir().join("c-tests");
    std::fs::create_dir_all(&out_dir).unwrap();
    let exe = out_dir.join(output);
    let target = env!("SMALL4_CAPI_TARGET");
    let compiler = cc::Build::new().target(target).host(target).opt_level(1).cargo_metadata(false).cargo_warnings(false).get_compiler();
    let mut command = compiler.to_command();
    command.args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-o"]).arg(&exe).arg("-I").arg(repo_root().join("include")).arg(repo_root().join(source));
    command.args(libraries);
    let result = command.output().unwrap();
    let shown: Vec<_> = std::iter::once(command.get_program()).chain(command.get_args()).map(|a| a.to_string_lossy()).collect();
    assert!(result.status.success(), "compiling {source}: {}\n{}", shown.join(" "), String::from_utf8_lossy(&result.stderr));
    exe
}

fn run(exe: &Path, args: &[String]) -> String {
    let result = Command::new(exe).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&result.stdout).to_string();
    assert!(result.status.success(), "{} {args:?} failed: {stdout}\n{}", exe.display(), String::from_utf8_lossy(&result.stderr));
    stdout
}

fn generated_ids(stdout: &str) -> Vec<u32> {
    let line = stdout.lines().find_map(|l| l.strip_prefix("generated:")).unwrap_or_else(|| panic!("no `generated:` line in {stdout}"));
    line.split_whitespace().map(|t| t.parse().unwrap()).collect()
}

/// What `small4 generate --prompt-ids ... --max-tokens ...` prints on its default (reference) backend.
fn cli_tokens() -> Vec<u32> {
    let cli = profile_dir().join(format!("small4{}", std::env::consts::EXE_SUFFIX));
    assert!(cli.exists(), "{} is missing: `cargo test --workspace` builds it (or `cargo build -p small4`)", cli.display());
    let ids: Vec<String> = PROMPT.iter().map(u32::to_string).collect();
    let stdout = run(&cli, &["generate".into(), "--prompt-ids".into(), ids.join(","), "--max-tokens".into(), MAX_TOKENS.to_string()]);
    generated_ids(&stdout)
}

fn generate_args(backend: &str, max_tokens: usize) -> Vec<String> {
    let mut args = vec![backend.to_string(), max_tokens.to_string()];
    args.extend(PROMPT.iter().map(u32::to_string));
    args
}

#[test]
fn a_c_program_generates_the_tokens_of_the_cli_through_the_shared_library() {
    let lib_dir = deps_dir();
    let libraries = vec![format!("-L{}", lib_dir.display()), "-lsmall4_capi".into(), format!("-Wl,-rpath,{}", lib_dir.display())];
    let exe = compile_c("tests/c/generate.c", "generate", &libraries);
    let want = cli_tokens();
    assert_eq!(want.len(), MAX_TOKENS);
    let stdout = run(&exe, &generate_args("reference", MAX_TOKENS));
    assert!(stdout.contains("out-of-vocabulary prompt: index out of range"), "{stdout}");
    assert_eq!(generated_ids(&stdout), want, "the C program on the reference backend vs `small4 generate`");
    // The engine's kernels on the interpreter choose the same greedy tokens (tests/engine.rs compares them with the
    // reference in depth; this is the same path through the C ABI).
    let stdout = run(&exe, &generate_args("sim", MAX_TOKENS));
    assert_eq!(generated_ids(&stdout), want, "the C program on the interpreter vs `small4 generate`");
    // The program checked that one seed gives one sequence; here, that the sequence came out whole.
    let seeded = stdout.lines().find_map(|l| l.strip_prefix("seeded:")).unwrap_or_else(|| panic!("no `seeded:` line in {stdout}"));
    assert_eq!(seeded.split_whitespace().count(), MAX_TOKENS, "{stdout}");
}

#[test]
fn a_c_program_runs_kernels_on_its_own_buffers_through_the_static_library() {
    let mut libraries = vec![deps_dir().join("libsmall4_capi.a").display().to_string()];
    // What a Rust static library needs from the system on Linux (`rustc --print native-static-libs`).
    libraries.extend(["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl", "-lc"].map(String::from));
    let exe = compile_c("tests/c/kernels.c", "kernels", &libraries);
    let stdout = run(&exe, &[]);
    assert!(stdout.contains("on the GPU:") || stdout.contains("SKIPPED the GPU run: no GPU"), "{stdout}");
    for check in [
        "ok rms_norm",
        "ok add_rms_norm",
        "ok rms_norm errors",
        "ok silu_mul",
        "ok argmax",
        "ok router topk_ids",
        "ok router topk_weights",
        "ok router errors",
        "ok moe_layer",
        "ok moe_layer errors",
        "ok moe_layer fp8",
        "ok moe_layer fp8 w8a8",
        "ok moe_layer fp8 back to bf16 activations",
        "ok moe_layer fp8_block128",
        "ok moe_layer int4 zero points",
        "ok moe_layer nvfp4",
        "ok moe_layer quantised errors",
        "ok dequant_fp8",
        "ok dequant_fp8_block128",
        "ok dequant_int4",
        "ok dequant_int4 zero points",
        "ok dequant_nvfp4",
        "ok dequant errors",
        "ok embedding_gather",
        "ok embedding_gather errors",
        "ok sample",
        "ok sample errors",
        "ok rope q",
        "ok rope k",
        "ok rope errors",
        "ok mla_cache_write",
        "ok mla_attention",
        "ok mla errors",
        "ok patch_im2col",
        "ok rope_2d q",
        "ok rope_2d k",
        "ok vision_attention",
        "ok bias_act",
        "ok patch_merge",
        "ok scatter_rows",
        "ok vision errors",
        "all kernels ok",
    ] {
        assert!(stdout.lines().any(|l| l == check), "`{check}` missing from:\n{stdout}");
    }
}
