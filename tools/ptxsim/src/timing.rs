//! Predicted GPU time of one launch from what the interpreter counted: an analytical model in the spirit of the
//! MWP-CWP model (Hong and Kim, ISCA 2009), not a cycle-by-cycle simulator.
//!
//! The launch is the maximum of six rates, plus the costs that do not overlap:
//!
//! - **DRAM**: the launch's distinct 32-byte sectors (`Counters::distinct_sectors`: what L2 does not keep from a
//!   second read) over the achievable bandwidth; none when the launch's data are already in L2
//!   ([`Profile::l2_resident`]), less the sectors an earlier launch left in L2 ([`Profile::l2_hit_sectors`], from the
//!   cross-launch residency model [`crate::l2::L2Residency`] where the caller runs it), plus the sectors its L2
//!   prefetches fetch ([`Profile::prefetch_sectors`], fire-and-forget at a per-SM in-flight cap; the launch's own
//!   sectors it prefetched before loading them, [`Profile::prefetched_load_sectors`], move the same way and their
//!   loads on the dependence chain wait an L2 hit). That bandwidth is the datasheet figure times the copy efficiency, or less when the
//!   resident warps keep too few bytes in flight: by Little's law an SM moves at most `bytes in flight / latency`.
//!   Bytes in flight per warp = its sectors over the memory round trips the block's longest dependence chain waits
//!   for (below), capped by what one SM can keep outstanding (the memory warp parallelism, MWP).
//! - **L2**: every warp request's sectors (`global_sectors`, re-reads included) over the chip's L2 bandwidth, or over
//!   the busiest SM's L2 port ([`Gpu::sm_l2_bytes_per_cycle`]) when few SMs load.
//! - **Issue**: warp instructions of the busiest SM over its 4 schedulers, each issuing one instruction a cycle, a
//!   warp at most one a cycle (fewer than 4 resident warps use fewer schedulers).
//! - **Critical path**: a block lasts at least its longest warp's dependence chain, which the interpreter follows
//!   instruction by instruction (`counters::BlockChains`): within a basic block instructions start when their source
//!   registers are ready (ptxas hoists loads ahead of their uses), a branch, barrier or copy wait issues after
//!   everything before it, results arrive [`CHAIN_CYCLES`] later, global loads a memory latency later (an L2 hit's
//!   [`CHAIN_GLOBAL_CYCLES`] when the data are in L2, the model's DRAM latency otherwise). So a loop of independent
//!   loads costs one latency per iteration and a load that depends on another waits for it. The busiest SM runs its
//!   blocks in rounds of the resident count, the last round holding the grid's longest block (a last-block
//!   reduction's serial tail).
//! - **Tensor cores**: the busiest SM's tensor FLOPs, each kind at its own rate: `mma.sync` at the dense 16-bit rate
//!   times the `mma.sync` efficiency, `wgmma` at the dense rate of its input width (16-bit, or 8-bit at twice that)
//!   times the wgmma efficiency ([`Model::wgmma_efficiency`]); and **shared memory** (one wavefront per cycle per
//!   SM, bank conflicts included).
//!
//! The asynchronous copy engines (TMA `cp.async.bulk.tensor`, `cp.async.bulk`) move whole boxes for one issuing
//! thread: their sectors (`Counters::async_copy_sectors`) count as L2 traffic and join the distinct sectors (DRAM),
//! but cost no per-lane issue, and their bytes in flight are bounded by the shared memory they land in (the ring of
//! stages a producer keeps filling), not by the L1 miss tracking that caps the lanes' loads (MWP).
//!
//! Not overlapped: a launch overhead per kernel, and one memory latency per wave of blocks (a block's first load
//! has nothing to hide behind) plus the barriers of the busiest SM's blocks, each exposing a fraction of a memory
//! latency (the pipeline drains at a block barrier). The launch overhead is a host launch's (`Model::launch_s`,
//! fitted on benches that launch one kernel at a time); a decode step replayed as a CUDA graph pays a node's cost
//! instead, less for a programmatic launch, plus one replay a step ([`Prediction::in_graph_seconds`],
//! [`graph_step_seconds`]; priors, not fitted); a programmatic launch also overlaps the launch before with what its
//! threads load before their `griddepcontrol.wait` ([`pdl_overlap_seconds`]).
//!
//! Blocks per SM come from the ptxas resources (registers, shared memory) and the launch (threads, dynamic shared
//! memory), as the CUDA occupancy calculator does. Sampled launches (`Machine::block_sample`) are scaled up to the
//! grid: per-block counts are the sampled blocks' averages, and DRAM bytes are each sampled block's own distinct
//! sectors scaled to the grid (`Counters::block_distinct_sectors`: no L2 reuse between blocks is credited, an upper
//! bound where blocks share data, e.g. the weights of a prefill expert read by several row tiles).
//!
//! Every parameter is in [`Gpu`] (per device), [`CHAIN_CYCLES`], [`CHAIN_GLOBAL_CYCLES`] or [`Model`] (the fitted
//! ones), each documented with its source. Input: a [`Profile`] (the counters' scalars and the kernel's registers).

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
    /// Bytes one SM takes in from L2 per cycle at most (its L2 read port: 64 B/cycle, two 32-byte sectors, the
    /// figure usually quoted for Ampere and Hopper SMs; the whole-chip L2 bandwidth above is less than SMs x this,
    /// so the port binds only when few SMs load, e.g. a small grid's combine kernel).
    pub sm_l2_bytes_per_cycle: f64,
    /// L2 capacity, bytes: 50 MB on the H100 SXM5 and PCIe (NVIDIA H100 Tensor Core GPU Architecture whitepaper,
    /// 2022: "50 MB L2 cache" of the full GH100's 60 MB); the H200 is the same GH100 die with HBM3e (NVIDIA H200
    /// datasheet: only memory capacity and bandwidth change), so 50 MB too. The cross-launch residency model
    /// ([`crate::l2::L2Residency`]) and `small4 calibrate`'s per-row residency use it.
    pub l2_bytes: f64,
    /// Dense bf16 tensor-core FLOPs per SM per cycle (whitepaper: 1024 FMA/cycle/SM for 16-bit inputs with wgmma).
    pub tensor_flops_per_sm_cycle: f64,
    /// Dense 8-bit (e4m3 / e5m2) tensor-core FLOPs per SM per cycle: twice the 16-bit rate (H100 SXM datasheet:
    /// 1,979 dense fp8 TFLOP/s = 132 SMs x 8192 FLOP/cycle x 1.83 GHz, against 989 for bf16).
    pub tensor_8bit_flops_per_sm_cycle: f64,
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
        sm_l2_bytes_per_cycle: 64.0,
        l2_bytes: 50.0 * 1024.0 * 1024.0,
        tensor_flops_per_sm_cycle: 4096.0,
        tensor_8bit_flops_per_sm_cycle: 8192.0,
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

