//! The decoded form that the executor runs: each instruction decoded ONCE into an `Inst` with resolved register
//! indices, immediates, symbol addresses and a typed `Op`, so nothing is parsed or looked up per thread.

/// A PTX data type as named by an instruction's type modifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    Pred,
    B8,
    B16,
    B32,
    B64,
    B128,
    U8,
    U16,
    U32,
    U64,
    S8,
    S16,
    S32,
    S64,
    F16,
    F16x2,
    Bf16,
    Bf16x2,
    Tf32,
    F32,
    F64,
    E4m3,
    E5m2,
    E2m1,
    E4m3x2,
    E5m2x2,
    E2m1x2,
}

impl Ty {
    pub fn parse(s: &str) -> Option<Ty> {
        Some(match s {
            "pred" => Ty::Pred,
            "b8" => Ty::B8,
            "b16" => Ty::B16,
            "b32" => Ty::B32,
            "b64" => Ty::B64,
            "b128" => Ty::B128,
            "u8" => Ty::U8,
            "u16" => Ty::U16,
            "u32" => Ty::U32,
            "u64" => Ty::U64,
            "s8" => Ty::S8,
            "s16" => Ty::S16,
            "s32" => Ty::S32,
            "s64" => Ty::S64,
            "f16" => Ty::F16,
            "f16x2" => Ty::F16x2,
            "bf16" => Ty::Bf16,
            "bf16x2" => Ty::Bf16x2,
            "tf32" => Ty::Tf32,
            "f32" => Ty::F32,
            "f64" => Ty::F64,
            "e4m3" => Ty::E4m3,
            "e5m2" => Ty::E5m2,
            "e2m1" => Ty::E2m1,
            "e4m3x2" => Ty::E4m3x2,
            "e5m2x2" => Ty::E5m2x2,
            "e2m1x2" => Ty::E2m1x2,
            _ => return None,
        })
    }
    pub fn bits(self) -> u32 {
        match self {
            Ty::Pred => 1,
            Ty::B8 | Ty::U8 | Ty::S8 | Ty::E4m3 | Ty::E5m2 | Ty::E2m1x2 => 8,
            Ty::E2m1 => 4,
            Ty::B16 | Ty::U16 | Ty::S16 | Ty::F16 | Ty::Bf16 | Ty::E4m3x2 | Ty::E5m2x2 => 16,
            Ty::B32 | Ty::U32 | Ty::S32 | Ty::F32 | Ty::F16x2 | Ty::Bf16x2 | Ty::Tf32 => 32,
            Ty::B64 | Ty::U64 | Ty::S64 | Ty::F64 => 64,
            Ty::B128 => 128,
        }
    }
    pub fn bytes(self) -> u32 {
        self.bits().div_ceil(8)
    }
    pub fn is_signed(self) -> bool {
        matches!(self, Ty::S8 | Ty::S16 | Ty::S32 | Ty::S64)
    }
    pub fn is_float(self) -> bool {
        matches!(
            self,
            Ty::F16 | Ty::F16x2 | Ty::Bf16 | Ty::Bf16x2 | Ty::Tf32 | Ty::F32 | Ty::F64 | Ty::E4m3 | Ty::E5m2 | Ty::E2m1 | Ty::E4m3x2 | Ty::E5m2x2 | Ty::E2m1x2
        )
    }
    pub fn is_int(self) -> bool {
        !self.is_float() && self != Ty::Pred
    }
    /// The value's bits masked to this type's width.
    #[inline(always)]
    pub fn mask(self, v: u64) -> u64 {
        match self.bits() {
            64 | 128 => v,
            1 => v & 1,
            b => v & ((1u64 << b) - 1),
        }
    }
    /// Reads an integer operand of this type: sign-extended for signed types, masked otherwise.
    #[inline(always)]
    pub fn ext(self, v: u64) -> u64 {
        match self {
            Ty::S8 => v as i8 as i64 as u64,
            Ty::S16 => v as i16 as i64 as u64,
            Ty::S32 => v as i32 as i64 as u64,
            _ => self.mask(v),
        }
    }
}

/// The state spaces of PTX memory instructions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    Generic,
    Global,
    Shared,
    Local,
    Param,
    Const,
}

