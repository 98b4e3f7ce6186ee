//! The fused MoE router (`cuda/router.cu`): gate logits, softmax over all experts in f32, top-k with ties to the lower
//! index, renormalised weights, and the per-expert alignment the grouped GEMM reads, in one launch.
//!
//! Alignment contract (what the grouped GEMM codes against), for `pairs = tokens * k` pairs `p = t * k + j`:
//! - `expert_counts [local_experts]`: pairs routed to each local expert;
//! - `expert_offsets [local_experts + 1]`: exclusive prefix sums of the counts rounded UP to `tile_m`, so each
//!   expert's rows start on a tile boundary;
//! - `sorted_pairs [max_padded]`: the pair indices grouped by local expert, increasing inside an expert
//!   (deterministic), padding rows -1 (also every row past `num_padded`);
//! - `tile_experts [max_tiles]`: the local expert of each tile of `tile_m` rows, -1 past the end;
//! - `num_padded [1]` = `expert_offsets[local_experts]`;
//!
//! with `max_padded` = [`max_padded_slots`] and `max_tiles = max_padded / tile_m`. Pairs whose expert maps to -1 (owned by
//! another GPU) appear in no list.

use half::bf16;

use super::check_len;
use super::modules::ROUTER;
use super::params::{MoeAlignParams, RouterParams};
use super::prefetch::L2Prefetch;
use super::Matrix;
use crate::device::{launch_with, Device, DeviceBuffer, Dim3, Kernel, LaunchConfig};
use crate::error::{Error, Result};
pub use crate::reference::moe::max_padded_slots;

const ROUTER_TOPK: Kernel = Kernel { module: ROUTER, entry: "router_topk" };
const ROUTER_TOPK_DECODE: Kernel = Kernel { module: ROUTER, entry: "router_topk_decode" };
const MOE_ALIGN: Kernel = Kernel { module: ROUTER, entry: "moe_align" };

/// Most experts (global, the gate's rows) one router launch and one [`ExpertMap`] handle.
pub const MAX_EXPERTS: usize = 256;
/// Most experts per token (`kMaxK` in router.cu).
pub const MAX_K: usize = 8;
/// Largest alignment tile (`tile_m`): rows of a grouped-GEMM tile.
pub const MAX_TILE_M: usize = 128;
/// Threads of every router block (`kThreads` in router.cu).
const THREADS: u32 = 256;
/// Columns of dim per block (`kSlice`) and tokens per block (`kTokenGroup`).
const SLICE: usize = 256;
const TOKEN_GROUP: usize = 64;
/// Up to this many tokens (one token group) a block covers 32 experts (more blocks to stream the gate at decode);
/// above it 64 (each hidden slice staged in shared memory serves twice as many experts). On an H200 the T=32 launch
/// with 64 experts a block (32 blocks) took 35.9 us against 13.9 us for T=1 with 32 (64 blocks), so the cut moved
/// from 16 to 64 tokens; the extra hidden-slice reads are L2 hits (ncu: 1.38 MB of DRAM read at T=32, ideal 1.31 MB).
/// The timing model (`small4 calibrate --predict decode-choices`, docs/perf.md "Decode tile choices") has 32 experts
/// a block faster at every batch up to 64 (T=32: 25.0 vs 27.8 µs on the H200), and also at T=256 (45.1 vs 50.0 µs),
/// which no GPU has measured yet: the cut above 64 tokens is kept until one does.
const DECODE_TOKENS: usize = TOKEN_GROUP;

/// `router_topk_decode` (one token) handles at most this many experts (`kDecodeExpertsPerLane` x 32) and this `dim`
/// (`kDecodeMaxSlices` x 256); beyond them, and for more tokens, `router_topk` runs.
const DECODE_MAX_EXPERTS: usize = 128;
const DECODE_MAX_DIM: usize = 16 * SLICE;
/// Experts per block of `router_topk_decode` (`kDecodeExperts`).
const DECODE_EXPERTS_PER_BLOCK: usize = 32;