/// Cycles after its start at which an instruction of each class (indexed as `Class::ALL`) has its result, on its
/// warp's dependence chain (`counters::BlockChains`, `Counters::chain_cycles_max`). Source: Luo et al.,
/// "Benchmarking and Dissecting the Nvidia Hopper GPU Architecture" (IPDPS 2024) and Jia et al.'s earlier
/// Volta/Turing dissections: ~4 cycles for fp32/int32 ALU, 6 for conversions, ~30 for shared-memory loads and
/// mma.sync, ~24 for a shuffle; a block barrier resumes its warps ~20 cycles after the last arrival. Global loads and
/// atomics with a result are counted apart (`chain_globals_max`) and weighed by a memory latency in [`predict`];
/// async copies are issue-only here (their completion is what a `cp.async.wait_group` waits for). Integers, so the
/// counter stays exact.
pub const CHAIN_CYCLES: [u64; Class::ALL.len()] = [4, 4, 6, 2, 4, 0, 30, 4, 0, 1, 20, 24, 30];

/// Bytes of an L2 line (Hopper: 128-byte lines of four 32-byte sectors): what `prefetch.global.L2 [a]` fetches and
/// the unit the cross-launch residency model ([`crate::l2::L2Residency`]) allocates.
pub const L2_LINE_BYTES: u64 = 128;

/// An L2 hit's latency on Hopper (~260 cycles, Luo et al. 2024): the weight of one global load when the counters
/// pick a block's longest warp chain, and its cost in the chain of a launch whose data are in L2
/// ([`Profile::l2_resident`]); a launch reading DRAM pays the model's `dram_latency_cycles` instead.
pub const CHAIN_GLOBAL_CYCLES: u64 = 260;

/// The model's free parameters, fitted on the H200 calibration set (`small4 calibrate`): few, each physical.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Model {
    /// Host-to-GPU launch overhead per kernel, seconds, for launches issued back to back (prior: 2-4 µs on Hopper).
    pub launch_s: f64,
    /// Loaded DRAM latency, cycles: what a global load costs on a warp's dependence chain when its data are not in L2,
    /// and the latency of Little's law in the DRAM term (prior: ~480 unloaded on H800 per Luo et al. 2024; more
    /// under load).
    pub dram_latency_cycles: f64,
    /// Fraction of the datasheet DRAM bandwidth a streaming kernel reaches (measured: 4.25 / 4.8 TB/s copy on the
    /// H200, `.gpu/ceilings.py`, docs/perf.md).
    pub dram_efficiency: f64,
    /// Fraction of the dense tensor rate `mma.sync` reaches on Hopper (wgmma reaches the datasheet rate; Luo et al.
    /// 2024 report mma.sync well below it; measured here: 800 TFLOP/s bf16 by torch vs 989 peak).
    pub mma_sync_efficiency: f64,
    /// Fraction of the dense tensor rate of its input width that `wgmma.mma_async` reaches in a well-fed kernel. Not
    /// fitted (no wgmma kernel measured here yet): the anchors of issue 17 on the H100 SXM, all wgmma + TMA kernels,
    /// reach 0.75-0.82 of the 989 TFLOP/s bf16 peak: DeepGEMM's grouped GEMM 809-814 TFLOP/s bf16 (0.82),
    /// FlashAttention-3 738-757 (Shah et al. 2024, 0.75-0.77), fast.cu and ThunderKittens ~770 (0.78). DeepGEMM's fp8
    /// 1,398-1,416 of 1,979 (0.71) includes its promotion of the fp8 accumulators on the CUDA cores, which the
    /// interpreter counts as instructions, so the 8-bit rate takes the same fraction.
    pub wgmma_efficiency: f64,
    /// Bytes one SM can keep in flight to memory at most (outstanding L1 misses; prior from Little's law on the
    /// measured copy: 4.25 TB/s x ~600 cycles / 1.83 GHz / 132 SMs ~ 11 KB needed, the hardware allows more).
    pub max_bytes_in_flight_per_sm: f64,
    /// Fraction of a DRAM latency each block barrier exposes (the pipeline drains there).
    pub barrier_exposure: f64,
    /// One host synchronisation (`cuStreamSynchronize` after a launch, for benches that time launch + sync): the
    /// median difference between the H200 router figures timed with and without it (20.6 - 12.1, 28.8 - 20.1,
    /// 70.5 - 61.6 µs: 8.5, 8.7, 8.9). Not part of a launch's time; `small4 calibrate` adds it to such rows.
    pub host_sync_s: f64,
    /// A kernel node's launch cost inside a replayed CUDA graph, seconds: what the `launch_s` of a host launch
    /// becomes once the driver submits the whole step at once (no host work per kernel; the GPU front end still
    /// starts the node after its predecessor drained). Prior, not fitted (no graph measured here yet): a chain of
    /// no-op kernels replayed as a graph cost ~0.58 µs a node against ~6.4 µs a host launch + sync (RTX 5070 Ti,
    /// CUDA 13.3, ahrefs/ocannl#488; the NVIDIA blog "Getting Started with CUDA Graphs" reports the same order on
    /// V100). tools/gpu/run.sh's bench with and without programmatic launches measures it on the first lease.
    pub graph_node_s: f64,
    /// The same node launched programmatically (Hopper's programmatic dependent launch: the attribute
    /// `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION` and `griddepcontrol.wait` in the kernel): its blocks are
    /// scheduled while the predecessor finishes and wait at `griddepcontrol.wait`, so what is left is the wait's
    /// release after the predecessor's completion and memory flush. Prior, not fitted: llama.cpp's programmatic
    /// launches (ggml-org/llama.cpp#22522) took gpt-oss 20B token generation from 332 to 376 tokens/s on Hopper
    /// with its CUDA graphs already on, ~0.35 ms a token over some hundreds of kernels: most of a node's cost.
    pub pdl_node_s: f64,
    /// The fixed cost of one graph replay and the host synchronisation that reads its result (`cuGraphLaunch` +
    /// `cuStreamSynchronize`), seconds, once per decode step. Prior, not fitted: ~15 µs fixed in the graph-replay
    /// measurement cited for `graph_node_s` (19.4 µs for 8 nodes, 82.9 µs for 117 at 0.58 µs a node).
    pub graph_replay_s: f64,
}

