//! Predicted GPU time of one launch from what the interpreter counted: an analytical model in the spirit of the
//! MWP-CWP model (Hong and Kim, ISCA 2009), not a cycle-by-cycle simulator.
//!
//! The launch is the maximum of six rates, plus the costs that do not overlap:
//!
//! - **DRAM**: the launch's distinct 32-byte sectors (`Counters::distinct_sectors`: what L2 does not keep from a
//!   second read) over the achievable bandwidth. That bandwidth is the datasheet figure times the copy efficiency, or
//!   less when the resident warps keep too few bytes in flight: by Little's law an SM moves at most
//!   `bytes in flight / latency`. Bytes in flight per warp = the sectors it requests between two waits (a block
//!   barrier or a `cp.async.wait_group`), times the copy groups a `wait_group N` leaves outstanding (N + 1), capped
//!   by what one SM can keep outstanding (the memory warp parallelism, MWP).
//! - **L2**: every warp request's sectors (`global_sectors`, re-reads included) over the L2 bandwidth.
//! - **Issue** (the computation warp parallelism, CWP): warp instructions of the busiest SM over 4 schedulers, each
//!   issuing at most one instruction a cycle, or fewer when its warps (times the ILP of each) are too few to cover
//!   the class-weighted dependent latency of the instruction mix (`Class` latencies in [`LATENCY_CYCLES`]).
//! - **Critical path**: a block lasts at least its longest warp's chain of dependent instructions
//!   ([`CHAIN_CYCLES`] summed over what the warp issued, over an ILP factor); the busiest SM runs its blocks in rounds
//!   of the resident count, the last round holding the grid's longest block (a last-block reduction's serial tail).
//! - **Tensor cores** (`mma.sync` FLOPs of the busiest SM at the dense rate times the `mma.sync` efficiency) and
//!   **shared memory** (one wavefront per cycle per SM, bank conflicts included).
//!
//! Not overlapped: a launch overhead per kernel, and one memory latency per wave of blocks (a block's first load
//! has nothing to hide behind) plus the barriers of the busiest SM's blocks, each exposing a fraction of a memory
//! latency (the pipeline drains at a block barrier).
//!
//! Blocks per SM come from the ptxas resources (registers, shared memory) and the launch (threads, dynamic shared
//! memory), as the CUDA occupancy calculator does. Sampled launches (`Machine::block_sample`) are scaled up to the
//! grid: per-block counts are the sampled blocks' averages, and DRAM bytes are each sampled block's own distinct
//! sectors scaled to the grid (`Counters::block_distinct_sectors`: no L2 reuse between blocks is credited, an upper
//! bound where blocks share data, e.g. the weights of a prefill expert read by several row tiles).
//!
//! Every parameter is in [`Gpu`] (per device), [`LATENCY_CYCLES`] or [`Model`] (the fitted ones), each documented
//! with its source. Input: a [`Profile`] (the counters' scalars and the kernel's registers).

use crate::counters::Counters;
use crate::ir::Class;

/// A GPU's datasheet and microbenchmark figures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gpu {
    /// Short name used on the command line (`h100-sxm`, `h100-pcie`, `h200`).
    pub name: &'static str,
    /// Streaming multiprocessors (datasheet / whitepaper).
    pub sms: u32,
    /// SM clock in Hz under load: the clock at which the datasheet's dense tensor rate is reached
    /// (989.4 TFLOP/s = 132 SMs x 4096 FLOP/cycle x 1.83 GHz for the SXM parts; 756 = 114 x 4096 x 1.62 for PCIe).
    pub clock_hz: f64,
    /// DRAM bandwidth, datasheet (H100 SXM 3.35 TB/s HBM3, H100 PCIe 2.0 TB/s HBM2e, H200 4.8 TB/s HBM3e).
    pub dram_bytes_per_s: f64,
    /// L2 bandwidth to the SMs. Source: microbenchmarks of Hopper (Chips and Cheese, "Nvidia's H100: Funny L2, and
    /// Tons of Bandwidth", 2023: ~5.5 TB/s on H100 PCIe); scaled by SMs x clock for the SXM parts.
    pub l2_bytes_per_s: f64,
    /// Dense bf16 tensor-core FLOPs per SM per cycle (whitepaper: 1024 FMA/cycle/SM for 16-bit inputs with wgmma).
    pub tensor_flops_per_sm_cycle: f64,
    /// Registers per SM, 32-bit (64 Ki on sm_90).
    pub registers_per_sm: u32,
    /// Shared memory per SM usable by blocks (228 KiB on sm_90, of which 1 KiB per block is reserved by the driver).
    pub shared_per_sm: u32,
    /// Threads and blocks resident per SM at most (2048 and 32 on sm_90).
    pub max_threads_per_sm: u32,
    pub max_blocks_per_sm: u32,
}

