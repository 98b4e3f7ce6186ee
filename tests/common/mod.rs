//! Shared test helpers: one test body instantiated per backend, bf16 data generation, tolerance checks.
#![allow(dead_code)]

use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};

pub mod forced;
pub mod routing;

/// Instantiates each `fn name(device: &Device)` twice: `sim::name` on the PTX interpreter (always runs) and
/// `gpu::name` on CUDA device 0. Without a GPU the gpu twin skips and says so ([`gpu_skipped`]); with
/// `SMALL4_REQUIRE_GPU` set (the GPU machine's run) a missing GPU fails it instead.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sim {
            $( #[test] fn $name() { super::$name(&small4::device::simulator()); } )*
        }
        mod gpu {
            $( #[test] fn $name() {
                match small4::device::gpu() {
                    Ok(device) => super::$name(&device),
                    Err(e) => $crate::common::gpu_skipped(concat!(module_path!(), "::", stringify!($name)), &e),
                }
            } )*
        }
    };
}

/// A gpu:: twin without a GPU: fails when `SMALL4_REQUIRE_GPU` is set, otherwise writes one `SKIPPED` line with the
/// reason and a running count of this test binary's skips. The line goes to the process's stderr directly, not
/// through `eprintln!`, which libtest captures and hides for passing tests: a skipped twin would otherwise read as
/// a plain `ok`.
pub fn gpu_skipped(test: &str, reason: &small4::Error) {
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};
    static SKIPPED: AtomicUsize = AtomicUsize::new(0);
    if std::env::var_os("SMALL4_REQUIRE_GPU").is_some() {
        panic!("{test}: SMALL4_REQUIRE_GPU is set but there is no usable GPU ({reason})");
    }
    let count = SKIPPED.fetch_add(1, Ordering::Relaxed) + 1;
    let line = format!("SKIPPED {test} (gpu twin {count} skipped in this binary): needs a real GPU ({reason}); the sim:: twin ran the same PTX\n");
    // One write of the whole line, so parallel tests do not interleave within it; a closed stderr only loses it.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Random bf16 values in [-scale, scale], never exactly zero or one (KERNELS.md: never test on zeros or ones).
pub fn random_bf16(rng: &mut StdRng, len: usize, scale: f32) -> Vec<bf16> {
    (0..len)
        .map(|_| loop {
            let v = bf16::from_f32(rng.random_range(-scale..scale));
            if v.to_f32() != 0.0 && v.to_f32().abs() != 1.0 {
                break v;
            }
        })
        .collect()
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Every output was written (no NaN left from the 0xff poison) and each element is within
/// `abs + rel * |ref|` of the reference. Reports the worst element.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], abs: f32, rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(!g.is_nan(), "{what}: element {i} is NaN (never written, or computed NaN); reference {w}");
        let excess = (g - w).abs() - (abs + rel * w.abs());
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    let i = worst.0;
    assert!(worst.1 <= 0.0, "{what}: element {i} = {} but reference {} (tolerance {abs} + {rel}*|ref|)", got[i], want[i]);
}

/// DeepGEMM's agreement measure 1 - 2 sum(xy) / sum(x^2 + y^2): 0 for identical vectors, scale-free.
pub fn deepgemm_diff(got: &[f32], want: &[f32]) -> f64 {
    let (mut xy, mut sq) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        xy += g as f64 * w as f64;
        sq += (g as f64).powi(2) + (w as f64).powi(2);
    }
    // Two all-zero vectors agree exactly (e.g. every routed expert of the batch lives on another rank and there is no
    // shared expert); the ratio itself is undefined there.
    if sq == 0.0 {
        return 0.0;
    }
    1.0 - 2.0 * xy / sq
}

/// Every element written (no NaN left from the 0xff poison) and the DeepGEMM measure under `limit`. The reference
/// multiplies the same bf16-rounded weights as the kernels (`dequantize_for_gemm`); the kernels round the SwiGLU
/// activations and the outputs to bf16 and sum in another order, each a relative 2^-9: about 1e-5 of this measure;
/// 1e-4 leaves a margin and still catches any wrong element of magnitude.
pub fn assert_agrees(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().position(|v| v.is_nan()) {
        panic!("{what}: element {i} is NaN (never written or computed NaN); reference {}", want[i]);
    }
    let diff = deepgemm_diff(got, want);
    assert!(diff < 1e-4, "{what}: 1 - 2 sum(xy)/sum(x^2+y^2) = {diff:e}");
    // And no single element far off: within 2% of the largest reference magnitude.
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 0.02 * scale, "{what}: element {i} = {g}, reference {w} (scale {scale})");
    }
}

/// A check before a launch of [`Hooked`]: an error fails the launch instead of running it.
pub type LaunchCheck = Box<dyn Fn(&small4::device::Kernel) -> small4::Result<()> + Send + Sync>;