/// Special registers, resolved per lane at execution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SReg {
    Tid(u8),
    Ntid(u8),
    Ctaid(u8),
    Nctaid(u8),
    LaneId,
    WarpId,
    NWarpId,
    SmId,
    NSmId,
    GridId,
    LaneMaskEq,
    LaneMaskLt,
    LaneMaskLe,
    LaneMaskGt,
    LaneMaskGe,
    Clock,
    Clock64,
    GlobalTimer,
    DynamicSmemSize,
    TotalSmemSize,
    ClusterCtaRank,
    ClusterNCtaRank,
    /// `%cluster_ctaid.d` (0: clusters have one CTA), `%cluster_nctaid.d` (1), `%clusterid.d` (= `%ctaid`),
    /// `%nclusterid.d` (= `%nctaid`), `%is_explicit_cluster` (0).
    ClusterCtaid(u8),
    ClusterNctaid(u8),
    ClusterId(u8),
    NClusterId(u8),
    IsExplicitCluster,
}

impl SReg {
    pub fn parse(name: &str) -> Option<SReg> {
        let dim = |s: &str| match s {
            "x" => Some(0u8),
            "y" => Some(1),
            "z" => Some(2),
            _ => None,
        };
        if let Some((base, d)) = name.rsplit_once('.') {
            let d = dim(d)?;
            return Some(match base {
                "%tid" => SReg::Tid(d),
                "%ntid" => SReg::Ntid(d),
                "%ctaid" => SReg::Ctaid(d),
                "%nctaid" => SReg::Nctaid(d),
                "%cluster_ctaid" => SReg::ClusterCtaid(d),
                "%cluster_nctaid" => SReg::ClusterNctaid(d),
                "%clusterid" => SReg::ClusterId(d),
                "%nclusterid" => SReg::NClusterId(d),
                _ => return None,
            });
        }
        Some(match name {
            "%laneid" => SReg::LaneId,
            "%warpid" => SReg::WarpId,
            "%nwarpid" => SReg::NWarpId,
            "%smid" => SReg::SmId,
            "%nsmid" => SReg::NSmId,
            "%gridid" => SReg::GridId,
            "%lanemask_eq" => SReg::LaneMaskEq,
            "%lanemask_lt" => SReg::LaneMaskLt,
            "%lanemask_le" => SReg::LaneMaskLe,
            "%lanemask_gt" => SReg::LaneMaskGt,
            "%lanemask_ge" => SReg::LaneMaskGe,
            "%clock" => SReg::Clock,
            "%clock64" => SReg::Clock64,
            "%globaltimer" => SReg::GlobalTimer,
            "%dynamic_smem_size" => SReg::DynamicSmemSize,
            "%total_smem_size" => SReg::TotalSmemSize,
            "%cluster_ctarank" => SReg::ClusterCtaRank,
            "%cluster_nctarank" => SReg::ClusterNCtaRank,
            "%is_explicit_cluster" => SReg::IsExplicitCluster,
            _ => return None,
        })
    }
}

/// A source operand.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Src {
    Reg(u32),
    /// `!%p`: the negation of a predicate register.
    NotReg(u32),
    Imm(u64),
    Special(SReg),
}