impl Gpu {
    /// NVIDIA H100 SXM5 80 GB.
    pub const H100_SXM: Gpu = Gpu {
        name: "h100-sxm",
        sms: 132,
        clock_hz: 1.83e9,
        dram_bytes_per_s: 3.35e12,
        l2_bytes_per_s: 5.5e12 * (132.0 * 1.83) / (114.0 * 1.62),
        tensor_flops_per_sm_cycle: 4096.0,
        registers_per_sm: 65536,
        shared_per_sm: 228 * 1024,
        max_threads_per_sm: 2048,
        max_blocks_per_sm: 32,
    };
    /// NVIDIA H100 PCIe 80 GB.
    pub const H100_PCIE: Gpu = Gpu { name: "h100-pcie", sms: 114, clock_hz: 1.62e9, dram_bytes_per_s: 2.0e12, l2_bytes_per_s: 5.5e12, ..Gpu::H100_SXM };
    /// NVIDIA H200 SXM 141 GB: the H100 SXM's SMs and clocks with HBM3e.
    pub const H200: Gpu = Gpu { name: "h200", dram_bytes_per_s: 4.8e12, ..Gpu::H100_SXM };

    /// Every GPU the model knows.
    pub const ALL: [Gpu; 3] = [Gpu::H100_SXM, Gpu::H100_PCIE, Gpu::H200];

    /// The GPU of a short name (`h100-sxm`, `h100-pcie`, `h200`; case-insensitive, `h100` = `h100-sxm`).
    pub fn by_name(name: &str) -> Option<Gpu> {
        let n = name.to_ascii_lowercase();
        let n = if n == "h100" { "h100-sxm".to_string() } else { n };
        Gpu::ALL.into_iter().find(|g| g.name == n)
    }
}

/// Latency in cycles of a dependent instruction of each class (indexed as `Class::ALL`), the CWP side of the model.
/// Source: Luo et al., "Benchmarking and Dissecting the Nvidia Hopper GPU Architecture" (IPDPS 2024) and Jia et al.'s
/// earlier Volta/Turing dissections: ~4 cycles for fp32/int32 ALU, ~30 for shared-memory loads, ~30 for mma.sync;
/// global loads and async copies are covered by the memory side (1 = issue only).
pub const LATENCY_CYCLES: [f64; Class::ALL.len()] = [
    4.0,  // integer
    4.0,  // float
    6.0,  // convert
    2.0,  // move
    4.0,  // control
    1.0,  // global memory (memory side)
    30.0, // shared memory
    4.0,  // other memory (param, local)
    1.0,  // atomic (memory side)
    1.0,  // async copy (memory side)
    1.0,  // barrier/fence (barrier term)
    24.0, // warp collective (shfl, vote)
    30.0, // tensor (mma.sync, ldmatrix counted as shared)
];

