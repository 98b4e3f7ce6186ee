//! The timing model's L2 residency across launches on the interpreter (`SimBackend`, `ptxsim::l2::L2Residency`):
//! planted pairs of launches where the first writes or prefetches a range and the second reads it. The second's
//! predicted DRAM bytes fall by exactly the range, a prefetch adds the range to its issuer's, and more than L2's
//! 50 MiB touched in between (a sampled launch's unseen blocks included) makes the reader cold again.

use std::sync::Arc;

use small4::device::sim::SimBackend;
use small4::device::{Backend, Device, Dim3, Kernel, KernelModule, LaunchConfig, LaunchCounters, TargetGpu};

const PTX: &str = r#"
.version 8.0
.target sm_90a
.address_size 64
.visible .entry touch_words(.param .u64 words, .param .u32 n, .param .u32 store)
{
    .reg .pred %p<3>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [words];
    ld.param.u32 %r1, [n];
    ld.param.u32 %r7, [store];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.s32 %r5, %r2, %r3, %r4;
    setp.ge.u32 %p1, %r5, %r1;
    @%p1 bra DONE;
    mul.wide.u32 %rd2, %r5, 4;
    add.s64 %rd3, %rd1, %rd2;
    setp.ne.u32 %p2, %r7, 0;
    @%p2 st.global.u32 [%rd3], %r5;
    @!%p2 ld.global.u32 %r6, [%rd3];
DONE:
    ret;
}
.visible .entry prefetch_chunks(.param .u64 bytes, .param .u32 chunk)
{
    .reg .pred %p1;
    .reg .b32 %r<4>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [bytes];
    ld.param.u32 %r1, [chunk];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %tid.x;
    setp.ne.u32 %p1, %r3, 0;
    @%p1 bra DONE;
    mul.wide.u32 %rd2, %r2, %r1;
    add.s64 %rd3, %rd1, %rd2;
    cp.async.bulk.prefetch.L2.global [%rd3], %r1;
DONE:
    ret;
}
"#;

const MODULE: KernelModule = KernelModule { name: "test_l2_residency", ptx: PTX, cubin: &[] };
/// Each thread loads (`store` 0) or stores one of `n` words.
const TOUCH: Kernel = Kernel { module: MODULE, entry: "touch_words" };
const PREFETCH: Kernel = Kernel { module: MODULE, entry: "prefetch_chunks" };

/// The range X: 256 KiB, 8192 sectors.
const X_BYTES: u64 = 256 * 1024;
const X_SECTORS: u64 = X_BYTES / 32;

/// Launches `kernel` over `addr` (`n` = words for `touch_words`, the chunk bytes for the prefetch; `store` for
/// `touch_words`) on `blocks` blocks of 256 threads; its counters.
fn launch_with(sim: &SimBackend, kernel: &Kernel, addr: u64, n: u32, store: bool, blocks: u32) -> LaunchCounters {
    let mut params = addr.to_le_bytes().to_vec();
    params.extend_from_slice(&n.to_le_bytes());
    params.extend_from_slice(&(store as u32).to_le_bytes());
    sim.launch(kernel, &LaunchConfig { grid: Dim3::x(blocks), block: Dim3::x(256), shared_bytes: 0 }, &params).unwrap();
    sim.last_launch_counters().unwrap()
}

fn launch(sim: &SimBackend, kernel: &Kernel, addr: u64, n: u32, blocks: u32) -> LaunchCounters {
    launch_with(sim, kernel, addr, n, false, blocks)
}

/// One word a thread over X: a load, or a store when `store`.
fn touch_x(sim: &SimBackend, x: u64, store: bool) -> LaunchCounters {
    launch_with(sim, &TOUCH, x, (X_BYTES / 4) as u32, store, (X_BYTES / 4 / 256) as u32)
}

fn read_x(sim: &SimBackend, x: u64) -> LaunchCounters {
    touch_x(sim, x, false)
}

/// Write X, then read it: on its own (residency off) the reader's DRAM bytes are X; after the writer, every sector
/// is a hit and they fall by X exactly, with the time and the hit bytes to match.
#[test]
fn a_launch_reading_what_the_launch_before_wrote_hits_l2() {
    let run = |residency: bool| {
        let sim = SimBackend::new();
        sim.set_l2_residency(residency);
        let x = sim.alloc(X_BYTES as usize).unwrap(); // no host copy: nothing of X is in L2 yet
        let writer = touch_x(&sim, x, true);
        (writer, read_x(&sim, x))
    };
    let ((cold_writer, cold_reader), (writer, reader)) = (run(false), run(true));
    assert_eq!(writer.timing.l2_hit_sectors, 0, "X was never touched before its writer");
    assert_eq!(writer.timing.dram_bytes(), cold_writer.timing.dram_bytes());
    assert_eq!((cold_reader.timing.distinct_sectors, cold_reader.timing.dram_bytes()), (X_SECTORS, X_BYTES as f64));
    assert_eq!(reader.timing.l2_hit_sectors, X_SECTORS);
    assert_eq!(cold_reader.timing.dram_bytes() - reader.timing.dram_bytes(), X_BYTES as f64);
    assert_eq!((reader.predicted_l2_hit_bytes, cold_reader.predicted_l2_hit_bytes), (Some(X_BYTES as f64), Some(0.0)));
    let (gpu, model) = (TargetGpu::H100_SXM, small4::device::TimingModel::FITTED);
    let (warm, cold) = (reader.predict(&gpu, &model), cold_reader.predict(&gpu, &model));
    assert_eq!(warm.dram_s, 0.0);
    assert!(warm.seconds < cold.seconds, "{} vs {}", warm.seconds, cold.seconds);
    assert_eq!(warm.l2_s, cold.l2_s, "the hits still cross L2");
    // The same reader with its data resident for another reason (`l2_resident`, calibrate's rows) is priced alike.
    let mut resident = cold_reader.clone();
    resident.timing.l2_resident = true;
    assert_eq!(resident.predict(&gpu, &model).seconds, warm.seconds);
}