impl Model {
    /// The fitted values: `small4 calibrate --fit` over the 60 predicted H200 rows, each free parameter searched over
    /// its plausible range only (launch 2-4 µs, loaded DRAM latency 500-1000 cycles, mma.sync 0.5-0.8, barrier
    /// 0-0.4, 8-64 KiB in flight), least mean plus worst |log(predicted / measured)|. See docs/perf.md, "Timing
    /// model".
    pub const FITTED: Model = Model {
        launch_s: 3.5e-6,
        dram_latency_cycles: 600.0,
        dram_efficiency: 0.885,
        mma_sync_efficiency: 0.5,
        wgmma_efficiency: 0.8,
        max_bytes_in_flight_per_sm: 32.0 * 1024.0,
        barrier_exposure: 0.4,
        host_sync_s: 8.7e-6,
        graph_node_s: 0.6e-6,
        pdl_node_s: 0.2e-6,
        graph_replay_s: 15e-6,
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
    /// Tensor FLOPs: all of them (`mma.sync` and `wgmma`), those of `wgmma`, and those of `wgmma` with 8-bit inputs.
    pub tensor_flops: u64,
    pub wgmma_flops: u64,
    pub wgmma_8bit_flops: u64,
    /// Sectors moved by the asynchronous copy engines (TMA, `cp.async.bulk`): L2 traffic besides `global_sectors`.
    pub async_copy_sectors: u64,
    pub block_barriers: u64,
    pub async_waits: u64,
    pub async_groups_left_in_flight: u64,
    /// The longest warp chain of any block and the sum over blocks of each block's longest: non-memory cycles and
    /// global operations (`Counters::chain_cycles_max` and the rest).
    pub chain_cycles_max: u64,
    pub chain_globals_max: u64,
    pub chain_cycles_sum: u64,
    pub chain_globals_sum: u64,
    /// Whether the launch's data are in L2 when it starts: a call repeated back to back whose footprint fits L2 (a
    /// bench loop), or data the launch before just wrote. Then its loads cost an L2 hit ([`CHAIN_GLOBAL_CYCLES`]) and
    /// L2 bandwidth, not DRAM's. False (cold, DRAM) unless the caller knows better.
    pub l2_resident: bool,
    /// Of `distinct_sectors`, those L2 held when the launch started, as the cross-launch residency model says
    /// ([`crate::l2::L2Residency`], fed launch by launch by the caller; 0 when it is not run: cold). They are L2
    /// hits: the model takes them off the DRAM bytes (they stay in the L2 term) and weighs the launch's memory
    /// latency by the fraction of its sectors they are.
    pub l2_hit_sectors: u64,
    /// Distinct sectors the launch prefetched into L2 (`Counters::prefetch_sectors`) that it does not load or store
    /// itself, and how many of those L2 held already: the rest is DRAM traffic of this launch, issued fire-and-forget.
    pub prefetch_sectors: u64,
    pub prefetch_l2_hit_sectors: u64,
    /// Sectors of the loads the launch's threads issue before their `griddepcontrol.wait` (`Counters::
    /// pre_wait_sectors`), and the interpreted blocks that issue any (`Counters::pre_wait_blocks`): under
    /// programmatic launch they run while the grid before still does ([`pdl_overlap_seconds`]).
    pub pre_wait_sectors: u64,
    pub pre_wait_blocks: u64,
    /// Of `distinct_sectors`, those the launch's loads read after an L2 prefetch of the same launch had asked for them
    /// (`Counters::prefetched_loads`: a decode GEMM warp's own k range, prefetched before its wait). Their DRAM bytes
    /// are moved by the prefetch (fire-and-forget, at the prefetches' parallelism, not the loads' Little's law), and
    /// the loads on the dependence chain wait an L2 hit for them ([`CHAIN_GLOBAL_CYCLES`]): the DRAM term still
    /// bounds the launch, so a load cannot find L2 sooner than HBM delivers the bytes.
    pub prefetched_load_sectors: u64,
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
            wgmma_flops: c.wgmma_flops,
            wgmma_8bit_flops: c.wgmma_8bit_flops,
            async_copy_sectors: c.async_copy_sectors,
            block_barriers: c.block_barriers,
            async_waits: c.async_waits,
            async_groups_left_in_flight: c.async_groups_left_in_flight,
            chain_cycles_max: c.chain_cycles_max,
            chain_globals_max: c.chain_globals_max,
            chain_cycles_sum: c.chain_cycles_sum,
            chain_globals_sum: c.chain_globals_sum,
            l2_resident: false,
            l2_hit_sectors: 0,
            prefetch_sectors: c.prefetch_sectors.without(&c.distinct_sectors).len(),
            prefetch_l2_hit_sectors: 0,
            pre_wait_sectors: c.pre_wait_sectors,
            pre_wait_blocks: c.pre_wait_blocks,
            prefetched_load_sectors: c.prefetched_loads.len(),
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
    /// The launch overhead inside `exposed_s` (the model's `launch_s`: a host launch), which a replayed graph
    /// replaces with its node cost ([`Prediction::in_graph_seconds`]).
    pub launch_s: f64,
    /// The achievable DRAM bandwidth (memory parallelism and efficiency), bytes per second.
    pub dram_bytes_per_s: f64,
    /// Bytes the launch finds in L2 instead of DRAM: its sectors resident when it starts (`Profile::l2_hit_sectors`
    /// and prefetched ones, scaled to the grid), all of them when `Profile::l2_resident`.
    pub l2_hit_bytes: f64,
    /// DRAM bytes of the launch's L2 prefetches (within the DRAM term).
    pub prefetch_dram_bytes: f64,
    /// All the launch's DRAM bytes (its own and its prefetches', at `dram_s`).
    pub dram_bytes: f64,
    /// The memory latency of the launch's first load, exposed once per wave (within `exposed_s`).
    pub first_load_latency_s: f64,
    /// Blocks resident on the busiest SM (at most `blocks_per_sm`).
    pub resident_per_sm: u64,
    /// DRAM bytes of the loads the launch issues before its `griddepcontrol.wait` (scaled to the grid; none of
    /// what L2 holds), and whether every block issues such loads: its first wave's first round trip is then in
    /// flight before the wait ([`pdl_overlap_seconds`]).
    pub pre_wait_dram_bytes: f64,
    pub every_block_loads_before_wait: bool,
}

impl Prediction {
    /// Microseconds.
    pub fn micros(&self) -> f64 {
        self.seconds * 1e6
    }
    /// The launch's time as a node of a replayed CUDA graph: its host launch overhead replaced by the graph node's
    /// cost, `model.pdl_node_s` when it was launched programmatically, `model.graph_node_s` otherwise. (The
    /// replay's fixed cost is the step's, not a node's: [`graph_step_seconds`].)
    pub fn in_graph_seconds(&self, model: &Model, programmatic: bool) -> f64 {
        let node_s = if programmatic { model.pdl_node_s } else { model.graph_node_s };
        self.seconds - self.launch_s + node_s
    }
}

/// A decode step replayed as one CUDA graph: the replay's fixed cost (launch and the host synchronisation that
/// reads the sampled tokens) plus each node's time in the graph. `nodes`: each launch's prediction and whether it
/// was launched programmatically.
pub fn graph_step_seconds<'a>(nodes: impl IntoIterator<Item = (&'a Prediction, bool)>, model: &Model) -> f64 {
    model.graph_replay_s + nodes.into_iter().map(|(p, programmatic)| p.in_graph_seconds(model, programmatic)).sum::<f64>()
}

impl Prediction {
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

impl Profile {
    /// The profile of a whole persistent walk from this one, the counters of a window of it (not sampled: every
    /// block of the persistent grid ran, over its first tiles), and the walk is `windows` such windows one after
    /// another (at least 1). Priced as a sampled launch of `windows` x the grid's blocks of which the grid's ran: instructions, FLOPs and
    /// sectors scale by `windows`, the busiest SM runs `windows` rounds of the window's chains (the later ones at the
    /// window's mean), and the DRAM bytes are the window's distinct sectors `windows` times. That last is the point of
    /// a window: the tiles it runs at once share data through L2 (a slot group's activation rows, read by its
    /// feature tiles together), which a sample of a few blocks, each walking tiles a grid apart, counts once per
    /// tile; tiles of different windows are taken to share nothing. Each window is also charged a wave's exposed
    /// first-load latency (the walk's next tile is in fact fetched while the last one finishes: an over-charge of
    /// about a DRAM latency a window).
    pub fn walked(&self, windows: f64) -> Profile {
        if windows <= 1.0 {
            return *self;
        }
        Profile {
            blocks: ((self.blocks as f64 * windows).round() as u64).max(self.blocks),
            blocks_run: self.blocks_run,
            block_distinct_sectors: self.distinct_sectors,
            ..*self
        }
    }

