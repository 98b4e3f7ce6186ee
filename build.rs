//! Build script: provisions the CUDA toolchain when none is installed, compiles every `cuda/*.cu` to PTX and to an
//! sm_90a cubin (ptxas with spills as errors), writes the per-kernel resource table, embeds PTX and cubins as
//! constants, and turns `cuda/include/params.h` into Rust types with bindgen.
//!
//! Toolchain search order: `$NVCC`, `$CUDA_HOME/bin/nvcc`, `nvcc` on `PATH`, then the project-local toolchain directory
//! (`$SMALL4_TOOLCHAIN_DIR`, default `<crate>/.toolchain`). When none is found the pinned PyPI wheels of
//! `shared/KERNELS.md` are installed there with pip; `SMALL4_OFFLINE=1` turns that into an error instead. The SASS
//! tools of tests/sass.rs (cuobjdump, nvdisasm) are found beside nvcc or installed the same way into
//! `<toolchain>/sass-tools`, also for an existing toolchain.

use std::collections::BTreeMap;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The pinned wheels: (distribution, version). Installed with `pip install --no-deps --target`.
const CUDA_WHEELS: &[(&str, &str)] = &[
    ("nvidia-cuda-nvcc", "13.5.37"),
    ("nvidia-nvvm", "13.5.37"),
    ("nvidia-cuda-crt", "13.5.37"),
    ("nvidia-cuda-runtime", "13.5.37"),
    ("nvidia-cuda-cccl", "13.3.5.0.6"),
];
const LIBCLANG_WHEEL: (&str, &str) = ("libclang", "18.1.1");
/// The SASS tools of the kernel checks (tests/sass.rs): `cuobjdump -sass`, which runs `nvdisasm`. Installed into
/// `<toolchain>/sass-tools`, also beside an existing toolchain that lacks them.
const SASS_WHEELS: &[(&str, &str)] = &[("nvidia-cuda-cuobjdump", "13.5.37"), ("nvidia-cuda-nvdisasm", "13.5.37")];
/// The wheel that ships the test vocabulary `tekken_240911.json` (SPEC-tokenizer.md section 7), and its checksum.
const MISTRAL_COMMON_WHEEL: (&str, &str) = ("mistral-common", "1.13.1");
const TEKKEN_240911_PATH: &str = "mistral_common/data/tekken_240911.json";
const TEKKEN_240911_SHA256: &str = "1948e2d48b0e7377f1bb5f1210f1ae5f984934e75713fc07e2452729b8365316";