thread_local! {
    /// `small4 calibrate` only: forces the experts a block covers, to replay the configuration the H200 measured
    /// before the current choice; at one token it also forces `router_topk` (the kernel the H200 measured there)
    /// instead of `router_topk_decode`. None: `experts_per_block` and [`uses_decode_kernel`] decide.
    pub(crate) static EXPERTS_PER_BLOCK_OVERRIDE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

fn experts_per_block(tokens: usize) -> usize {
    if let Some(n) = EXPERTS_PER_BLOCK_OVERRIDE.get() {
        return n;
    }
    if tokens <= DECODE_TOKENS {
        32
    } else {
        64
    }
}

/// Whether a routing call runs `router_topk_decode`: one token, at most 128 experts, `dim` at most 4096 (the model's
/// decode step: 128 experts, dim 4096), unless `small4 calibrate` replays the older configuration. The timing model
/// (`small4 calibrate --predict bench-cases --only router-t1`, docs/perf.md "router_topk") predicts it at 4.9 µs on an
/// H100 SXM where `router_topk` takes 9.1 µs (PREDICTED, not measured); `router_topk` stays for every other call (its
/// T = 16, 32, 256 figures are unchanged).
fn uses_decode_kernel(tokens: usize, experts: usize, dim: usize) -> bool {
    tokens == 1 && experts <= DECODE_MAX_EXPERTS && dim <= DECODE_MAX_DIM && EXPERTS_PER_BLOCK_OVERRIDE.get().is_none()
}

/// Which experts this GPU owns: `map[global] = local index`, or -1 for experts owned by another GPU.
pub struct ExpertMap {
    buffer: DeviceBuffer<i32>,
    experts: usize,
    local_experts: usize,
}

impl ExpertMap {
    /// Every expert is local (single GPU): `map[e] = e`. Errors as [`ExpertMap::new`].
    pub fn identity(device: &Device, experts: usize) -> Result<Self> {
        let map: Vec<i32> = (0..experts as i32).collect();
        Self::new(device, &map)
    }

    /// Checks that the non-negative entries are exactly 0..local_experts, each once, and every other entry is -1.
    /// `Error::InvalidArgument` otherwise, or for an empty map, a map of more than [`MAX_EXPERTS`] entries or one with
    /// no local expert.
    pub fn new(device: &Device, map: &[i32]) -> Result<Self> {
        let experts = map.len();
        if experts == 0 || experts > MAX_EXPERTS {
            return Err(Error::InvalidArgument(format!("expert map of {experts} experts (1..={MAX_EXPERTS})")));
        }
        let mut seen = vec![false; experts];
        for (global, &local) in map.iter().enumerate() {
            if local == -1 {
                continue;
            }
            let slot = usize::try_from(local).ok().filter(|&l| l < experts);
            match slot {
                Some(l) if !seen[l] => seen[l] = true,
                _ => return Err(Error::InvalidArgument(format!("expert map: expert {global} -> {local} (duplicate or out of range)"))),
            }
        }
        let local_experts = seen.iter().take_while(|&&s| s).count();
        if local_experts == 0 || seen[local_experts..].iter().any(|&s| s) {
            return Err(Error::InvalidArgument("expert map: local indices must be 0..n, each once, n >= 1".into()));
        }
        Ok(ExpertMap { buffer: DeviceBuffer::from_slice(device, map)?, experts, local_experts })
    }

    /// Global expert count (the map's length, the gate's rows).
    pub fn experts(&self) -> usize {
        self.experts
    }
    /// Experts this GPU owns (the non-negative entries).
    pub fn local_experts(&self) -> usize {
        self.local_experts
    }
    /// The map on the device, `[experts]` i32 (the `expert_map` that `moe::combine` takes to skip other GPUs' pairs).
    pub fn buffer(&self) -> &DeviceBuffer<i32> {
        &self.buffer
    }
}

/// The alignment outputs (see the module documentation for the contract).
pub struct Alignment {
    /// `[local_experts]` i32: pairs routed to each local expert.
    pub expert_counts: DeviceBuffer<i32>,
    /// `[local_experts + 1]` i32: first slot of each local expert's rows, tile-aligned; the last entry = `num_padded`.
    pub expert_offsets: DeviceBuffer<i32>,
    /// `[max_padded]` i32: the pair index in each slot, -1 for padding.
    pub sorted_pairs: DeviceBuffer<i32>,
    /// `[max_tiles]` i32: the local expert of each tile of `tile_m` slots, -1 past the last used tile.
    pub tile_experts: DeviceBuffer<i32>,
    /// `[1]` i32: slots in use (a multiple of `tile_m`).
    pub num_padded: DeviceBuffer<i32>,
    /// Pairs aligned: `tokens * k`.
    pub pairs: usize,
    /// Experts of the [`ExpertMap`] this alignment is for.
    pub local_experts: usize,
    /// Slots per tile: a power of two, at most [`MAX_TILE_M`].
    pub tile_m: usize,
    /// Slot capacity, `reference::moe::max_padded_slots(pairs, local_experts, tile_m)`.
    pub max_padded: usize,
    /// Tile capacity, `max_padded / tile_m`.
    pub max_tiles: usize,
}

impl Alignment {
    /// Uninitialised outputs for `pairs` pairs (the kernels write every element). `Error::InvalidArgument` when
    /// `tile_m` is not a power of two up to [`MAX_TILE_M`] or the slot count overflows `i32`.
    pub fn alloc(device: &Device, pairs: usize, local_experts: usize, tile_m: usize) -> Result<Self> {
        check_tile_m(tile_m)?;
        let max_padded = max_padded_slots(pairs, local_experts, tile_m);
        let max_tiles = max_padded / tile_m;
        if max_padded > i32::MAX as usize {
            return Err(Error::InvalidArgument(format!("alignment of {pairs} pairs overflows i32")));
        }
        Ok(Alignment {
            expert_counts: DeviceBuffer::alloc(device, local_experts)?,
            expert_offsets: DeviceBuffer::alloc(device, local_experts + 1)?,
            sorted_pairs: DeviceBuffer::alloc(device, max_padded)?,
            tile_experts: DeviceBuffer::alloc(device, max_tiles)?,
            num_padded: DeviceBuffer::alloc(device, 1)?,
            pairs,
            local_experts,
            tile_m,
            max_padded,
            max_tiles,
        })
    }

    fn params(&self, topk_ids: Matrix<i32>, map: &ExpertMap) -> Result<MoeAlignParams> {
        if self.local_experts != map.local_experts {
            return Err(Error::shape("alignment local experts", map.local_experts, self.local_experts));
        }
        // The kernel reads pair p = t * k + j at topk_ids[p]: the ids must be packed.
        check_len("alignment topk_ids", topk_ids.len(), self.pairs)?;
        topk_ids.expect_packed("alignment topk_ids")?;
        let max_padded = max_padded_slots(self.pairs, self.local_experts, self.tile_m);
        let max_tiles = max_padded / self.tile_m;
        check_len("alignment sorted_pairs", self.sorted_pairs.len(), max_padded)?;
        check_len("alignment tile_experts", self.tile_experts.len(), max_tiles)?;
        check_len("alignment expert_counts", self.expert_counts.len(), self.local_experts)?;
        check_len("alignment expert_offsets", self.expert_offsets.len(), self.local_experts + 1)?;
        check_len("alignment num_padded", self.num_padded.len(), 1)?;
        Ok(MoeAlignParams {
            topk_ids: topk_ids.ptr(),
            expert_map: map.buffer.ptr(),
            expert_counts: self.expert_counts.mut_ptr(),
            expert_offsets: self.expert_offsets.mut_ptr(),
            sorted_pairs: self.sorted_pairs.mut_ptr(),
            tile_experts: self.tile_experts.mut_ptr(),
            num_padded: self.num_padded.mut_ptr(),
            pairs: self.pairs as i32,
            experts: map.experts as i32,
            local_experts: self.local_experts as i32,
            tile_m: self.tile_m as i32,
            max_padded: max_padded as i32,
        })
    }
}

/// What the router produces: `topk_ids [tokens, k]`, `topk_weights [tokens, k]` and the alignment.
pub struct Routing {
    /// `[tokens, k]` i32: global expert ids of each token, by decreasing probability (ties to the lower id).
    pub topk_ids: DeviceBuffer<i32>,
    /// `[tokens, k]` f32: the chosen softmax probabilities renormalised to sum to 1, times `routed_scale`.
    pub topk_weights: DeviceBuffer<f32>,
    /// The pairs grouped by local expert (the module documentation gives the contract).
    pub alignment: Alignment,
    /// Tokens routed.
    pub tokens: usize,
    /// Experts per token.
    pub k: usize,
}

impl Routing {
    /// Uninitialised outputs for `tokens` tokens of `k` experts each, aligned over `local_experts` in tiles of
    /// `tile_m`. Errors as [`Alignment::alloc`].
    pub fn alloc(device: &Device, tokens: usize, k: usize, local_experts: usize, tile_m: usize) -> Result<Self> {
        Ok(Routing {
            topk_ids: DeviceBuffer::alloc(device, tokens * k)?,
            topk_weights: DeviceBuffer::alloc(device, tokens * k)?,
            alignment: Alignment::alloc(device, tokens * k, local_experts, tile_m)?,
            tokens,
            k,
        })
    }
}

/// Scratch of one router launch: the split-K partial logits `[dim / 256, tokens, experts]` (at one token, rows padded to
/// a multiple of 4 experts), the f32 logits
/// `[tokens, experts]` and the completion counters (zero between launches; the kernel leaves them zero). One launch at
/// a time per workspace.
pub struct RouterWorkspace {
    partials: DeviceBuffer<f32>,
    logits: DeviceBuffer<f32>,
    counters: DeviceBuffer<i32>,
    tokens: usize,
    experts: usize,
    dim: usize,
}

impl RouterWorkspace {
    /// Scratch for launches of exactly `tokens` tokens over a `[experts, dim]` gate ([`route_and_align_into`] checks
    /// the match), the counters zeroed.
    pub fn new(device: &Device, tokens: usize, experts: usize, dim: usize) -> Result<Self> {
        Ok(RouterWorkspace {
            // Rows of a multiple of 4 experts: the one-token kernel reads them as float4.
            partials: DeviceBuffer::alloc(device, dim.div_ceil(SLICE) * tokens * experts.next_multiple_of(4))?,
            logits: DeviceBuffer::alloc(device, tokens * experts)?,
            counters: DeviceBuffer::filled_with_byte(device, tokens.div_ceil(TOKEN_GROUP) + 1, 0)?,
            tokens,
            experts,
            dim,
        })
    }

    /// The gate logits of the last launch (f32, `[tokens, experts]`).
    pub fn logits(&self) -> &DeviceBuffer<f32> {
        &self.logits
    }
}

/// Router settings of the model.
#[derive(Clone, Copy, Debug)]
pub struct RouterConfig {
    /// Experts per token: `1..=MAX_K` and at most the expert count.
    pub k: usize,
    /// Factor on the renormalised weights (the config's `routed_scale`; must be finite).
    pub routed_scale: f32,
    /// Rows per grouped-GEMM tile: a power of two, 1..=128.
    pub tile_m: usize,
}

/// Routes every row of `hidden [tokens, dim]` through `gate [experts, dim]` and aligns the pairs: allocates the
/// outputs and a workspace. See [`route_and_align_into`] for the allocation-free form a CUDA graph replays.
///
/// `hidden` and `gate` are bf16, packed and 16-byte aligned (the kernel takes no stride and loads 8 values at a
/// time); the logits are accumulated in f32. `Error::InvalidArgument` for a bad config (`k`, `routed_scale`,
/// `tile_m`), a `dim` that is not a multiple of 8, a strided or misaligned view or too many tokens for one launch;
/// `Error::Shape` when `gate` is not `[experts, dim]` for the map's expert count or `hidden` is not `[tokens, dim]`.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::router::{route_and_align, ExpertMap, RouterConfig};
///
/// let device = simulator();
/// // One token, dim 8, four experts. hidden = e_0, so expert e's logit is gate[e, 0]: [1, 3, 2, 0].
/// let mut hidden = vec![bf16::ZERO; 8];
/// hidden[0] = bf16::ONE;
/// let mut gate = vec![bf16::ZERO; 4 * 8];
/// for (e, logit) in [1.0f32, 3.0, 2.0, 0.0].into_iter().enumerate() {
///     gate[e * 8] = bf16::from_f32(logit);
/// }
/// let (hidden, gate) = (DeviceBuffer::from_slice(&device, &hidden)?, DeviceBuffer::from_slice(&device, &gate)?);
/// let map = ExpertMap::identity(&device, 4)?;
/// let config = RouterConfig { k: 2, routed_scale: 1.0, tile_m: 8 };
/// let routing = route_and_align(hidden.view([1, 8])?, gate.view([4, 8])?, &map, &config)?;
///
/// assert_eq!(routing.topk_ids.to_vec()?, vec![1, 2]);
/// // Renormalised over the two chosen: e^3 / (e^3 + e^2) and e^2 / (e^3 + e^2).
/// let w = routing.topk_weights.to_vec()?;
/// let w1 = 1.0 / (1.0 + (-1.0f32).exp());
/// assert!((w[0] - w1).abs() < 1e-4 && (w[1] - (1.0 - w1)).abs() < 1e-4, "{w:?}");
/// // Pair 0 (expert 1) fills tile 0, pair 1 (expert 2) tile 1; each tile padded to 8 slots.
/// let a = &routing.alignment;
/// assert_eq!(a.expert_counts.to_vec()?, vec![0, 1, 1, 0]);
/// assert_eq!(a.expert_offsets.to_vec()?, vec![0, 0, 8, 16, 16]);
/// assert_eq!(a.num_padded.to_vec()?, vec![16]);
/// assert_eq!(a.tile_experts.to_vec()?, vec![1, 2]);
/// let sorted = a.sorted_pairs.to_vec()?;
/// assert_eq!((sorted[0], sorted[1], sorted[8], sorted[15]), (0, -1, 1, -1));
/// // A gate of 2 experts for a map of 4 is a typed error:
/// let err = route_and_align(hidden.view([1, 8])?, gate.view([2, 8])?, &map, &config);
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn route_and_align(hidden: Matrix<bf16>, gate: Matrix<bf16>, map: &ExpertMap, config: &RouterConfig) -> Result<Routing> {
    let device = hidden.device();
    let [tokens, _] = hidden.dims();
    let [_, dim] = gate.dims();
    check_config(map.experts, config)?;
    let workspace = RouterWorkspace::new(device, tokens, map.experts, dim)?;
    let routing = Routing::alloc(device, tokens, config.k, map.local_experts, config.tile_m)?;
    route_and_align_into(hidden, gate, map, config, &workspace, &routing)?;
    Ok(routing)
}

/// [`route_and_align`] into preallocated outputs and workspace (one launch, no host synchronisation).
///
/// Errors as [`route_and_align`], and `Error::Shape` when `workspace` was made for other `[tokens, experts, dim]`,
/// `out` for another `[tokens, k, tile_m]`, or `out.alignment` for another local expert count.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::router::{route_and_align_into, ExpertMap, RouterConfig, RouterWorkspace, Routing, MAX_K};
///
/// let device = simulator();
/// // Two tokens, dim 8, three experts; expert 2 lives on another GPU (map entry -1).
/// let map = ExpertMap::new(&device, &[0, 1, -1])?;
/// assert_eq!((map.experts(), map.local_experts()), (3, 2));
/// // Token t's hidden is e_t; gate column 0 = [1, 0, 5], column 1 = [0, 2, 1].
/// let mut hidden = vec![bf16::ZERO; 2 * 8];
/// (hidden[0], hidden[8 + 1]) = (bf16::ONE, bf16::ONE);
/// let mut gate = vec![bf16::ZERO; 3 * 8];
/// for (e, (c0, c1)) in [(1.0f32, 0.0f32), (0.0, 2.0), (5.0, 1.0)].into_iter().enumerate() {
///     (gate[e * 8], gate[e * 8 + 1]) = (bf16::from_f32(c0), bf16::from_f32(c1));
/// }
/// let (hidden, gate) = (DeviceBuffer::from_slice(&device, &hidden)?, DeviceBuffer::from_slice(&device, &gate)?);
/// // Allocated once (a CUDA graph replays the launch with the same buffers).
/// let config = RouterConfig { k: 1, routed_scale: 2.0, tile_m: 4 };
/// let workspace = RouterWorkspace::new(&device, 2, 3, 8)?;
/// let routing = Routing::alloc(&device, 2, config.k, map.local_experts(), config.tile_m)?;
/// route_and_align_into(hidden.view([2, 8])?, gate.view([3, 8])?, &map, &config, &workspace, &routing)?;
/// // The logits of the launch: token t's row is gate column t.
/// assert_eq!(workspace.logits().to_vec()?, vec![1.0, 0.0, 5.0, 0.0, 2.0, 1.0]);
/// // Top-1 over all three experts: expert 2 for token 0, expert 1 for token 1; one expert renormalises to 1, times 2.
/// assert_eq!(routing.topk_ids.to_vec()?, vec![2, 1]);
/// assert_eq!(routing.topk_weights.to_vec()?, vec![2.0, 2.0]);
/// // Expert 2 is not local, so only pair 1 is aligned (to local expert 1).
/// assert_eq!(routing.alignment.expert_counts.to_vec()?, vec![0, 1]);
/// assert_eq!(routing.alignment.num_padded.to_vec()?, vec![4]);
/// // A workspace made for one token is a typed error for two:
/// let small = RouterWorkspace::new(&device, 1, 3, 8)?;
/// let err = route_and_align_into(hidden.view([2, 8])?, gate.view([3, 8])?, &map, &config, &small, &routing);
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// // So is a k above MAX_K:
/// let wide = RouterConfig { k: MAX_K + 1, ..config };
/// let err = route_and_align_into(hidden.view([2, 8])?, gate.view([3, 8])?, &map, &wide, &workspace, &routing);
/// assert!(matches!(err, Err(small4::Error::InvalidArgument(_))));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn route_and_align_into(
    hidden: Matrix<bf16>,
    gate: Matrix<bf16>,
    map: &ExpertMap,
    config: &RouterConfig,
    workspace: &RouterWorkspace,
    out: &Routing,
) -> Result<()> {
    route_and_align_prefetching(hidden, gate, map, config, workspace, out, &L2Prefetch::NONE)
}