    /// Counts of the interpreted blocks times this: the grid's (1 unless sampled).
    fn grid_scale(&self) -> f64 {
        if self.blocks_run < self.blocks {
            self.blocks as f64 / self.blocks_run.max(1) as f64
        } else {
            1.0
        }
    }

    /// The bytes of the launch's own loads and stores if nothing was in L2 before it: its distinct sectors; a sampled
    /// launch scales its blocks' own distinct sectors to the grid.
    fn cold_own_bytes(&self) -> f64 {
        let sectors = if self.blocks_run < self.blocks { self.block_distinct_sectors as f64 * self.grid_scale() } else { self.distinct_sectors as f64 };
        sectors * 32.0
    }

    /// The part of [`Profile::cold_own_bytes`] L2 holds (`l2_hit_sectors`; a sampled launch's run blocks' hit fraction
    /// applied to the grid).
    fn own_hit_bytes(&self) -> f64 {
        let hits = self.l2_hit_sectors.min(self.distinct_sectors);
        if self.blocks_run < self.blocks {
            self.cold_own_bytes() * hits as f64 / self.distinct_sectors.max(1) as f64
        } else {
            hits as f64 * 32.0
        }
    }

    /// Of the launch's own distinct sectors, the fraction L2 held when it started (1 when `l2_resident`).
    pub fn l2_hit_fraction(&self) -> f64 {
        if self.l2_resident {
            1.0
        } else {
            self.l2_hit_sectors.min(self.distinct_sectors) as f64 / self.distinct_sectors.max(1) as f64
        }
    }

    /// DRAM bytes of the launch's prefetches: its prefetched sectors not resident and not its own, scaled to the grid.
    pub fn prefetch_dram_bytes(&self) -> f64 {
        self.prefetch_sectors.saturating_sub(self.prefetch_l2_hit_sectors) as f64 * 32.0 * self.grid_scale()
    }

    /// Bytes the launch's loads, stores and prefetches find in L2 when it starts (`l2_hit_sectors`,
    /// `prefetch_l2_hit_sectors`, scaled to the grid). Not `l2_resident`'s (see [`Prediction::l2_hit_bytes`]).
    pub fn l2_hit_bytes(&self) -> f64 {
        self.own_hit_bytes() + self.prefetch_l2_hit_sectors.min(self.prefetch_sectors) as f64 * 32.0 * self.grid_scale()
    }

    /// The launch's DRAM bytes: its distinct sectors (a sampled launch scales its blocks' own distinct sectors to the
    /// grid) less those L2 held when it started (`l2_hit_sectors`: 0 unless the caller runs the residency model),
    /// plus its prefetches' ([`Profile::prefetch_dram_bytes`]). `l2_resident` is not applied here.
    pub fn dram_bytes(&self) -> f64 {
        self.own_dram_bytes() + self.prefetch_dram_bytes()
    }

    /// The DRAM bytes of the launch's own loads and stores: [`Profile::dram_bytes`] without the prefetches.
    fn own_dram_bytes(&self) -> f64 {
        self.cold_own_bytes() - self.own_hit_bytes()
    }
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

    // A global load waits a DRAM latency, or an L2 hit's when the launch's data are in L2: the mean over its sectors
    // (all of them hits when `l2_resident`, the resident fraction under the cross-launch residency model). A warp
    // whose request mixes hits and misses waits for the miss, so this under-prices mixed requests; the launches
    // the model credits are mostly all-hit (an activation written by the launch before) or all-miss (weights).
    let hit_fraction = c.l2_hit_fraction();
    let memory_latency_cycles = hit_fraction * CHAIN_GLOBAL_CYCLES as f64 + (1.0 - hit_fraction) * model.dram_latency_cycles;
    let latency_s = memory_latency_cycles * cycle;
    // Of the sectors L2 did not hold, those the launch prefetched itself before loading them: L2 hits for the loads
    // on the dependence chain (the first load of a block and the lanes' other loads still wait the latency above).
    let own_prefetched_fraction = if c.l2_resident { 0.0 } else { c.prefetched_load_sectors.min(c.distinct_sectors) as f64 / c.distinct_sectors.max(1) as f64 };
    let chain_hit_fraction = hit_fraction + (1.0 - hit_fraction) * own_prefetched_fraction;
    let chain_latency_cycles = chain_hit_fraction * CHAIN_GLOBAL_CYCLES as f64 + (1.0 - chain_hit_fraction) * model.dram_latency_cycles;
    // DRAM: the launch's distinct sectors (none when L2 holds them: the L2 term covers those reads), split between
    // the lanes' requests and the async copy engines in proportion to their sectors. The lanes' bytes in flight per
    // warp (Little's law): its sectors over the round trips the block's longest chain waits for (the loads its
    // critical path waits on: a loop whose loads overlap waits once per iteration, a cp.async pipeline once per
    // `wait_group` of the oldest group), capped per SM (MWP). The copy engines keep at most the blocks' shared memory
    // in flight (what their copies land in). Both share the HBM: the time is the larger of all bytes at the
    // achievable bandwidth and each part at its own parallelism's.
    // Sectors L2 holds when the launch starts (`l2_hit_sectors`) are not DRAM bytes. Prefetches (fire-and-forget:
    // nothing waits for them, so no dependence chain) add their non-resident sectors at a parallelism of their own:
    // each SM running blocks keeps at most its outstanding-miss budget in flight, over a DRAM latency.
    // The launch's own bytes it prefetched itself move as prefetches do; the rest is split as before.
    let (own_dram_bytes, prefetch_dram_bytes) = if c.l2_resident { (0.0, 0.0) } else { (c.own_dram_bytes(), c.prefetch_dram_bytes()) };
    let dram_bytes = own_dram_bytes + prefetch_dram_bytes;
    let own_prefetched_dram_bytes = own_dram_bytes * own_prefetched_fraction;
    let loaded_dram_bytes = own_dram_bytes - own_prefetched_dram_bytes;
    let async_share = c.async_copy_sectors as f64 / (c.global_sectors + c.async_copy_sectors).max(1) as f64;
    let (async_dram_bytes, lane_dram_bytes) = (loaded_dram_bytes * async_share, loaded_dram_bytes * (1.0 - async_share));
    let sector_bytes_per_warp = per_block(c.global_sectors) * 32.0 / warps_per_block;
    let round_trips_per_warp = per_block(c.chain_globals_sum).max(1.0);
    let in_flight_per_warp = sector_bytes_per_warp / round_trips_per_warp;
    let in_flight_per_sm = (in_flight_per_warp * warps_per_block * resident as f64).min(model.max_bytes_in_flight_per_sm);
    let parallel_bw = (busy_sms * in_flight_per_sm / latency_s).max(1.0);
    let async_in_flight_per_sm = (per_block(c.async_copy_sectors) * 32.0).min(c.shared_bytes as f64) * resident as f64;
    let async_parallel_bw = (busy_sms * async_in_flight_per_sm / latency_s).max(1.0);
    let achievable_bw = gpu.dram_bytes_per_s * model.dram_efficiency;
    let prefetch_parallel_bw = busy_sms * model.max_bytes_in_flight_per_sm / (model.dram_latency_cycles * cycle);
    let dram_s = (dram_bytes / achievable_bw)
        .max(lane_dram_bytes / parallel_bw)
        .max(async_dram_bytes / async_parallel_bw)
        .max((prefetch_dram_bytes + own_prefetched_dram_bytes) / prefetch_parallel_bw);
    let dram_bw = if dram_s > 0.0 { dram_bytes / dram_s } else { achievable_bw.min(parallel_bw) };
    // L2: every request's and async copy's sectors over the chip's L2 bandwidth, or over the busiest SM's L2 port
    // when few SMs load.
    let l2_sectors = c.global_sectors + c.async_copy_sectors;
    let chip_l2_s = l2_sectors as f64 * 32.0 * blocks as f64 / run / gpu.l2_bytes_per_s;
    let sm_port_s = blocks_on_sm * per_block(l2_sectors) * 32.0 / gpu.sm_l2_bytes_per_cycle * cycle;
    let l2_s = chip_l2_s.max(sm_port_s);