/// The code every kernel is built for: Hopper with its arch-specific instructions.
const GPU_ARCH: &str = "sm_90a";
const PTX_ARCH: &str = "compute_90a";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    for var in ["NVCC", "CUDA_HOME", "SMALL4_TOOLCHAIN_DIR", "SMALL4_OFFLINE", "LIBCLANG_PATH", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cuda");

    let toolchain_dir = env::var_os("SMALL4_TOOLCHAIN_DIR").map(PathBuf::from).unwrap_or_else(|| manifest_dir.join(".toolchain"));
    let toolchain = Toolchain::find_or_provision(&toolchain_dir);
    provision_tekken_240911(&toolchain_dir, &out_dir);
    provision_sass_tools(&toolchain, &toolchain_dir);

    let cuda_dir = manifest_dir.join("cuda");
    let include_dir = cuda_dir.join("include");
    let mut sources: Vec<PathBuf> =
        fs::read_dir(&cuda_dir).expect("cuda/ directory").map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "cu")).collect();
    sources.sort();
    for entry in fs::read_dir(&include_dir).expect("cuda/include directory") {
        println!("cargo:rerun-if-changed={}", entry.unwrap().path().display());
    }

    // Compile the families in parallel: each nvcc run is single-threaded and takes about a second.
    let results: Vec<CompiledModule> = std::thread::scope(|scope| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| {
                println!("cargo:rerun-if-changed={}", src.display());
                let (toolchain, include_dir, out_dir) = (&toolchain, &include_dir, &out_dir);
                scope.spawn(move || toolchain.compile(src, include_dir, out_dir))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    write_kernel_constants(&results, &out_dir);
    write_resource_table(&results, &out_dir);
    generate_param_bindings(&toolchain, &include_dir, &out_dir);
}

struct Toolchain {
    nvcc: PathBuf,
    /// Extra include directories (the wheels split the CUDA headers over several folders).
    includes: Vec<PathBuf>,
    libclang_dir: Option<PathBuf>,
}

impl Toolchain {
    fn find_or_provision(toolchain_dir: &Path) -> Toolchain {
        let wheel_root = toolchain_dir.join("cuda").join("nvidia").join("cu13");
        let wheel_nvcc = wheel_root.join("bin").join("nvcc");
        let found = env::var_os("NVCC")
            .map(PathBuf::from)
            .or_else(|| env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin").join("nvcc")))
            .filter(|p| p.exists())
            .or_else(|| which("nvcc"))
            .or_else(|| wheel_nvcc.exists().then(|| wheel_nvcc.clone()));
        let nvcc = match found {
            Some(nvcc) => nvcc,
            None => {
                let specs: Vec<String> = CUDA_WHEELS.iter().map(|(n, v)| format!("{n}=={v}")).collect();
                pip_install(&toolchain_dir.join("cuda"), &specs, "the CUDA compiler (nvcc, ptxas)");
                assert!(wheel_nvcc.exists(), "pip finished but {} is missing", wheel_nvcc.display());
                wheel_nvcc
            }
        };
        println!("cargo:warning=small4: using nvcc at {}", nvcc.display());
        // Wheel layout keeps cccl (nv/target) apart from the runtime headers.
        let root = nvcc.parent().and_then(|b| b.parent()).unwrap().to_path_buf();
        let includes = [root.join("include"), root.join("include").join("cccl"), root.join("cccl")].into_iter().filter(|p| p.exists()).collect();

        let libclang_dir = if env::var_os("LIBCLANG_PATH").is_some() || system_libclang_present() {
            None
        } else {
            let dir = toolchain_dir.join("libclang");
            let lib = dir.join("clang").join("native");
            if !lib.join("libclang.so").exists() {
                let spec = format!("{}=={}", LIBCLANG_WHEEL.0, LIBCLANG_WHEEL.1);
                pip_install(&dir, &[spec], "libclang for bindgen");
            }
            Some(lib)
        };
        Toolchain { nvcc, includes, libclang_dir }
    }

    fn base_args(&self, include_dir: &Path) -> Vec<String> {
        let mut args =
            vec!["-O3".to_string(), "-std=c++17".to_string(), format!("-gencode=arch={PTX_ARCH},code={GPU_ARCH}"), format!("-I{}", include_dir.display())];
        args.extend(self.includes.iter().map(|p| format!("-I{}", p.display())));
        args
    }

    /// `.cu` -> `.ptx` (nvcc) -> `.cubin` (ptxas, spills are errors, resource usage parsed).
    fn compile(&self, src: &Path, include_dir: &Path, out_dir: &Path) -> CompiledModule {
        let name = src.file_stem().unwrap().to_string_lossy().to_string();
        let ptx = out_dir.join(format!("{name}.ptx"));
        let cubin = out_dir.join(format!("{name}.cubin"));
        let mut cmd = Command::new(&self.nvcc);
        cmd.args(self.base_args(include_dir)).arg("-ptx").arg(src).arg("-o").arg(&ptx);
        run_checked(&mut cmd, &format!("nvcc -ptx {}", src.display()));

        let ptxas = self.nvcc.with_file_name("ptxas");
        let mut cmd = Command::new(&ptxas);
        cmd.args([&format!("-arch={GPU_ARCH}"), "-O3", "-v", "--warn-on-spills", "--warning-as-error"]).arg(&ptx).arg("-o").arg(&cubin);
        let report = run_checked(&mut cmd, &format!("ptxas {}", ptx.display()));
        CompiledModule { name, ptx, cubin, resources: parse_ptxas_report(&report) }
    }
}

struct CompiledModule {
    name: String,
    ptx: PathBuf,
    cubin: PathBuf,
    resources: Vec<KernelResources>,
}

#[derive(Default, Clone)]
struct KernelResources {
    kernel: String,
    registers: u32,
    shared_bytes: u32,
    spill_stores: u32,
    spill_loads: u32,
    stack_bytes: u32,
    barriers: u32,
}

/// Reads `ptxas -v` output: "Compiling entry function 'k'", "N bytes stack frame, N bytes spill stores, N bytes spill
/// loads", "Used N registers, used N barriers, N bytes smem".
fn parse_ptxas_report(text: &str) -> Vec<KernelResources> {
    let mut kernels: BTreeMap<String, KernelResources> = BTreeMap::new();
    let mut current: Option<String> = None;
    let number_before = |line: &str, unit: &str| -> u32 {
        line.split(',').find(|part| part.contains(unit)).and_then(|part| part.split_whitespace().rev().find_map(|w| w.parse().ok())).unwrap_or(0)
    };
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap().to_string();
            kernels.insert(name.clone(), KernelResources { kernel: name.clone(), ..Default::default() });
            current = Some(name);
        } else if let Some(k) = current.as_ref().and_then(|c| kernels.get_mut(c)) {
            if line.contains("stack frame") {
                k.stack_bytes = first_number(line.split("bytes stack frame").next().unwrap());
                k.spill_stores = first_number(line.split("bytes spill stores").next().unwrap().rsplit(',').next().unwrap());
                k.spill_loads = first_number(line.split("bytes spill loads").next().unwrap().rsplit(',').next().unwrap());
            } else if line.contains("Used") && line.contains("registers") {
                k.registers = first_number(line.split("Used").nth(1).unwrap());
                k.barriers = number_before(line, "barriers");
                k.shared_bytes = line.split(',').find(|p| p.contains("smem")).map(first_number).unwrap_or(0);
            }
        }
    }
    kernels.into_values().collect()
}