/// A backend that forwards every call to `inner`, with hooks around allocation, free and launch: the test doubles
/// that account device memory, inject a failure, or keep every launch's counters.
pub struct Hooked {
    pub inner: small4::device::Device,
    /// Called with the address and size of each allocation that succeeded.
    pub on_alloc: Box<dyn Fn(u64, usize) + Send + Sync>,
    /// Called with the address of each free that succeeded.
    pub on_free: Box<dyn Fn(u64) + Send + Sync>,
    /// Called before each launch; an error fails the launch instead of running it.
    pub before_launch: LaunchCheck,
    /// Called after each launch that ran, with the inner backend (its `last_launch_counters`).
    pub after_launch: Box<dyn Fn(&small4::device::Device) + Send + Sync>,
}

impl Hooked {
    /// Forwards everything, no hooks.
    pub fn new(inner: small4::device::Device) -> Self {
        Hooked { inner, on_alloc: Box::new(|_, _| {}), on_free: Box::new(|_| {}), before_launch: Box::new(|_| Ok(())), after_launch: Box::new(|_| {}) }
    }
}

impl small4::device::Backend for Hooked {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn alloc(&self, bytes: usize) -> small4::Result<u64> {
        let addr = self.inner.alloc(bytes)?;
        (self.on_alloc)(addr, bytes);
        Ok(addr)
    }
    fn free(&self, addr: u64) -> small4::Result<()> {
        self.inner.free(addr)?;
        (self.on_free)(addr);
        Ok(())
    }
    fn write(&self, addr: u64, data: &[u8]) -> small4::Result<()> {
        self.inner.write(addr, data)
    }
    fn read(&self, addr: u64, out: &mut [u8]) -> small4::Result<()> {
        self.inner.read(addr, out)
    }
    fn memset(&self, addr: u64, byte: u8, bytes: usize) -> small4::Result<()> {
        self.inner.memset(addr, byte, bytes)
    }
    fn copy(&self, dst: u64, src: u64, bytes: usize) -> small4::Result<()> {
        self.inner.copy(dst, src, bytes)
    }
    fn launch(&self, kernel: &small4::device::Kernel, config: &small4::device::LaunchConfig, params: &[u8]) -> small4::Result<()> {
        (self.before_launch)(kernel)?;
        self.inner.launch(kernel, config, params)?;
        (self.after_launch)(&self.inner);
        Ok(())
    }
    fn synchronize(&self) -> small4::Result<()> {
        self.inner.synchronize()
    }
    fn encode_tensor_map_tiled(&self, map: &small4::device::tensor_map::TiledTensorMap) -> small4::Result<small4::device::tensor_map::TensorMap> {
        self.inner.encode_tensor_map_tiled(map)
    }
}

/// A backend that runs one kernel (`entry`) from an edited copy of its module's PTX (a planted bug) and everything
/// else as `inner` does: the wgmma kernels' planted-bug tests show the interpreter's hazard checks fire on them.
pub struct Planted {
    pub inner: small4::device::Device,
    pub module: small4::device::KernelModule,
    pub entry: &'static str,
}

impl small4::device::Backend for Planted {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn alloc(&self, bytes: usize) -> small4::Result<u64> {
        self.inner.alloc(bytes)
    }
    fn free(&self, addr: u64) -> small4::Result<()> {
        self.inner.free(addr)
    }
    fn write(&self, addr: u64, data: &[u8]) -> small4::Result<()> {
        self.inner.write(addr, data)
    }
    fn read(&self, addr: u64, out: &mut [u8]) -> small4::Result<()> {
        self.inner.read(addr, out)
    }
    fn memset(&self, addr: u64, byte: u8, bytes: usize) -> small4::Result<()> {
        self.inner.memset(addr, byte, bytes)
    }
    fn copy(&self, dst: u64, src: u64, bytes: usize) -> small4::Result<()> {
        self.inner.copy(dst, src, bytes)
    }
    fn launch(&self, kernel: &small4::device::Kernel, config: &small4::device::LaunchConfig, params: &[u8]) -> small4::Result<()> {
        if kernel.entry == self.entry {
            return self.inner.launch(&small4::device::Kernel { module: self.module, entry: kernel.entry }, config, params);
        }
        self.inner.launch(kernel, config, params)
    }
    fn synchronize(&self) -> small4::Result<()> {
        self.inner.synchronize()
    }
    fn encode_tensor_map_tiled(&self, map: &small4::device::tensor_map::TiledTensorMap) -> small4::Result<small4::device::tensor_map::TensorMap> {
        self.inner.encode_tensor_map_tiled(map)
    }
    fn last_launch_counters(&self) -> Option<small4::device::LaunchCounters> {
        self.inner.last_launch_counters()
    }
}