    // Issue: 4 schedulers, each issuing one instruction a cycle from its warps, a warp at most one a cycle. (How
    // fast a warp can issue given its dependences is the critical-path term's business, not this one's.)
    let issue_rate = (warps_per_block * resident as f64).min(4.0);
    let issue_s = blocks_on_sm * per_block(c.warp_instructions) / issue_rate * cycle;
    // Tensor cores: each kind of tensor FLOP at its rate (mma.sync; wgmma with 16-bit and with 8-bit inputs).
    let mma_sync_flops = c.tensor_flops.saturating_sub(c.wgmma_flops) as f64;
    let wgmma_16bit_flops = c.wgmma_flops.saturating_sub(c.wgmma_8bit_flops) as f64;
    let tensor_cycles = mma_sync_flops / (gpu.tensor_flops_per_sm_cycle * model.mma_sync_efficiency)
        + wgmma_16bit_flops / (gpu.tensor_flops_per_sm_cycle * model.wgmma_efficiency)
        + c.wgmma_8bit_flops as f64 / (gpu.tensor_8bit_flops_per_sm_cycle * model.wgmma_efficiency);
    let tensor_s = blocks_on_sm * tensor_cycles / run * cycle;
    let shared_s = blocks_on_sm * per_block(c.shared_requests + c.shared_bank_conflicts) * cycle;

    let barriers_per_warp = per_block(c.block_barriers) / warps_per_block;
    let barrier_s = (blocks_on_sm / resident as f64) * barriers_per_warp * model.barrier_exposure * latency_s;
    let exposed_s = model.launch_s + waves as f64 * latency_s + barrier_s;
    // Critical path: the busiest SM runs its blocks in rounds of `resident`; each round lasts at least its longest
    // warp chain, and the last round holds the grid's longest block (e.g. a last-block reduction's serial tail).
    let rounds = (blocks_on_sm / resident as f64).ceil();
    let mean_chain = (c.chain_cycles_sum as f64 + c.chain_globals_sum as f64 * chain_latency_cycles) / run;
    let max_chain = c.chain_cycles_max as f64 + c.chain_globals_max as f64 * chain_latency_cycles;
    let chain_s = ((rounds - 1.0).max(0.0) * mean_chain + max_chain) * cycle;
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
        launch_s: model.launch_s,
        dram_bytes_per_s: dram_bw,
        l2_hit_bytes: if c.l2_resident { c.cold_own_bytes() + c.prefetch_sectors as f64 * 32.0 * c.grid_scale() } else { c.l2_hit_bytes() },
        prefetch_dram_bytes,
        dram_bytes,
        first_load_latency_s: latency_s,
        resident_per_sm: resident,
        pre_wait_dram_bytes: if c.l2_resident { 0.0 } else { (c.pre_wait_sectors as f64 * 32.0 * c.grid_scale() * (1.0 - hit_fraction)).min(dram_bytes) },
        every_block_loads_before_wait: c.pre_wait_blocks > 0 && c.pre_wait_blocks >= c.blocks_run,
    }
}