fn first_number(text: &str) -> u32 {
    text.split(|c: char| !c.is_ascii_digit()).find(|w| !w.is_empty()).and_then(|w| w.parse().ok()).unwrap_or(0)
}

fn write_kernel_constants(modules: &[CompiledModule], out_dir: &Path) {
    let mut src = String::from("// Generated by build.rs: the PTX and sm_90a cubin of every cuda/*.cu.\n");
    for m in modules {
        let upper = m.name.to_uppercase();
        writeln!(
            src,
            "/// `cuda/{name}.cu`\npub const {upper}: KernelModule = KernelModule {{ name: \"{name}\", ptx: include_str!(\"{ptx}\"), cubin: include_bytes!(\"{cubin}\") }};",
            name = m.name,
            ptx = m.ptx.display(),
            cubin = m.cubin.display()
        )
        .unwrap();
    }
    let names: Vec<String> = modules.iter().map(|m| m.name.to_uppercase()).collect();
    writeln!(src, "/// Every module, in file-name order.\npub const ALL_MODULES: &[KernelModule] = &[{}];", names.join(", ")).unwrap();
    fs::write(out_dir.join("kernels.rs"), src).unwrap();
}

fn write_resource_table(modules: &[CompiledModule], out_dir: &Path) {
    let mut table = String::from(
        "| module | kernel | registers | shared bytes (static) | barriers | stack bytes | spill stores | spill loads |\n|---|---|---|---|---|---|---|---|\n",
    );
    let mut rust = String::from("// Generated by build.rs from ptxas -v.\npub const KERNEL_RESOURCES: &[KernelResources] = &[\n");
    for m in modules {
        for k in &m.resources {
            writeln!(
                table,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                m.name, k.kernel, k.registers, k.shared_bytes, k.barriers, k.stack_bytes, k.spill_stores, k.spill_loads
            )
            .unwrap();
            writeln!(
                rust,
                "    KernelResources {{ module: \"{}\", kernel: \"{}\", registers: {}, shared_bytes: {}, barriers: {}, stack_bytes: {}, spill_stores: {}, spill_loads: {} }},",
                m.name, k.kernel, k.registers, k.shared_bytes, k.barriers, k.stack_bytes, k.spill_stores, k.spill_loads
            )
            .unwrap();
        }
    }
    rust.push_str("];\n");
    fs::write(out_dir.join("kernel_resources.md"), table).unwrap();
    fs::write(out_dir.join("kernel_resources.rs"), rust).unwrap();
}

