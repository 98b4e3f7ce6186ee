//! The rustdoc of the whole workspace builds without a warning (broken intra-doc links, bad code blocks, ...): CI
//! runs only `cargo test --workspace`, so the `cargo doc` check lives here. It builds into its own target directory
//! (target/doc-check: a second cargo cannot use the directory this test run holds), reused from run to run.

use std::path::Path;
use std::process::Command;

/// `cargo doc` with warnings denied, in target/doc-check.
fn cargo_doc(args: &[&str]) {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    // This test binary lives in <target>/<profile>/deps.
    let exe = std::env::current_exe().unwrap();
    let target_dir = exe.ancestors().nth(3).unwrap_or(&manifest_dir.join("target")).join("doc-check");
    let output = Command::new(env!("CARGO"))
        .args(["doc", "--no-deps"])
        .args(args)
        .env("RUSTDOCFLAGS", "-D warnings")
        .env("CARGO_TARGET_DIR", &target_dir)
        .current_dir(manifest_dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "cargo doc {args:?} failed:\n{}", String::from_utf8_lossy(&output.stderr));
}

/// Both views of the documentation: the crate as a dependent sees it (`-p small4` alone: no `internals` feature, so a
/// public item linking to a private one fails), then the whole workspace (tools/gen turns `internals` on).
#[test]
fn the_documentation_builds_without_warnings() {
    cargo_doc(&["-p", "small4"]);
    cargo_doc(&["--workspace"]);
}