/// What a programmatic launch's time as a graph node (`this_s`, [`Prediction::in_graph_seconds`]) loses to the
/// launch before it (`previous`, which took `previous_s` in the graph) still running, seconds: with programmatic
/// dependent launch the grid's blocks start once every block of the previous grid has passed its trigger (ours
/// trigger right after their wait), and run up to their own `griddepcontrol.wait`; the loads they issue there (a
/// decode GEMM's first turn of its weight ring, `Profile::pre_wait_sectors`) overlap the previous grid. Two gains,
/// both only when the previous grid leaves room on its SMs (one wave, fewer blocks resident than fit: the new
/// blocks can be resident beside it; the rule is the model's assumption, not measured):
/// - the first round trip: when every block loads before its wait, the first wave's exposed memory latency
///   (`first_load_latency_s`) is spent before the wait's release, after which the first loads of what the previous
///   grid wrote cost an L2 hit's latency ([`CHAIN_GLOBAL_CYCLES`]);
/// - the pre-wait bytes (`pre_wait_dram_bytes`) move while HBM is idle under the previous grid: at most its graph
///   time less its own DRAM bytes at the achievable bandwidth.
///
/// The launch keeps at least the node cost and the DRAM time of the bytes not moved early. Priors from the PTX ISA's
/// `griddepcontrol` semantics and CUDA's programmatic stream serialization; no GPU has timed it here.
pub fn pdl_overlap_seconds(gpu: &Gpu, model: &Model, previous: &Prediction, previous_s: f64, this: &Prediction, this_s: f64) -> f64 {
    let room_beside_previous = previous.waves <= 1 && previous.resident_per_sm < previous.blocks_per_sm as u64;
    if !room_beside_previous || (this.pre_wait_dram_bytes <= 0.0 && !this.every_block_loads_before_wait) {
        return 0.0;
    }
    let cycle = 1.0 / gpu.clock_hz;
    let latency_s = if this.every_block_loads_before_wait { (this.first_load_latency_s - CHAIN_GLOBAL_CYCLES as f64 * cycle).max(0.0) } else { 0.0 };
    let bandwidth = gpu.dram_bytes_per_s * model.dram_efficiency;
    let idle_s = (previous_s - previous.dram_bytes / bandwidth).max(0.0);
    let moved_bytes = this.pre_wait_dram_bytes.min(idle_s * bandwidth);
    let floor_s = model.pdl_node_s + (this.dram_bytes - moved_bytes).max(0.0) / bandwidth;
    (latency_s + moved_bytes / bandwidth).min((this_s - floor_s).max(0.0))
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

    /// A launch on few SMs whose loads wait one round trip each: L2-resident data cost L2 hits on the chain and no
    /// DRAM time; cold data cost the DRAM latency; and the busiest SM's L2 port bounds its bytes.
    #[test]
    fn residency_sets_the_chain_latency_and_the_port_bounds_few_sms() {
        let c = Profile {
            blocks: 4,
            blocks_run: 4,
            block_threads: 256,
            registers: 32,
            warp_instructions: 4 * 8 * 1000,
            global_sectors: 4 * 8 * 1000 * 16,
            distinct_sectors: 4 * 8 * 1000 * 16,
            block_distinct_sectors: 4 * 8 * 1000 * 16,
            chain_cycles_max: 10_000,
            chain_globals_max: 100,
            chain_cycles_sum: 4 * 10_000,
            chain_globals_sum: 4 * 100,
            ..Profile::default()
        };
        let (gpu, model) = (Gpu::H200, Model::FITTED);
        let cold = predict(&c, &gpu, &model);
        let warm = predict(&Profile { l2_resident: true, ..c }, &gpu, &model);
        let cycle = 1.0 / gpu.clock_hz;
        assert!((cold.chain_s - (10_000.0 + 100.0 * model.dram_latency_cycles) * cycle).abs() < 1e-12);
        assert!((warm.chain_s - (10_000.0 + 100.0 * CHAIN_GLOBAL_CYCLES as f64) * cycle).abs() < 1e-12);
        assert_eq!(warm.dram_s, 0.0);
        assert!(cold.dram_s > 0.0 && warm.seconds < cold.seconds);
        // One block per SM: its 8 warps x 1000 requests x 16 sectors through a 64 B/cycle port.
        let port = 8.0 * 1000.0 * 16.0 * 32.0 / gpu.sm_l2_bytes_per_cycle * cycle;
        assert!((warm.l2_s - port).abs() < 1e-12, "{} vs {port}", warm.l2_s);
        // Issue: 8 resident warps use all 4 schedulers.
        assert!((warm.issue_s - 8000.0 / 4.0 * cycle).abs() < 1e-12);
    }

    /// A launch whose only work is tensor FLOPs: mma.sync at the dense rate times its efficiency, wgmma at the rate
    /// of its input width times the wgmma efficiency; the kinds add up on the same tensor cores.
    #[test]
    fn each_kind_of_tensor_flop_takes_its_own_rate() {
        let (gpu, model) = (Gpu::H100_SXM, Model::FITTED);
        // One block per SM, 1 GFLOP each.
        let base = Profile { blocks: 132, blocks_run: 132, block_threads: 288, registers: 64, ..Profile::default() };
        let flops = 132 * 1_000_000_000u64;
        let tensor = |tensor_flops: u64, wgmma_flops: u64, wgmma_8bit_flops: u64| {
            let mut profile = base;
            (profile.tensor_flops, profile.wgmma_flops, profile.wgmma_8bit_flops) = (tensor_flops, wgmma_flops, wgmma_8bit_flops);
            let p = predict(&profile, &gpu, &model);
            assert_eq!(p.bound(), "tensor");
            p.tensor_s
        };
        let cycle = 1.0 / gpu.clock_hz;
        let mma_sync = tensor(flops, 0, 0);
        let wgmma = tensor(flops, flops, 0);
        let wgmma_8bit = tensor(flops, flops, flops);
        assert!((mma_sync - 1e9 / (4096.0 * model.mma_sync_efficiency) * cycle).abs() < 1e-12);
        assert!((wgmma - 1e9 / (4096.0 * model.wgmma_efficiency) * cycle).abs() < 1e-12);
        assert!((wgmma_8bit - wgmma / 2.0).abs() < 1e-12, "8-bit inputs run at twice the 16-bit rate");
        // The H100 SXM's bf16 wgmma rate: 989 TFLOP/s x the efficiency.
        let tflops = 132.0 * 1e9 / wgmma / 1e12;
        assert!((tflops - 989.4 * model.wgmma_efficiency).abs() < 1.0, "{tflops}");
        // Half of each kind: the times add.
        let mixed = tensor(flops, flops / 2, flops / 4);
        assert!((mixed - (mma_sync / 2.0 + wgmma / 4.0 + wgmma_8bit / 4.0)).abs() < 1e-12);
    }

    /// In a replayed graph a launch pays its node's cost instead of a host launch's, less when programmatic, and
    /// the step pays the replay once.
    #[test]
    fn a_graph_node_replaces_the_host_launch_overhead() {
        let (gpu, model) = (Gpu::H100_SXM, Model::FITTED);
        let base = Profile { blocks: 132, blocks_run: 132, block_threads: 128, registers: 64, warp_instructions: 132 * 4000, ..Profile::default() };
        let p = predict(&base, &gpu, &model);
        assert_eq!(p.launch_s, model.launch_s);
        let (graph, pdl) = (p.in_graph_seconds(&model, false), p.in_graph_seconds(&model, true));
        assert!((p.seconds - graph - (model.launch_s - model.graph_node_s)).abs() < 1e-15);
        assert!((graph - pdl - (model.graph_node_s - model.pdl_node_s)).abs() < 1e-15);
        assert!(pdl < graph && graph < p.seconds);
        let step = graph_step_seconds([(&p, false), (&p, true)], &model);
        assert!((step - (model.graph_replay_s + graph + pdl)).abs() < 1e-15);
    }

    /// A programmatic launch overlaps the launch before with what it loads before its wait: its first round trip
    /// (DRAM less an L2 hit) when every block loads there, and its pre-wait bytes within the HBM time the launch
    /// before leaves idle; nothing beside a launch that fills its SMs, and never below its node cost plus the DRAM
    /// time of the bytes left.
    #[test]
    fn a_programmatic_launch_overlaps_the_one_before_with_its_pre_wait_loads() {
        let (gpu, model) = (Gpu::H100_SXM, Model::FITTED);
        let cycle = 1.0 / gpu.clock_hz;
        let bandwidth = gpu.dram_bytes_per_s * model.dram_efficiency;
        // The dependent: 132 blocks of 4 warps streaming 8 MiB, 1 MiB of it (32,768 sectors) before the wait.
        let mib = (1u64 << 20) / 32;
        let shape = Profile { blocks: 132, blocks_run: 132, block_threads: 128, registers: 96, warp_instructions: 132 * 400, ..Profile::default() };
        let streaming = Profile { global_sectors: 8 * mib, distinct_sectors: 8 * mib, block_distinct_sectors: 8 * mib, chain_globals_sum: 132 * 8, ..shape };
        let this = predict(&Profile { pre_wait_sectors: mib, pre_wait_blocks: 132, ..streaming }, &gpu, &model);
        assert!(this.every_block_loads_before_wait && (this.pre_wait_dram_bytes - (1u64 << 20) as f64).abs() < 1e-6);
        assert!((this.first_load_latency_s - model.dram_latency_cycles * cycle).abs() < 1e-15);
        let this_s = this.in_graph_seconds(&model, true);
        let round_trip = (model.dram_latency_cycles - CHAIN_GLOBAL_CYCLES as f64) * cycle;
        // Before it, a latency-bound launch on 32 blocks: 64 KiB of DRAM over microseconds, HBM idle meanwhile.
        let small = Profile {
            blocks: 32,
            blocks_run: 32,
            global_sectors: 2048,
            distinct_sectors: 2048,
            block_distinct_sectors: 2048,
            chain_cycles_max: 20_000,
            chain_cycles_sum: 32 * 20_000,
            ..shape
        };
        let latency_bound = predict(&small, &gpu, &model);
        let previous_s = latency_bound.in_graph_seconds(&model, true);
        assert!(latency_bound.resident_per_sm < latency_bound.blocks_per_sm as u64 && previous_s > 5e-6);
        let overlap = pdl_overlap_seconds(&gpu, &model, &latency_bound, previous_s, &this, this_s);
        assert!((overlap - (round_trip + (1u64 << 20) as f64 / bandwidth)).abs() < 1e-12, "{overlap}");
        // Before it, a DRAM-bound launch: HBM idle only for its node cost and first round trip, fewer bytes move.
        let dram_bound = predict(&streaming, &gpu, &model);
        let dram_s = dram_bound.in_graph_seconds(&model, true);
        let idle = dram_s - dram_bound.dram_bytes / bandwidth;
        assert!(idle > 0.0 && idle < 1e-6, "{idle}");
        let overlap = pdl_overlap_seconds(&gpu, &model, &dram_bound, dram_s, &this, this_s);
        assert!((overlap - (round_trip + idle.min((1u64 << 20) as f64 / bandwidth))).abs() < 1e-12, "{overlap}");
        let long_dram_s = dram_bound.dram_bytes / bandwidth;
        let overlap = pdl_overlap_seconds(&gpu, &model, &dram_bound, long_dram_s, &this, this_s);
        assert!((overlap - round_trip).abs() < 1e-12, "no idle HBM: the round trip alone, {overlap}");
        // Blocks that wait first (only some blocks load before the wait): the bytes, not the round trip.
        let some = predict(&Profile { pre_wait_sectors: mib, pre_wait_blocks: 8, ..streaming }, &gpu, &model);
        let overlap = pdl_overlap_seconds(&gpu, &model, &latency_bound, previous_s, &some, some.in_graph_seconds(&model, true));
        assert!((overlap - (1u64 << 20) as f64 / bandwidth).abs() < 1e-12, "{overlap}");
        // No loads before the wait, or a launch before that fills its SMs: nothing.
        let waits_first = predict(&streaming, &gpu, &model);
        assert_eq!(pdl_overlap_seconds(&gpu, &model, &latency_bound, previous_s, &waits_first, this_s), 0.0);
        let full = Prediction { resident_per_sm: latency_bound.blocks_per_sm as u64, ..latency_bound };
        assert_eq!(pdl_overlap_seconds(&gpu, &model, &full, previous_s, &this, this_s), 0.0);
        // The floor: a launch whose time is mostly its DRAM bytes keeps the time of the bytes not moved early.
        let tight_s = model.pdl_node_s + this.dram_bytes / bandwidth + 0.1e-6;
        let overlap = pdl_overlap_seconds(&gpu, &model, &latency_bound, previous_s, &this, tight_s);
        assert!((overlap - ((1u64 << 20) as f64 / bandwidth + 0.1e-6)).abs() < 1e-12, "{overlap}");
    }

    /// Sectors an earlier launch left in L2 come off the DRAM bytes exactly (a sampled launch's hit fraction applies
    /// to its grid) and weigh the memory latency by their fraction; prefetched sectors not resident add to the DRAM
    /// bytes at the per-SM in-flight cap, with no dependence chain.
    #[test]
    fn l2_hits_and_prefetches_move_dram_bytes() {
        let (gpu, model) = (Gpu::H100_SXM, Model::FITTED);
        // 8 blocks of 8 warps reading 2 MiB, each block's chain 1000 cycles and 10 round trips.
        let chains = Profile { chain_cycles_max: 1000, chain_globals_max: 10, chain_cycles_sum: 8 * 1000, chain_globals_sum: 8 * 10, ..Profile::default() };
        let shape = Profile { blocks: 8, blocks_run: 8, block_threads: 256, registers: 32, warp_instructions: 8 * 8 * 100, ..chains };
        let base = Profile { global_sectors: 1 << 16, distinct_sectors: 1 << 16, block_distinct_sectors: 1 << 16, ..shape };
        let cold = predict(&base, &gpu, &model);
        let half = Profile { l2_hit_sectors: 1 << 15, ..base };
        assert_eq!(base.dram_bytes() - half.dram_bytes(), (1u64 << 15) as f64 * 32.0);
        let warm = predict(&half, &gpu, &model);
        assert_eq!((warm.l2_hit_bytes, cold.l2_hit_bytes), ((1u64 << 20) as f64, 0.0));
        let cycle = 1.0 / gpu.clock_hz;
        let latency = 0.5 * CHAIN_GLOBAL_CYCLES as f64 + 0.5 * model.dram_latency_cycles;
        assert!((warm.chain_s - (1000.0 + 10.0 * latency) * cycle).abs() < 1e-15);
        assert!(warm.seconds < cold.seconds && warm.l2_s == cold.l2_s);
        // Sampled: 2 of 8 blocks ran; their hit fraction (half) applies to the grid's scaled bytes.
        let sampled = Profile { blocks_run: 2, distinct_sectors: 1 << 14, block_distinct_sectors: 1 << 14, l2_hit_sectors: 1 << 13, ..base };
        assert_eq!((sampled.dram_bytes(), sampled.l2_hit_bytes()), ((1u64 << 20) as f64, (1u64 << 20) as f64));
        // Prefetches: 1 MiB on 8 SMs of 32 KiB in flight each, over a DRAM latency; resident ones cost nothing.
        let prefetching = Profile { distinct_sectors: 0, block_distinct_sectors: 0, global_sectors: 0, prefetch_sectors: 1 << 15, ..base };
        let p = predict(&prefetching, &gpu, &model);
        assert_eq!((p.prefetch_dram_bytes, prefetching.dram_bytes()), ((1u64 << 20) as f64, (1u64 << 20) as f64));
        let bw = 8.0 * model.max_bytes_in_flight_per_sm / (model.dram_latency_cycles * cycle);
        assert!((p.dram_s - (1u64 << 20) as f64 / bw).abs() < 1e-15, "{} vs {}", p.dram_s, (1u64 << 20) as f64 / bw);
        let resident = predict(&Profile { prefetch_l2_hit_sectors: 1 << 15, ..prefetching }, &gpu, &model);
        assert_eq!((resident.dram_s, resident.prefetch_dram_bytes, resident.l2_hit_bytes), (0.0, 0.0, (1u64 << 20) as f64));
    }

    /// A window of a persistent walk (every block of a 132-block grid over its first tiles) scaled to a walk of 4
    /// such windows: the window's distinct sectors (shared by its blocks) count 4 times, not each block's own; the
    /// instructions, FLOPs and L2 sectors 4 times; the busiest SM's chain is 4 windows' (the first 3 at the mean);
    /// one wave's latency a window. A window holding the whole walk is the launch as it ran.
    #[test]
    fn a_walk_window_scales_to_the_walk_with_its_shared_sectors() {
        let (gpu, model) = (Gpu::H100_SXM, Model::FITTED);
        let cycle = 1.0 / gpu.clock_hz;
        // Each block reads 1 MiB (its own sectors, 2^15), a quarter of which every block shares.
        let per_block = 1u64 << 15;
        let window = Profile {
            blocks: 132,
            blocks_run: 132,
            block_threads: 288,
            registers: 168,
            warp_instructions: 132 * 1000,
            global_sectors: 132 * per_block,
            distinct_sectors: 132 * per_block * 3 / 4 + per_block / 4,
            block_distinct_sectors: 132 * per_block,
            wgmma_flops: 132 << 30,
            tensor_flops: 132 << 30,
            chain_cycles_max: 20_000,
            chain_cycles_sum: 132 * 10_000,
            chain_globals_max: 10,
            chain_globals_sum: 132 * 10,
            ..Profile::default()
        };
        assert_eq!(window.walked(1.0), window);
        assert_eq!(window.walked(0.5), window, "at least the window");
        let walk = window.walked(4.0);
        assert_eq!((walk.blocks, walk.blocks_run), (528, 132));
        assert_eq!(walk.dram_bytes(), 4.0 * window.distinct_sectors as f64 * 32.0);
        let (w, p) = (predict(&window, &gpu, &model), predict(&walk, &gpu, &model));
        assert!((p.l2_s - 4.0 * w.l2_s).abs() < 1e-12 && (p.tensor_s - 4.0 * w.tensor_s).abs() < 1e-12 && (p.issue_s - 4.0 * w.issue_s).abs() < 1e-12);
        let latency = model.dram_latency_cycles;
        let (mean, max) = (10_000.0 + 10.0 * latency, 20_000.0 + 10.0 * latency);
        assert!((p.chain_s - (3.0 * mean + max) * cycle).abs() < 1e-12, "{} vs {}", p.chain_s, (3.0 * mean + max) * cycle);
        assert_eq!((w.waves, p.waves), (1, 4));
        // Sampled the usual way (2 blocks, their own sectors scaled to the grid) the shared quarter would count once
        // per block.
        let sampled = Profile { blocks: 528, blocks_run: 2, distinct_sectors: 2 * per_block, block_distinct_sectors: 2 * per_block, ..window };
        assert!(sampled.dram_bytes() > 1.3 * walk.dram_bytes());
    }

    /// A launch that prefetches the sectors it loads later (a decode GEMM warp's own k range): its DRAM bytes stay
    /// the same, the prefetched part moves at the prefetches' parallelism instead of the lanes' Little's law, its
    /// chain's loads wait an L2 hit for that part (the first load of a wave still a DRAM latency), and the DRAM term
    /// still bounds it; a prefetch before the wait is pre-wait traffic, capped at the launch's DRAM bytes.
    #[test]
    fn a_launch_prefetching_its_own_loads_moves_them_as_prefetches_and_its_chain_hits_l2() {
        let (gpu, model) = (Gpu::H100_SXM, Model::FITTED);
        let cycle = 1.0 / gpu.clock_hz;
        // 128 blocks of 4 warps each streaming 64 KiB (8 MiB), 8 round trips on the chain: latency-bound.
        let sectors = 128 * (64 << 10) / 32;
        let shape = Profile { blocks: 128, blocks_run: 128, block_threads: 128, registers: 96, warp_instructions: 128 * 400, ..Profile::default() };
        let chains = Profile { chain_cycles_max: 2000, chain_globals_max: 8, chain_cycles_sum: 128 * 2000, chain_globals_sum: 128 * 8, ..shape };
        let ring = Profile {
            global_sectors: sectors,
            distinct_sectors: sectors,
            block_distinct_sectors: sectors,
            pre_wait_sectors: sectors / 4,
            pre_wait_blocks: 128,
            ..chains
        };
        let plain = predict(&ring, &gpu, &model);
        // Three quarters of it prefetched before the wait and read later by the k loop.
        let own = Profile { prefetched_load_sectors: sectors * 3 / 4, pre_wait_sectors: sectors, ..ring };
        let prefetching = predict(&own, &gpu, &model);
        assert_eq!((prefetching.dram_bytes, prefetching.prefetch_dram_bytes), (plain.dram_bytes, 0.0), "the same DRAM bytes, none of another launch's");
        let latency = 0.75 * CHAIN_GLOBAL_CYCLES as f64 + 0.25 * model.dram_latency_cycles;
        assert!((prefetching.chain_s - (2000.0 + 8.0 * latency) * cycle).abs() < 1e-15, "{}", prefetching.chain_s);
        assert!((plain.chain_s - (2000.0 + 8.0 * model.dram_latency_cycles) * cycle).abs() < 1e-15);
        assert_eq!(prefetching.first_load_latency_s, plain.first_load_latency_s, "a wave's first load is the ring's, from DRAM");
        assert!(prefetching.seconds < plain.seconds && prefetching.seconds >= prefetching.dram_bytes / (gpu.dram_bytes_per_s * model.dram_efficiency));
        assert_eq!((plain.pre_wait_dram_bytes, prefetching.pre_wait_dram_bytes), (plain.dram_bytes / 4.0, plain.dram_bytes));
        // The prefetched bytes at the prefetches' per-SM cap: 128 SMs of `max_bytes_in_flight_per_sm` over a DRAM latency.
        let prefetch_bw = 128.0 * model.max_bytes_in_flight_per_sm / (model.dram_latency_cycles * cycle);
        assert!(prefetching.dram_s >= 0.75 * plain.dram_bytes / prefetch_bw - 1e-15);
        // Nothing of it when L2 already holds the launch's data (a back-to-back call).
        let warm = predict(&Profile { l2_resident: true, ..own }, &gpu, &model);
        assert_eq!(warm.chain_s, predict(&Profile { l2_resident: true, ..ring }, &gpu, &model).chain_s);
        // Pre-wait prefetches of bytes L2 holds are no DRAM traffic: the pre-wait bytes stay within the launch's own.
        let hits = predict(&Profile { l2_hit_sectors: sectors / 2, ..own }, &gpu, &model);
        assert!(hits.pre_wait_dram_bytes <= hits.dram_bytes);
    }

    /// The same sectors moved by a TMA / bulk producer and by the lanes' loads of a kernel that keeps few bytes in
    /// flight: both are L2 traffic and DRAM bytes, but only the lanes' loads are held to the L1 miss tracking (MWP);
    /// the copies are bounded by the shared memory they land in.
    #[test]
    fn async_copies_are_l2_and_dram_traffic_without_the_lanes_in_flight_cap() {
        let (gpu, model) = (Gpu::H100_SXM, Model::FITTED);
        let sectors = 132 * 4 * 1_000_000 / 32; // 4 MB per block
        let base = Profile {
            blocks: 132,
            blocks_run: 132,
            block_threads: 288,
            registers: 64,
            shared_bytes: 96 * 1024,
            warp_instructions: 132 * 1000,
            distinct_sectors: sectors,
            block_distinct_sectors: sectors,
            // The lanes' version waits one memory round trip per 2 KB: little in flight.
            chain_globals_sum: 132 * 2000,
            ..Profile::default()
        };
        let lanes = predict(&Profile { global_sectors: sectors, ..base }, &gpu, &model);
        let copies = predict(&Profile { async_copy_sectors: sectors, ..base }, &gpu, &model);
        assert_eq!(copies.l2_s, lanes.l2_s);
        assert_eq!(copies.issue_s, lanes.issue_s, "no per-lane issue for the copies");
        // The copies stream at the achievable bandwidth; the lanes' loads at what their bytes in flight allow.
        let achievable = gpu.dram_bytes_per_s * model.dram_efficiency;
        assert!((copies.dram_bytes_per_s - achievable).abs() < 1.0, "{}", copies.dram_bytes_per_s);
        assert!(lanes.dram_bytes_per_s < achievable / 2.0 && lanes.dram_s > copies.dram_s);
        assert_eq!(copies.bound(), "dram");
        // Half and half: the time is the larger of all bytes at the achievable rate and the lanes' half at theirs.
        let half = predict(&Profile { global_sectors: sectors / 2, async_copy_sectors: sectors / 2, ..base }, &gpu, &model);
        assert!(half.dram_s >= copies.dram_s && half.dram_s <= lanes.dram_s * (1.0 + 1e-9));
    }
}