/// `[base + offset]`; `base` None is an absolute address (or a symbol resolved into `offset`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Addr {
    pub base: Option<u32>,
    pub offset: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rnd {
    /// No rounding modifier written.
    None,
    Rn,
    Rz,
    Rm,
    Rp,
    Rna,
    /// Round to integral: `.rni .rzi .rmi .rpi`.
    Rni,
    Rzi,
    Rmi,
    Rpi,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntOp {
    Add,
    Sub,
    MulLo,
    MulHi,
    MulWide,
    Mul24Lo,
    MadLo,
    MadHi,
    MadWide,
    Div,
    Rem,
    Min,
    Max,
    Abs,
    Neg,
    And,
    Or,
    Xor,
    Not,
    CNot,
    Shl,
    Shr,
    Popc,
    Clz,
    Brev,
    Bfind,
    Bfe,
    Bfi,
    Sad,
    /// `dp4a.atype.btype`: four 8-bit products accumulated into 32 bits.
    Dp4a {
        a_signed: bool,
        b_signed: bool,
    },
    /// `lop3.b32 d, a, b, c, lut`: any 3-input bitwise function.
    Lop3,
    /// Funnel shifts `shf.{l,r}.{wrap,clamp}.b32 d, a, b, c` over the 64-bit value {b, a}.
    ShfL {
        wrap: bool,
    },
    ShfR {
        wrap: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatOp {
    Add,
    Sub,
    Mul,
    Fma,
    Div,
    Rcp,
    Sqrt,
    Rsqrt,
    Ex2,
    Lg2,
    Sin,
    Cos,
    Tanh,
    Min,
    Max,
    Abs,
    Neg,
    Copysign,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Lo,
    Ls,
    Hi,
    Hs,
    Equ,
    Neu,
    Ltu,
    Leu,
    Gtu,
    Geu,
    Num,
    Nan,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoolOp {
    And,
    Or,
    Xor,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtomOp {
    Add,
    Min,
    Max,
    Inc,
    Dec,
    And,
    Or,
    Xor,
    Exch,
    Cas,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShflMode {
    Up,
    Down,
    Bfly,
    Idx,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoteMode {
    All,
    Any,
    Uni,
    Ballot,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// bar.sync / barrier.sync: wait for the block.
    Sync,
    /// bar.arrive: count the arrival, do not wait.
    Arrive,
    /// bar.red.{popc,and,or}: barrier with a block-wide reduction of a predicate.
    RedPopc,
    RedAnd,
    RedOr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestpKind {
    Finite,
    Infinite,
    Number,
    NotANumber,
    Normal,
    Subnormal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrmtMode {
    Default,
    F4e,
    B4e,
    Rc8,
    Ecl,
    Ecr,
    Rc16,
}

/// mbarrier operations (PTX ISA §9.7.13.15). The barrier's address is `Inst::addr`; `Inst::s[0]` is 1 when that
/// address is a shared-window offset and 0 when it is generic, then come the count, transaction bytes, state or parity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MbarOp {
    /// `mbarrier.init [a], count`
    Init,
    /// `mbarrier.inval [a]`
    Inval,
    /// `mbarrier.arrive{.expect_tx}{.noComplete} state|_, [a]{, txCount}{, count}`; `drop` is `arrive_drop`
    /// (the expected count shrinks for every later phase).
    Arrive { expect_tx: bool, no_complete: bool, drop: bool },
    /// `mbarrier.expect_tx [a], txCount`
    ExpectTx,
    /// `mbarrier.complete_tx [a], txCount`
    CompleteTx,
    /// `mbarrier.test_wait` / `try_wait` (`{.parity}`): `p, [a], state|parity{, timeHint}`. Both block the lanes in
    /// the interpreter until the phase completes (a legal outcome of a poll loop), so spin loops let other warps run.
    Wait { parity: bool },
    /// `mbarrier.pending_count.b64 count, state`
    PendingCount,
}

/// `wgmma.mma_async.sync.aligned.m64nNkK.dtype.atype.btype` (PTX ISA §9.7.15.5.2): the immediates, fixed at decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WgmmaSpec {
    /// N: 8..=256 in steps of 8 (M is 64).
    pub n: u32,
    /// K: 8 for tf32 inputs, 16 for f16/bf16, 32 for e4m3/e5m2 (32 bytes of K per row in every case).
    pub k: u32,
    /// Accumulator type (f32, or f16 with f16 or fp8 inputs).
    pub d_ty: Ty,
    /// Input types of A and B (both tf32, both f16 or both bf16; or e4m3/e5m2 in any mix).
    pub a_ty: Ty,
    pub b_ty: Ty,
    /// A in four registers per thread (the RS form) instead of a shared-memory descriptor.
    pub a_in_regs: bool,
    /// `imm-scale-a` / `imm-scale-b` = -1.
    pub neg_a: bool,
    pub neg_b: bool,
    /// `imm-trans-a` / `imm-trans-b` = 1: the operand is M- / N-major in shared memory instead of K-major.
    pub trans_a: bool,
    pub trans_b: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmaShape {
    pub m: u32,
    pub n: u32,
    pub k: u32,
}

/// Instruction classes for the per-launch counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    Integer,
    Float,
    Convert,
    Move,
    Control,
    GlobalMemory,
    SharedMemory,
    OtherMemory,
    Atomic,
    AsyncCopy,
    Sync,
    WarpCollective,
    Tensor,
}

impl Class {
    pub const ALL: [Class; 13] = [
        Class::Integer,
        Class::Float,
        Class::Convert,
        Class::Move,
        Class::Control,
        Class::GlobalMemory,
        Class::SharedMemory,
        Class::OtherMemory,
        Class::Atomic,
        Class::AsyncCopy,
        Class::Sync,
        Class::WarpCollective,
        Class::Tensor,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Class::Integer => "integer",
            Class::Float => "float",
            Class::Convert => "convert",
            Class::Move => "move",
            Class::Control => "control",
            Class::GlobalMemory => "global memory",
            Class::SharedMemory => "shared memory",
            Class::OtherMemory => "local/param/const memory",
            Class::Atomic => "atomic",
            Class::AsyncCopy => "async copy",
            Class::Sync => "barrier/fence",
            Class::WarpCollective => "warp collective",
            Class::Tensor => "tensor core",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Mov(Ty),
    /// `mov.b32 %r, {%rs0, %rs1}`: packs `parts` sources of `bits` each, first = least significant.
    Pack {
        parts: u32,
        bits: u32,
    },
    /// `mov.b32 {%rs0, %rs1}, %r`
    Unpack {
        parts: u32,
        bits: u32,
    },
    Int {
        op: IntOp,
        ty: Ty,
        sat: bool,
    },
    Prmt(PrmtMode),
    Float {
        op: FloatOp,
        ty: Ty,
        rnd: Rnd,
        ftz: bool,
        sat: bool,
        approx: bool,
    },
    Setp {
        cmp: Cmp,
        ty: Ty,
        combine: Option<BoolOp>,
        ftz: bool,
    },
    /// `set.cmp.dtype.stype`: 0xffffffff / 1.0f on true.
    Set {
        cmp: Cmp,
        dty: Ty,
        ty: Ty,
        combine: Option<BoolOp>,
    },
    Selp(Ty),
    Slct {
        ty: Ty,
        cty: Ty,
    },
    Cvt {
        dty: Ty,
        sty: Ty,
        rnd: Rnd,
        ftz: bool,
        sat: bool,
        satfinite: bool,
        relu: bool,
    },
    /// `cvta.space` (to generic) or `cvta.to.space` (from generic).
    Cvta {
        space: Space,
        to_space: bool,
        bits: u32,
    },
    /// `isspacep.space`
    IsSpace(Space),
    Ld {
        space: Space,
        ty: Ty,
        vec: u32,
        nc: bool,
    },
    St {
        space: Space,
        ty: Ty,
        vec: u32,
    },
    Atom {
        space: Space,
        op: AtomOp,
        ty: Ty,
        returns: bool,
        vec: u32,
    },
    CpAsync {
        bytes: u32,
        zfill: bool,
    },
    CpAsyncCommit,
    CpAsyncWait(u32),
    Bra(u32),
    Exit,
    Bar {
        kind: BarKind,
        id_is_operand: bool,
        has_count: bool,
    },
    BarWarp,
    Fence,
    /// `fence.proxy.async{.space}` (and the `async::generic` forms): orders this thread's generic-proxy accesses
    /// with later async-proxy ones (wgmma operands, TMA / bulk store sources).
    ProxyFence,
    /// `griddepcontrol.wait`: blocks until the grids this one depends on completed (launches are sequential, so it
    /// returns at once); in a programmatic launch it ends the thread's window of restricted accesses.
    GridDepWait,
    /// `griddepcontrol.launch_dependents`: lets the dependent grid start once every block executed it or exited.
    GridDepLaunchDependents,
    Shfl(ShflMode),
    Vote(VoteMode),
    Activemask,
    /// `elect.sync d|p, membermask`: the lowest member lane is the leader.
    Elect,
    /// An mbarrier operation on a barrier in this CTA's shared memory (`.shared::cluster` forms: cluster of one CTA).
    Mbar(MbarOp),
    /// `setmaxnreg.{inc,dec}.sync.aligned.u32 n`: no effect on an interpreter beyond its checks.
    SetMaxNReg(u32),
    /// `mapa{.shared::cluster}.{u32,u64} d, a, rank`: the address of `a` in CTA `rank` of the cluster (one CTA).
    Mapa,
    /// `getctarank{.shared::cluster}.{u32,u64} d, a`: the cluster rank owning `a` (always 0).
    GetCtaRank,
    /// `cp.async.bulk.tensor.Nd.shared::{cluster,cta}.global{.tile}.mbarrier::complete_tx::bytes [dst], [map, {c..}],
    /// [mbar]`: `addr` = dst; `s` = map address (base, offset), the `dims` coordinates, mbarrier (base, offset).
    TmaLoad {
        dims: u32,
    },
    /// `cp.async.bulk.tensor.Nd.global.shared::cta{.tile}.bulk_group [map, {c..}], [src]`: `addr` = src; `s` = map
    /// address (base, offset), the coordinates.
    TmaStore {
        dims: u32,
    },
    /// `cp.async.bulk.shared::{cluster,cta}.global.mbarrier::complete_tx::bytes [dst], [src], size, [mbar]`:
    /// `addr` = dst; `s` = src (base, offset), size, mbarrier (base, offset).
    BulkLoad,
    /// `cp.async.bulk.global.shared::cta.bulk_group [dst], [src], size`: `addr` = src; `s` = dst (base, offset), size.
    BulkStore,
    /// `cp.async.bulk.commit_group`
    BulkCommit,
    /// An L2 prefetch: no architectural effect, but the timing model counts the bytes it pulls into L2
    /// (`Counters::prefetch_sectors`). `prefetch{.global}.L2{::evict_*} [a]` (`bulk` false: the 128-byte line holding
    /// `a`; `space` Global or Generic) or `cp.async.bulk.prefetch.L2.global [a], size{, policy}` (`bulk` true: `s[0]` =
    /// size; `space` Global). `addr` = a.
    PrefetchL2 {
        space: Space,
        bulk: bool,
    },
    /// `cp.async.bulk.wait_group{.read} n`
    BulkWait {
        n: u32,
        read: bool,
    },
    /// `wgmma.mma_async`: `d` = the accumulator registers; `s` = A (one descriptor, or four registers), the B
    /// descriptor, scale-d.
    Wgmma(WgmmaSpec),
    /// `wgmma.fence.sync.aligned`
    WgmmaFence,
    /// `wgmma.commit_group.sync.aligned`
    WgmmaCommit,
    /// `wgmma.wait_group.sync.aligned n`
    WgmmaWait(u32),
    /// `barrier.cluster.arrive{.release|.relaxed}{.aligned}`
    ClusterArrive,
    /// `barrier.cluster.wait{.acquire}{.aligned}`
    ClusterWait,
    /// `testp.{finite,infinite,number,notanumber,normal,subnormal}.type p, a`
    Testp {
        test: TestpKind,
        ty: Ty,
    },
    Redux {
        op: AtomOp,
        ty: Ty,
    },
    Match {
        all: bool,
        ty: Ty,
    },
    Ldmatrix {
        num: u32,
        trans: bool,
    },
    /// `stmatrix`
    Stmatrix {
        num: u32,
        trans: bool,
    },
    Mma {
        shape: MmaShape,
        a: Ty,
        b: Ty,
        c: Ty,
        d: Ty,
    },
    /// A direct call: copy the arguments (local offset from, to, bytes), save pc + 1 in `ret_reg`, jump to `target`.
    Call {
        target: u32,
        callee: String,
        ret_reg: u32,
        copies: Vec<(u32, u32, u32)>,
    },
    /// Return from a device function to the address in the register.
    Return(u32),
    /// Copies between per-thread local areas (a callee's return values to the caller's).
    CopyLocal(Vec<(u32, u32, u32)>),
    /// `__assertfail(message, file, line, function, char size)`: the local areas holding its arguments.
    AssertFail(Vec<u32>),
    /// Instructions with no effect on an interpreter's state (prefetch, createpolicy writes 0, nanosleep, pmevent).
    Nop,
    /// `createpolicy`: the cache policy is opaque to kernels; writes 0.
    CreatePolicy,
    Trap,
    /// Decodes but cannot run: executing it is an error naming it and its line.
    Unsupported(String),
}

impl Op {
    pub fn class(&self) -> Class {
        match self {
            Op::Mov(_) | Op::Pack { .. } | Op::Unpack { .. } | Op::Selp(_) | Op::Slct { .. } | Op::Cvta { .. } | Op::IsSpace(_) | Op::CreatePolicy => {
                Class::Move
            }
            Op::Int { .. }
            | Op::Prmt(_)
            | Op::Setp {
                ty: Ty::Pred | Ty::B8 | Ty::B16 | Ty::B32 | Ty::B64 | Ty::U8 | Ty::U16 | Ty::U32 | Ty::U64 | Ty::S8 | Ty::S16 | Ty::S32 | Ty::S64,
                ..
            } => Class::Integer,
            Op::Float { .. } | Op::Setp { .. } | Op::Set { .. } => Class::Float,
            Op::Cvt { .. } => Class::Convert,
            Op::Ld { space: Space::Global, .. } | Op::St { space: Space::Global, .. } | Op::PrefetchL2 { bulk: false, .. } => Class::GlobalMemory,
            Op::Ld { space: Space::Shared, .. } | Op::St { space: Space::Shared, .. } | Op::Ldmatrix { .. } | Op::Stmatrix { .. } => Class::SharedMemory,
            Op::Ld { .. } | Op::St { .. } => Class::OtherMemory,
            Op::Atom { .. } => Class::Atomic,
            Op::CpAsync { .. } | Op::CpAsyncCommit | Op::CpAsyncWait(_) => Class::AsyncCopy,
            Op::TmaLoad { .. }
            | Op::TmaStore { .. }
            | Op::BulkLoad
            | Op::BulkStore
            | Op::BulkCommit
            | Op::BulkWait { .. }
            | Op::PrefetchL2 { bulk: true, .. } => Class::AsyncCopy,
            Op::Bra(_) | Op::Exit | Op::Trap | Op::Nop | Op::Unsupported(_) | Op::Call { .. } | Op::Return(_) | Op::CopyLocal(_) | Op::AssertFail(_) => {
                Class::Control
            }
            Op::Bar { .. }
            | Op::BarWarp
            | Op::Fence
            | Op::ProxyFence
            | Op::GridDepWait
            | Op::GridDepLaunchDependents
            | Op::Mbar(_)
            | Op::ClusterArrive
            | Op::ClusterWait
            | Op::SetMaxNReg(_) => Class::Sync,
            Op::Mapa | Op::GetCtaRank => Class::Move,
            Op::Shfl(_) | Op::Vote(_) | Op::Activemask | Op::Elect | Op::Redux { .. } | Op::Match { .. } => Class::WarpCollective,
            Op::Testp { .. } => Class::Float,
            Op::Mma { .. } | Op::Wgmma(_) => Class::Tensor,
            Op::WgmmaFence | Op::WgmmaCommit | Op::WgmmaWait(_) => Class::Sync,
        }
    }
}

/// One decoded instruction. `d` holds destination registers (None = the `_` sink); `s` the sources, flattened in
/// operand order (vector operands contribute their elements).
#[derive(Clone, Debug)]
pub struct Inst {
    pub op: Op,
    pub guard: Option<(u32, bool)>,
    pub d: Vec<Option<u32>>,
    pub s: Vec<Src>,
    pub addr: Option<Addr>,
    /// PTX source line, for error messages.
    pub line: u32,
}

/// A parameter of an `.entry`: where it lies in the param space.
#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub offset: u32,
    pub bytes: u32,
}

/// A kernel ready to run.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub name: String,
    pub code: Vec<Inst>,
    pub num_regs: u32,
    pub params: Vec<Param>,
    pub param_bytes: u32,
    /// Static shared memory (its own and module-level `.shared`), bytes; dynamic shared starts at `dynamic_offset`.
    pub static_shared: u32,
    pub dynamic_offset: u32,
    pub dynamic_align: u32,
    /// Per-thread `.local` bytes.
    pub local_bytes: u32,
}