/// Cycles one instruction of each class adds to its warp's chain of dependent instructions (`Counters::
/// chain_cycles_max`): [`LATENCY_CYCLES`], except that a barrier waits for the block's other warps (~20 cycles when
/// they are there). Global loads and atomics are counted apart (`chain_globals_max`) and weighed by the model's
/// `chain_global_cycles`. Integers, so the counter stays exact.
pub const CHAIN_CYCLES: [u64; Class::ALL.len()] = [4, 4, 6, 2, 4, 0, 30, 4, 0, 1, 20, 24, 30];

/// The weight of one global operation when the counters pick a block's longest warp chain: an L2 hit's latency on
/// Hopper (~260 cycles, Luo et al. 2024).
pub const CHAIN_GLOBAL_CYCLES: u64 = 260;

/// The model's free parameters, fitted on the H200 calibration set (`small4 calibrate`): few, each physical.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Model {
    /// Host-to-GPU launch overhead per kernel, seconds, for launches issued back to back (prior: 2-4 µs on Hopper).
    pub launch_s: f64,
    /// Loaded DRAM latency, cycles (prior: ~480 unloaded on H800 per Luo et al. 2024; more under load).
    pub dram_latency_cycles: f64,
    /// Fraction of the datasheet DRAM bandwidth a streaming kernel reaches (measured: 4.25 / 4.8 TB/s copy on the
    /// H200, `.gpu/ceilings.py`, docs/perf.md).
    pub dram_efficiency: f64,
    /// Fraction of the dense tensor rate `mma.sync` reaches on Hopper (wgmma reaches the datasheet rate; Luo et al.
    /// 2024 report mma.sync well below it; measured here: 800 TFLOP/s bf16 by torch vs 989 peak).
    pub mma_sync_efficiency: f64,
    /// Bytes one SM can keep in flight to memory at most (outstanding L1 misses; prior from Little's law on the
    /// measured copy: 4.25 TB/s x ~600 cycles / 1.83 GHz / 132 SMs ~ 11 KB needed, the hardware allows more).
    pub max_bytes_in_flight_per_sm: f64,
    /// Fraction of a DRAM latency each block barrier exposes (the pipeline drains there).
    pub barrier_exposure: f64,
    /// Cycles a global load or atomic adds to its warp's chain (prior: up to an L2 hit's ~260 cycles when each load
    /// waits for the one before; less when a loop's loads are independent and overlap).
    pub chain_global_cycles: f64,
    /// Instruction-level parallelism of a warp's dependent chain: the chain (every instruction waiting for the one
    /// before) is divided by this (prior: 1.5-3, the independent instructions nvcc interleaves).
    pub chain_ilp: f64,
    /// One host synchronisation (`cuStreamSynchronize` after a launch, for benches that time launch + sync): the
    /// median difference between the H200 router figures timed with and without it (20.6 - 12.1, 28.8 - 20.1,
    /// 70.5 - 61.6 µs: 8.5, 8.7, 8.9). Not part of a launch's time; `small4 calibrate` adds it to such rows.
    pub host_sync_s: f64,
}

impl Model {
    /// The fitted values: `small4 calibrate --fit` over the 60 predicted H200 rows, each free parameter searched over
    /// its plausible range only (launch 2-4 µs, latency 500-1000 cycles, mma.sync 0.5-0.8, barrier 0-0.4, ILP 1-3,
    /// 8-64 KiB in flight, 60-260 cycles a global load in a chain), least mean plus worst |log(predicted /
    /// measured)|. See docs/perf.md, "Timing model".
    pub const FITTED: Model = Model {
        launch_s: 3.0e-6,
        dram_latency_cycles: 1000.0,
        dram_efficiency: 0.885,
        mma_sync_efficiency: 0.5,
        max_bytes_in_flight_per_sm: 32.0 * 1024.0,
        barrier_exposure: 0.4,
        chain_ilp: 2.0,
        chain_global_cycles: 260.0,
        host_sync_s: 8.7e-6,
    };
}