/// [`route_and_align_into`] that also pulls `l2_prefetch` (a later kernel's weights, [`super::prefetch`]) into L2
/// while it runs: at one token the router is latency-bound (the decode step's plan gives it none at present:
/// `model::decode_prefetch`). Only `router_topk_decode` (one token) issues it; the same results either way.
pub fn route_and_align_prefetching(
    hidden: Matrix<bf16>,
    gate: Matrix<bf16>,
    map: &ExpertMap,
    config: &RouterConfig,
    workspace: &RouterWorkspace,
    out: &Routing,
    l2_prefetch: &L2Prefetch,
) -> Result<()> {
    let experts = map.experts;
    check_config(experts, config)?;
    let [tokens, _] = hidden.dims();
    let [_, dim] = gate.dims();
    if dim == 0 {
        return Err(Error::shape("router gate dim", "> 0", 0));
    }
    gate.expect_dims("router gate [experts, dim]", [experts, dim])?;
    if dim % 8 != 0 {
        return Err(Error::InvalidArgument(format!("router: dim {dim} must be a multiple of 8 (16-byte loads)")));
    }
    // Grid z (token groups) is limited to 65535; element offsets of hidden and logits to i32.
    if tokens.div_ceil(TOKEN_GROUP) > 65535 || tokens * experts.max(dim) > i32::MAX as usize {
        return Err(Error::InvalidArgument(format!("router: {tokens} tokens is too many for one launch")));
    }
    hidden.expect_dims("router hidden", [tokens, dim])?;
    // Rows of dim back to back (the kernel takes no stride), each loaded 8 values at a time.
    for (what, view) in [("router hidden", hidden), ("router gate", gate)] {
        view.expect_packed(what)?;
        view.expect_aligned(what, 16)?;
    }
    if (workspace.tokens, workspace.experts, workspace.dim) != (tokens, experts, dim) {
        return Err(Error::shape(
            "router workspace [tokens, experts, dim]",
            format!("[{tokens}, {experts}, {dim}]"),
            format!("[{}, {}, {}]", workspace.tokens, workspace.experts, workspace.dim),
        ));
    }
    if (out.tokens, out.k, out.alignment.tile_m) != (tokens, config.k, config.tile_m) {
        return Err(Error::shape(
            "router outputs [tokens, k, tile_m]",
            format!("[{tokens}, {}, {}]", config.k, config.tile_m),
            format!("[{}, {}, {}]", out.tokens, out.k, out.alignment.tile_m),
        ));
    }
    check_len("router topk_ids", out.topk_ids.len(), tokens * config.k)?;
    check_len("router topk_weights", out.topk_weights.len(), tokens * config.k)?;
    let align = out.alignment.params(out.topk_ids.view([tokens, config.k])?, map)?;
    if tokens == 0 {
        return launch_align(hidden.device(), align);
    }
    let decode = uses_decode_kernel(tokens, experts, dim);
    let experts_per_block = if decode { DECODE_EXPERTS_PER_BLOCK } else { experts_per_block(tokens) };
    let grid = Dim3::xyz(dim.div_ceil(SLICE) as u32, experts.div_ceil(experts_per_block) as u32, tokens.div_ceil(TOKEN_GROUP) as u32);
    let params = RouterParams {
        hidden: hidden.ptr(),
        gate: gate.ptr(),
        partials: workspace.partials.mut_ptr(),
        logits: workspace.logits.mut_ptr(),
        experts_per_block: experts_per_block as i32,
        counters: workspace.counters.mut_ptr(),
        topk_ids: out.topk_ids.mut_ptr(),
        topk_weights: out.topk_weights.mut_ptr(),
        tokens: tokens as i32,
        dim: dim as i32,
        experts: experts as i32,
        k: config.k as i32,
        routed_scale: config.routed_scale,
        align,
        l2_prefetch: l2_prefetch.for_grid(grid.count()),
    };
    let kernel = if decode { &ROUTER_TOPK_DECODE } else { &ROUTER_TOPK };
    launch_with(hidden.device(), kernel, &LaunchConfig { grid, block: Dim3::x(THREADS), shared_bytes: 0 }, &params)
}

