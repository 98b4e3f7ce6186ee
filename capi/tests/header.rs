//! include/small4.h is what cbindgen generates from capi/src/lib.rs with capi/cbindgen.toml. After changing the ABI,
//! `SMALL4_BLESS_HEADER=1 cargo test -p small4-capi --test header` rewrites it (review the diff: an incompatible
//! change needs a new SMALL4_ABI_VERSION).

use std::path::Path;

#[test]
fn the_checked_in_header_is_what_cbindgen_generates() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).unwrap();
    // Only this crate's own source declares the ABI: parsing it alone needs no `cargo metadata`.
    let bindings = cbindgen::Builder::new().with_config(config).with_src(crate_dir.join("src/lib.rs")).generate().unwrap();
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).unwrap();
    let header = crate_dir.join("../include/small4.h");
    if std::env::var("SMALL4_BLESS_HEADER").is_ok_and(|v| v == "1") {
        std::fs::write(&header, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&header).unwrap_or_default();
    assert!(
        checked_in == generated,
        "include/small4.h differs from what cbindgen generates; run SMALL4_BLESS_HEADER=1 cargo test -p small4-capi --test header and review the diff"
    );
    assert!(generated.contains(&format!("#define SMALL4_ABI_VERSION {}", small4_capi::SMALL4_ABI_VERSION)), "{generated}");
}
