//! The rustdoc of the whole workspace builds without a warning (broken intra-doc links, bad code blocks, ...): CI
//! runs only `cargo test --workspace`, so the `cargo doc` check lives here. It builds into its own target directory
//! (target/doc-check: a second cargo cannot use the directory this test run holds), reused from run to run.

use std::path::Path;
use std::process::Command;

#[test]
fn the_documentation_builds_without_warnings() {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    // This test binary lives in <target>/<profile>/deps.
    let exe = std::env::current_exe().unwrap();
    let target_dir = exe.ancestors().nth(3).unwrap_or(&manifest_dir.join("target")).join("doc-check");
    let output = Command::new(env!("CARGO"))
        .args(["doc", "--no-deps", "--workspace"])
        .env("RUSTDOCFLAGS", "-D warnings")
        .env("CARGO_TARGET_DIR", &target_dir)
        .current_dir(manifest_dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "cargo doc failed:\n{}", String::from_utf8_lossy(&output.stderr));
}