/// Prefetch X (cold, uploaded before the L2 state started), then read it: the prefetch is its issuer's DRAM traffic
/// and the reader's hits; prefetching resident sectors costs nothing; a launch touching 60 MiB in between leaves the
/// reader cold.
#[test]
fn a_prefetch_moves_the_dram_bytes_to_its_issuer_until_l2_is_flushed() {
    let sim = SimBackend::new();
    sim.set_l2_residency(false);
    let x = sim.alloc(X_BYTES as usize).unwrap();
    sim.write(x, &vec![7u8; X_BYTES as usize]).unwrap();
    let big = 60 << 20;
    let flush = sim.alloc(big).unwrap();
    sim.set_l2_residency(true); // an empty L2: the upload is forgotten
    let cold_reader = read_x(&sim, x);
    assert_eq!((cold_reader.timing.l2_hit_sectors, cold_reader.timing.dram_bytes()), (0, X_BYTES as f64));

    sim.set_l2_residency(true);
    // 4 blocks, each of whose thread 0 prefetches a 64 KiB chunk.
    let prefetcher = launch(&sim, &PREFETCH, x, (X_BYTES / 4) as u32, 4);
    assert_eq!((prefetcher.timing.prefetch_sectors, prefetcher.timing.prefetch_l2_hit_sectors), (X_SECTORS, 0));
    assert_eq!((prefetcher.timing.distinct_sectors, prefetcher.timing.dram_bytes()), (0, X_BYTES as f64));
    let p = prefetcher.predict(&TargetGpu::H100_SXM, &small4::device::TimingModel::FITTED);
    assert_eq!(p.prefetch_dram_bytes, X_BYTES as f64);
    assert!(p.dram_s > 0.0 && p.chain_s < p.dram_s, "a prefetch waits for nothing: {p:?}");
    let reader = read_x(&sim, x);
    assert_eq!(reader.timing.l2_hit_sectors, X_SECTORS);
    assert_eq!(cold_reader.timing.dram_bytes() - reader.timing.dram_bytes(), X_BYTES as f64);
    // Prefetching what L2 holds already moves nothing.
    let again = launch(&sim, &PREFETCH, x, (X_BYTES / 4) as u32, 4);
    assert_eq!((again.timing.prefetch_l2_hit_sectors, again.timing.dram_bytes()), (X_SECTORS, 0.0));

    // 60 MiB prefetched in between (60 blocks of 1 MiB): more than L2's 50 MiB, X is gone.
    let flusher = launch(&sim, &PREFETCH, flush, 1 << 20, 60);
    assert_eq!(flusher.timing.prefetch_sectors, (60 << 20) / 32);
    assert_eq!(read_x(&sim, x).timing.l2_hit_sectors, 0);
}

/// A sampled launch feeds the sectors of the blocks it ran, and the rest of its grid as lines the model never saw: a
/// sampled 60 MiB launch that ran 6 MiB of it still flushes L2. And a host upload leaves its bytes resident.
#[test]
fn a_sampled_launch_larger_than_l2_flushes_it_and_an_upload_is_resident() {
    let sim = Arc::new(SimBackend::new());
    let device: Device = sim.clone();
    let x = device.alloc(X_BYTES as usize).unwrap();
    device.write(x, &vec![1u8; X_BYTES as usize]).unwrap();
    device.synchronize().unwrap(); // a host synchronisation does not flush L2
    assert_eq!(read_x(&sim, x).timing.l2_hit_sectors, X_SECTORS, "the upload went through L2");
    let flush = device.alloc(60 << 20).unwrap();
    sim.set_block_sample(Some(6));
    let flusher = launch(&sim, &PREFETCH, flush, 1 << 20, 60);
    assert_eq!((flusher.blocks_run, flusher.timing.prefetch_sectors), (6, (6 << 20) / 32));
    assert_eq!(flusher.timing.dram_bytes(), (60 << 20) as f64, "the sampled prefetches scale to the grid");
    sim.set_block_sample(None);
    assert_eq!(read_x(&sim, x).timing.l2_hit_sectors, 0, "54 MiB of unseen lines pushed X out");
    // A 6 MiB launch does not.
    let small = launch(&sim, &PREFETCH, flush, 1 << 20, 6);
    assert_eq!(small.timing.prefetch_sectors, (6 << 20) / 32);
    assert_eq!(read_x(&sim, x).timing.l2_hit_sectors, X_SECTORS, "the read before refilled X");
}