impl Planted {
    /// The interpreter, running `entry` from `ptx`: an edit of `module`'s PTX (the planted bug `bug`, loaded as module
    /// `{module}_{bug}` so the backend caches it apart). Panics if the edit changed nothing.
    pub fn edited(module: small4::device::KernelModule, entry: &'static str, bug: &str, ptx: String) -> small4::device::Device {
        assert_ne!(ptx, module.ptx, "{bug}: the edit changed nothing");
        let name = Box::leak(format!("{}_{bug}", module.name).into_boxed_str());
        let module = small4::device::KernelModule { name, ptx: Box::leak(ptx.into_boxed_str()), cubin: &[] };
        std::sync::Arc::new(Planted { inner: small4::device::simulator(), module, entry })
    }

    /// The control beside [`Planted::edited`]: the same backend running `entry` from the unedited `module`.
    pub fn unedited(module: small4::device::KernelModule, entry: &'static str) -> small4::device::Device {
        std::sync::Arc::new(Planted { inner: small4::device::simulator(), module, entry })
    }
}

/// The planted bug `bug` failed the launch with the interpreter's report, which mentions `expected`.
pub fn assert_reported<T>(bug: &str, result: small4::Result<T>, expected: &str) {
    match result {
        Err(small4::Error::Simulator(message)) => assert!(message.contains(expected), "{bug}: expected a report mentioning {expected:?}, got: {message}"),
        other => panic!("{bug}: expected the interpreter's report, got {:?}", other.map(|_| ())),
    }
}

/// `ptx` without its `fence.proxy.async` lines: generic-proxy writes of shared memory (cp.async tiles, zero rows)
/// reach the async proxy (wgmma, bulk copies) unfenced.
pub fn without_proxy_fences(ptx: &str) -> String {
    ptx.lines().filter(|l| !l.contains("fence.proxy.async")).collect::<Vec<_>>().join("\n")
}

/// `ptx` with every mbarrier wait (`mbarrier.try_wait.parity` into P1) replaced by setting P1: nobody waits on a
/// barrier, so consumers read stages before anything landed there.
pub fn without_mbarrier_waits(ptx: &str) -> String {
    let try_wait = "mbarrier.try_wait.parity.shared::cta.b64 P1, [";
    ptx.lines().map(|l| if l.trim_start().starts_with(try_wait) { "setp.eq.u32 P1, 1, 1;" } else { l }).collect::<Vec<_>>().join("\n")
}

/// On the interpreter, the race detector (which the wgmma kernels' tests rely on) must be on.
pub fn require_race_check(device: &small4::device::Device) {
    if device.name() == "sim" {
        assert!(std::env::var("PTXSIM_RACE_CHECK").map_or(true, |v| v != "0"), "these tests need the race detector: unset PTXSIM_RACE_CHECK=0");
    }
}

/// A wgmma kernel's output beside its mma.sync twin's: prints the largest difference (a GPU's, for the record) and,
/// on the interpreter, where both sum every k-step of 16 exactly and round once in the same k order, requires them
/// identical bit for bit.
pub fn compare_wgmma_with_mma_sync(device: &small4::device::Device, what: &str, wgmma: &[f32], mma_sync: &[f32]) {
    let max_difference = wgmma.iter().zip(mma_sync).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("{what} on {}: max |wgmma - mma.sync| = {max_difference:e} over {} outputs", device.name(), wgmma.len());
    if device.name() == "sim" {
        let differ = wgmma.iter().zip(mma_sync).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differ, 0, "{what}: {differ} of {} outputs differ between wgmma and mma.sync on the interpreter", wgmma.len());
    }
}

/// `text` with the operand after every `prefix` .. `middle` replaced: each line holding `prefix`, then `middle`,
/// keeps what precedes `middle` and ends with `replacement`.
pub fn regex_free_replace(text: &str, prefix: &str, middle: &str, replacement: &str) -> String {
    text.lines()
        .map(|l| match (l.find(prefix), l.rfind(middle)) {
            (Some(p), Some(m)) if m > p => format!("{}{replacement}", &l[..m]),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One launch's interpreter counters as the cells of docs/perf.md's counter tables: kernel | blocks run / grid | warp
/// instructions | shared requests | bank-conflict wavefronts | global bytes read | tensor instructions | tensor FLOPs.
pub fn counter_cells(c: &small4::device::LaunchCounters) -> String {
    format!(
        "{} | {} / {} | {} | {} | {} | {} | {} | {}",
        c.kernel, c.blocks_run, c.blocks, c.instructions, c.shared_requests, c.shared_bank_conflicts, c.global_bytes_read, c.tensor_core_ops, c.tensor_flops
    )
}