/// The alignment alone, from `topk_ids [tokens, k]` computed elsewhere (global ids; those the map sends to -1 are
/// left out). `Error::InvalidArgument` for a bad `tile_m` or strided ids (the kernel reads them packed).
///
/// ```
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::router::{moe_align, ExpertMap};
///
/// let device = simulator();
/// // Two tokens of two experts each over three experts, tiles of 2 slots.
/// let ids = DeviceBuffer::from_slice(&device, &[2i32, 0, 2, 1])?;
/// let a = moe_align(ids.view([2, 2])?, &ExpertMap::identity(&device, 3)?, 2)?;
/// assert_eq!(a.expert_counts.to_vec()?, vec![1, 1, 2]);
/// assert_eq!(a.expert_offsets.to_vec()?, vec![0, 2, 4, 6]);
/// // A tile of 3 slots is a typed error:
/// assert!(matches!(moe_align(ids.view([2, 2])?, &ExpertMap::identity(&device, 3)?, 3), Err(small4::Error::InvalidArgument(_))));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn moe_align(topk_ids: Matrix<i32>, map: &ExpertMap, tile_m: usize) -> Result<Alignment> {
    let alignment = Alignment::alloc(topk_ids.device(), topk_ids.len(), map.local_experts, tile_m)?;
    moe_align_into(topk_ids, map, &alignment)?;
    Ok(alignment)
}