fn generate_param_bindings(toolchain: &Toolchain, include_dir: &Path, out_dir: &Path) {
    if let Some(dir) = &toolchain.libclang_dir {
        // clang-sys loads libclang at run time and reads this variable then.
        env::set_var("LIBCLANG_PATH", dir);
    }
    let header = include_dir.join("params.h");
    let bindings = bindgen::Builder::default()
        .header(header.to_string_lossy())
        .allowlist_type(".*Params")
        .allowlist_var("SMALL4_.*")
        .derive_default(true)
        .derive_debug(true)
        .layout_tests(true)
        .use_core()
        .generate()
        .unwrap_or_else(|e| panic!("bindgen failed on {}: {e}", header.display()));
    bindings.write_to_file(out_dir.join("params.rs")).unwrap();
}

/// Installs the pinned mistral-common wheel (only its data file is used), checks the vocabulary's sha256, exports its
/// path as `SMALL4_TEKKEN_240911` and writes the embedded form `tekken_240911_embedded.json` into `OUT_DIR`.
///
/// Why a derived file is embedded instead of the original: the original is 19 MB, mostly ranks 130072..150000 that a
/// 131072-id model never uses plus a `token_str` copy of every token. The derived file is the same tekken.json format
/// (so one loader and its validations serve both) holding only `config` and the first `default_vocab_size -
/// default_num_special_tokens` ranks' `token_bytes`: about a third of the size.
fn provision_tekken_240911(toolchain_dir: &Path, out_dir: &Path) {
    let dir = toolchain_dir.join(format!("{}-{}", MISTRAL_COMMON_WHEEL.0, MISTRAL_COMMON_WHEEL.1));
    let json = dir.join(TEKKEN_240911_PATH);
    if !json.exists() {
        let spec = format!("{}=={}", MISTRAL_COMMON_WHEEL.0, MISTRAL_COMMON_WHEEL.1);
        pip_install(&dir, &[spec], "the tekken_240911.json test vocabulary (mistral-common wheel)");
    }
    let bytes = fs::read(&json).unwrap_or_else(|e| panic!("small4: cannot read {}: {e}", json.display()));
    let digest: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
    };
    if digest != TEKKEN_240911_SHA256 {
        panic!(
            "small4: {} has sha256 {digest}, expected {TEKKEN_240911_SHA256}.\n\
             The file is corrupt or not the one of {}=={}; delete {} and build again.",
            json.display(),
            MISTRAL_COMMON_WHEEL.0,
            MISTRAL_COMMON_WHEEL.1,
            dir.display()
        );
    }
    println!("cargo:rerun-if-changed={}", json.display());
    println!("cargo:rustc-env=SMALL4_TEKKEN_240911={}", json.display());

    let embedded = out_dir.join("tekken_240911_embedded.json");
    let mut doc: serde_json::Value = serde_json::from_slice(&bytes).expect("tekken_240911.json parses (checksum ok)");
    let config = &doc["config"];
    let used = config["default_vocab_size"].as_u64().unwrap() - config["default_num_special_tokens"].as_u64().unwrap();
    let vocab: Vec<serde_json::Value> =
        doc["vocab"].as_array().unwrap()[..used as usize].iter().map(|t| serde_json::json!({ "rank": t["rank"], "token_bytes": t["token_bytes"] })).collect();
    doc["vocab"] = serde_json::Value::Array(vocab);
    fs::write(&embedded, serde_json::to_vec(&doc).unwrap()).unwrap();
}