/// The scalars of one launch the model reads: the interpreter's counters (`Counters`) plus the kernel's ptxas
/// registers per thread. Plain numbers, so a caller can keep them and predict again for another GPU or model.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Profile {
    /// Blocks of the grid and blocks interpreted (fewer when sampled; the per-block counts below cover these).
    pub blocks: u64,
    pub blocks_run: u64,
    pub block_threads: u32,
    /// Registers per thread (ptxas), and shared bytes per block (static + dynamic).
    pub registers: u32,
    pub shared_bytes: u32,
    pub warp_instructions: u64,
    /// Warp instructions by `Class` (indexed as `Class::ALL`).
    pub by_class: [u64; Class::ALL.len()],
    /// Sectors of every warp request (L2 traffic), distinct sectors of the launch and per block summed (DRAM).
    pub global_sectors: u64,
    pub distinct_sectors: u64,
    pub block_distinct_sectors: u64,
    pub shared_requests: u64,
    pub shared_bank_conflicts: u64,
    pub tensor_flops: u64,
    pub block_barriers: u64,
    pub async_waits: u64,
    pub async_groups_left_in_flight: u64,
    /// The longest warp chain of any block and the sum over blocks of each block's longest: non-memory cycles and
    /// global operations (`Counters::chain_cycles_max` and the rest).
    pub chain_cycles_max: u64,
    pub chain_globals_max: u64,
    pub chain_cycles_sum: u64,
    pub chain_globals_sum: u64,
}

impl Profile {
    /// The profile of a launch the interpreter counted, for a kernel of `registers` registers per thread.
    pub fn new(c: &Counters, registers: u32) -> Profile {
        Profile {
            blocks: c.blocks,
            blocks_run: c.blocks_run,
            block_threads: c.block_threads,
            registers,
            shared_bytes: c.shared_bytes,
            warp_instructions: c.warp_instructions,
            by_class: c.by_class,
            global_sectors: c.global_sectors,
            distinct_sectors: c.distinct_sectors.len(),
            block_distinct_sectors: c.block_distinct_sectors,
            shared_requests: c.shared_requests,
            shared_bank_conflicts: c.shared_bank_conflicts,
            tensor_flops: c.tensor_flops,
            block_barriers: c.block_barriers,
            async_waits: c.async_waits,
            async_groups_left_in_flight: c.async_groups_left_in_flight,
            chain_cycles_max: c.chain_cycles_max,
            chain_globals_max: c.chain_globals_max,
            chain_cycles_sum: c.chain_cycles_sum,
            chain_globals_sum: c.chain_globals_sum,
        }
    }
}

/// A launch's predicted time and the terms behind it (seconds).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prediction {
    pub seconds: f64,
    pub blocks_per_sm: u32,
    pub waves: u64,
    pub dram_s: f64,
    pub l2_s: f64,
    pub issue_s: f64,
    pub tensor_s: f64,
    pub shared_s: f64,
    /// The critical path of dependent instructions (longest warp chains, `CHAIN_CYCLES`).
    pub chain_s: f64,
    /// Launch overhead, first-load latency per wave and barrier drains: the terms added to the largest rate.
    pub exposed_s: f64,
    /// The achievable DRAM bandwidth (memory parallelism and efficiency), bytes per second.
    pub dram_bytes_per_s: f64,
}

impl Prediction {
    /// Microseconds.
    pub fn micros(&self) -> f64 {
        self.seconds * 1e6
    }
    /// The term that set the time: "dram", "l2", "issue", "tensor", "shared", "chain" or "latency".
    pub fn bound(&self) -> &'static str {
        let terms =
            [(self.dram_s, "dram"), (self.l2_s, "l2"), (self.issue_s, "issue"), (self.tensor_s, "tensor"), (self.shared_s, "shared"), (self.chain_s, "chain")];
        let (t, name) = terms.into_iter().fold((0.0, "latency"), |a, b| if b.0 > a.0 { b } else { a });
        if t < self.exposed_s {
            "latency"
        } else {
            name
        }
    }
}

