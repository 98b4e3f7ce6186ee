//! Passes the target triple to the tests, which compile C programs for it with the `cc` crate.
fn main() {
    println!("cargo:rustc-env=SMALL4_CAPI_TARGET={}", std::env::var("TARGET").unwrap());
}