/// [`moe_align`] into preallocated outputs: `Error::Shape` when `out` was made for another pair count or map.
///
/// ```
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::router::{moe_align_into, max_padded_slots, Alignment, ExpertMap, MAX_EXPERTS, MAX_TILE_M};
///
/// let device = simulator();
/// let map = ExpertMap::identity(&device, 2)?;
/// // Three pairs (three tokens, k = 1) over two experts, tiles of 4 slots.
/// let out = Alignment::alloc(&device, 3, map.local_experts(), 4)?;
/// assert_eq!((out.max_padded, out.max_tiles), (max_padded_slots(3, 2, 4), out.max_padded / 4));
/// let ids = DeviceBuffer::from_slice(&device, &[1i32, 0, 1])?;
/// moe_align_into(ids.view([3, 1])?, &map, &out)?;
/// assert_eq!(out.expert_counts.to_vec()?, vec![1, 2]);
/// assert_eq!(out.expert_offsets.to_vec()?, vec![0, 4, 8]);
/// let sorted = out.sorted_pairs.to_vec()?;
/// assert_eq!(&sorted[..8], &[1, -1, -1, -1, 0, 2, -1, -1]); // pairs of expert 0, then expert 1, increasing
/// // Outputs made for another pair count are a typed error:
/// let err = moe_align_into(ids.view([1, 1])?, &map, &out);
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// // The limits: maps of at most MAX_EXPERTS experts, tiles of at most MAX_TILE_M slots.
/// assert!(ExpertMap::identity(&device, MAX_EXPERTS + 1).is_err());
/// assert!(Alignment::alloc(&device, 3, 2, 2 * MAX_TILE_M).is_err());
/// # Ok::<(), small4::Error>(())
/// ```
pub fn moe_align_into(topk_ids: Matrix<i32>, map: &ExpertMap, out: &Alignment) -> Result<()> {
    check_tile_m(out.tile_m)?;
    launch_align(topk_ids.device(), out.params(topk_ids, map)?)
}

fn launch_align(device: &Device, params: MoeAlignParams) -> Result<()> {
    let config = LaunchConfig { grid: Dim3::x(1), block: Dim3::x(THREADS), shared_bytes: 0 };
    launch_with(device, &MOE_ALIGN, &config, &params)
}

fn check_config(experts: usize, config: &RouterConfig) -> Result<()> {
    if experts == 0 || experts > MAX_EXPERTS {
        return Err(Error::InvalidArgument(format!("router: {experts} experts (1..={MAX_EXPERTS})")));
    }
    if config.k == 0 || config.k > MAX_K || config.k > experts {
        return Err(Error::InvalidArgument(format!("router: k = {} must be in 1..={} and <= {experts} experts", config.k, MAX_K)));
    }
    if !config.routed_scale.is_finite() {
        return Err(Error::InvalidArgument(format!("router: routed_scale {}", config.routed_scale)));
    }
    check_tile_m(config.tile_m)
}

fn check_tile_m(tile_m: usize) -> Result<()> {
    if !tile_m.is_power_of_two() || tile_m > MAX_TILE_M {
        return Err(Error::InvalidArgument(format!("tile_m {tile_m} must be a power of two in 1..={MAX_TILE_M}")));
    }
    Ok(())
}