/// Finds `cuobjdump` and `nvdisasm` beside nvcc, else installs the pinned wheels into `<toolchain>/sass-tools` when
/// they are missing there, and tells the tests where cuobjdump is (`SMALL4_CUOBJDUMP`, empty when it could not be
/// provisioned, and then `SMALL4_SASS_TOOLS_ERROR` says why). A failure here does not fail the build: only the SASS
/// test needs the tools, and it fails with the reason.
fn provision_sass_tools(toolchain: &Toolchain, toolchain_dir: &Path) {
    let beside_nvcc = toolchain.nvcc.with_file_name("cuobjdump");
    let bin = if beside_nvcc.exists() && toolchain.nvcc.with_file_name("nvdisasm").exists() {
        toolchain.nvcc.parent().unwrap().to_path_buf()
    } else {
        let dir = toolchain_dir.join("sass-tools");
        let bin = dir.join("nvidia").join("cu13").join("bin");
        if !(bin.join("cuobjdump").exists() && bin.join("nvdisasm").exists()) {
            // One pip run for both wheels: a second `--upgrade --target` run would replace the first's nvidia/ tree.
            let specs: Vec<String> = SASS_WHEELS.iter().map(|(n, v)| format!("{n}=={v}")).collect();
            if let Err(why) = try_pip_install(&dir, &specs, "the SASS tools (cuobjdump, nvdisasm)") {
                println!("cargo:warning=small4: {why}");
                println!("cargo:rustc-env=SMALL4_CUOBJDUMP=");
                println!("cargo:rustc-env=SMALL4_SASS_TOOLS_ERROR={}", why.replace('\n', " "));
                return;
            }
        }
        bin
    };
    let cuobjdump = bin.join("cuobjdump");
    println!("cargo:rerun-if-changed={}", cuobjdump.display());
    println!("cargo:rustc-env=SMALL4_CUOBJDUMP={}", cuobjdump.display());
    println!("cargo:rustc-env=SMALL4_SASS_TOOLS_ERROR=");
}

fn pip_install(target: &Path, specs: &[String], what: &str) {
    if let Err(why) = try_pip_install(target, specs, what) {
        panic!("{why}");
    }
}

/// `pip install --no-deps --target`; Err says why it did not run or failed (SMALL4_OFFLINE=1, pip's output).
fn try_pip_install(target: &Path, specs: &[String], what: &str) -> Result<(), String> {
    if env::var("SMALL4_OFFLINE").is_ok_and(|v| v == "1") {
        return Err(format!(
            "small4: {what} is not installed and SMALL4_OFFLINE=1 forbids provisioning it.\n\
             Install the CUDA toolkit (set NVCC or CUDA_HOME) or unset SMALL4_OFFLINE to let the build run:\n  \
             python3 -m pip install --no-deps --target {} {}",
            target.display(),
            specs.join(" ")
        ));
    }
    println!("cargo:warning=small4: provisioning {what} into {} ({})", target.display(), specs.join(" "));
    fs::create_dir_all(target).map_err(|e| format!("small4: cannot create {}: {e}", target.display()))?;
    let mut cmd = Command::new(python());
    cmd.args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "--upgrade", "--target"]).arg(target).args(specs);
    let what = format!("pip install {}", specs.join(" "));
    let output = cmd.output().map_err(|e| format!("small4: could not start `{what}`: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "small4: `{what}` failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

fn python() -> String {
    env::var("PYTHON").unwrap_or_else(|_| if which("python3").is_some() { "python3".into() } else { "python".into() })
}

fn run_checked(cmd: &mut Command, what: &str) -> String {
    let output = cmd.output().unwrap_or_else(|e| panic!("small4: could not start `{what}`: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if !output.status.success() {
        panic!("small4: `{what}` failed ({}):\n{text}", output.status);
    }
    text
}

fn which(program: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?).map(|d| d.join(program)).find(|p| p.is_file())
}

/// Whether clang-sys would find a libclang by itself (Debian's libclang-dev and friends).
fn system_libclang_present() -> bool {
    let dirs = ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"];
    dirs.iter().filter_map(|d| fs::read_dir(d).ok()).flatten().flatten().any(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        name.starts_with("libclang") && name.contains(".so") && !name.contains("cpp")
    })
}