/// Resident blocks per SM for `threads` per block, `registers` per thread and `shared` bytes per block (the CUDA
/// occupancy calculator's rules for sm_90: registers allocated per warp in units of 256, 1 KiB of shared memory
/// reserved per block). At least 1 (a launch that fits no SM fails on the GPU; the model still gives a figure).
pub fn blocks_per_sm(gpu: &Gpu, threads: u32, registers: u32, shared: u32) -> u32 {
    let warps = threads.div_ceil(32).max(1);
    let regs_per_warp = (registers.max(1) * 32).div_ceil(256) * 256;
    let by_regs = gpu.registers_per_sm / (regs_per_warp * warps);
    let by_shared = gpu.shared_per_sm / (shared + 1024);
    let by_threads = gpu.max_threads_per_sm / (warps * 32);
    by_regs.min(by_shared).min(by_threads).min(gpu.max_blocks_per_sm).max(1)
}

/// The predicted time of the launch `c` counted on `gpu`.
pub fn predict(c: &Profile, gpu: &Gpu, model: &Model) -> Prediction {
    let blocks = c.blocks.max(1);
    let run = c.blocks_run.max(1) as f64;
    let per_block = |x: u64| x as f64 / run;
    let warps_per_block = c.block_threads.div_ceil(32).max(1) as f64;
    let bps = blocks_per_sm(gpu, c.block_threads, c.registers, c.shared_bytes);
    let sms = gpu.sms as u64;
    let resident = (bps as u64).min(blocks.div_ceil(sms)).max(1);
    let busy_sms = blocks.min(sms) as f64;
    let waves = blocks.div_ceil(sms * bps as u64);
    // Blocks the busiest SM runs over the launch.
    let blocks_on_sm = blocks.div_ceil(sms) as f64;
    let cycle = 1.0 / gpu.clock_hz;

    // DRAM: the launch's distinct sectors; a sampled launch scales its blocks' own distinct sectors to the grid.
    let dram_sectors = if c.blocks_run < c.blocks { c.block_distinct_sectors as f64 * blocks as f64 / run } else { c.distinct_sectors as f64 };
    let dram_bytes = dram_sectors * 32.0;
    let sector_bytes_per_warp = per_block(c.global_sectors) * 32.0 / warps_per_block;
    let waits_per_warp = (per_block(c.block_barriers + c.async_waits) / warps_per_block).max(1.0);
    let depth = if c.async_waits > 0 { 1.0 + c.async_groups_left_in_flight as f64 / c.async_waits as f64 } else { 1.0 };
    let in_flight_per_warp = sector_bytes_per_warp / waits_per_warp * depth;
    let in_flight_per_sm = (in_flight_per_warp * warps_per_block * resident as f64).min(model.max_bytes_in_flight_per_sm);
    let latency_s = model.dram_latency_cycles * cycle;
    let parallel_bw = busy_sms * in_flight_per_sm / latency_s;
    let dram_bw = (gpu.dram_bytes_per_s * model.dram_efficiency).min(parallel_bw.max(1.0));
    let dram_s = dram_bytes / dram_bw;
    let l2_s = c.global_sectors as f64 * 32.0 * blocks as f64 / run / gpu.l2_bytes_per_s;

    // Issue: class-weighted dependent latency against the warps one scheduler holds.
    let instr = c.warp_instructions as f64;
    let mean_latency = if instr > 0.0 { c.by_class.iter().zip(LATENCY_CYCLES).map(|(&n, l)| n as f64 * l).sum::<f64>() / instr } else { 1.0 };
    let warps_per_scheduler = warps_per_block * resident as f64 / 4.0;
    let issue_rate = 4.0 * (warps_per_scheduler * model.chain_ilp / mean_latency).min(1.0);
    let issue_s = blocks_on_sm * per_block(c.warp_instructions) / issue_rate * cycle;
    let tensor_s = blocks_on_sm * per_block(c.tensor_flops) / (gpu.tensor_flops_per_sm_cycle * model.mma_sync_efficiency) * cycle;
    let shared_s = blocks_on_sm * per_block(c.shared_requests + c.shared_bank_conflicts) * cycle;

    let barriers_per_warp = per_block(c.block_barriers) / warps_per_block;
    let barrier_s = (blocks_on_sm / resident as f64) * barriers_per_warp * model.barrier_exposure * latency_s;
    let exposed_s = model.launch_s + waves as f64 * latency_s + barrier_s;
    // Critical path: the busiest SM runs its blocks in rounds of `resident`; each round lasts at least its longest
    // warp chain, and the last round holds the grid's longest block (e.g. a last-block reduction's serial tail).
    let rounds = (blocks_on_sm / resident as f64).ceil();
    let mean_chain = (c.chain_cycles_sum as f64 + c.chain_globals_sum as f64 * model.chain_global_cycles) / run;
    let max_chain = c.chain_cycles_max as f64 + c.chain_globals_max as f64 * model.chain_global_cycles;
    let chain_s = ((rounds - 1.0).max(0.0) * mean_chain + max_chain) / model.chain_ilp * cycle;
    let busy = dram_s.max(l2_s).max(issue_s).max(tensor_s).max(shared_s).max(chain_s);
    Prediction {
        seconds: busy + exposed_s,
        blocks_per_sm: bps,
        waves,
        dram_s,
        l2_s,
        issue_s,
        tensor_s,
        shared_s,
        chain_s,
        exposed_s,
        dram_bytes_per_s: dram_bw,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occupancy_follows_the_calculator() {
        let g = Gpu::H100_SXM;
        // 128 threads at 128 registers: 4 warps x 4096 registers = 16 Ki a block: 4 blocks.
        assert_eq!(blocks_per_sm(&g, 128, 128, 0), 4);
        // 256 threads at 32 registers: thread limit 8.
        assert_eq!(blocks_per_sm(&g, 256, 32, 0), 8);
        // 96 KiB of shared memory: 2 blocks (228 KiB / 97 KiB).
        assert_eq!(blocks_per_sm(&g, 128, 32, 96 * 1024), 2);
        assert_eq!(Gpu::by_name("H100"), Some(Gpu::H100_SXM));
        assert_eq!(Gpu::by_name("h200").map(|g| g.dram_bytes_per_s), Some(4.8e12));
        assert!(Gpu::by_name("a100").is_none());
    }

    #[test]
    fn a_streaming_launch_is_bandwidth_bound_and_scales_with_bytes() {
        let stream = |mb: u64| {
            let mut c = Counters { kernel: "copy".into(), blocks: 1056, blocks_run: 1056, block_threads: 256, ..Counters::default() };
            let sectors = mb * 1_000_000 / 32;
            for s in 0..sectors {
                c.distinct_sectors.insert(s);
            }
            c.global_sectors = sectors;
            c.global_requests = sectors / 4;
            c.warp_instructions = sectors / 2;
            c.by_class[Class::GlobalMemory as usize] = sectors / 4;
            c.by_class[Class::Integer as usize] = sectors / 4;
            predict(&Profile::new(&c, 32), &Gpu::H200, &Model::FITTED)
        };
        let (small, big) = (stream(100), stream(200));
        assert_eq!(big.bound(), "dram");
        let slope = (big.seconds - small.seconds) / 100e6;
        assert!((slope * Gpu::H200.dram_bytes_per_s * Model::FITTED.dram_efficiency - 1.0).abs() < 1e-9);
        // The H100's slower HBM gives a longer time for the same counters.
        let mut c = Counters { kernel: "copy".into(), blocks: 1, blocks_run: 1, block_threads: 32, ..Counters::default() };
        c.distinct_sectors.insert(0);
        let p = predict(&Profile::new(&c, 32), &Gpu::H100_SXM, &Model::FITTED);
        assert!(p.seconds.is_finite() && p.seconds >= Model::FITTED.launch_s);
    }
}
