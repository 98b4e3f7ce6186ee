//! Collectives between ranks (one rank per GPU): the two operations the multi-GPU plans need.
//! Expert parallelism: every rank computes the MoE contribution of the experts it owns, then `all_reduce_sum`
//! adds the partial outputs. Tensor parallelism of attention: heads split over ranks, `wo` partial sums are
//! all-reduced the same way; `all_gather` assembles vocab-parallel logits.
//!
//! Two implementations of one trait: `NcclCollective` (cudarc's NCCL, the real one, one process driving all GPUs)
//! and `ThreadCollective` (ranks as threads exchanging through host memory: the test double that runs anywhere,
//! including over interpreter backends). The double reduces in rank order, so its results are deterministic.

use std::sync::{Arc, Barrier, Mutex};

use half::bf16;

use super::{Device, DeviceBuffer, DeviceElement};
use crate::error::{Error, Result};

/// Element types that can be summed across ranks.
///
/// ```
/// use half::bf16;
/// use small4::device::collective::ReduceElement;
///
/// assert_eq!(<f32 as ReduceElement>::add(1.5, 2.25), 3.75);
/// // bf16 adds in f32 and rounds once: 256 + 1 is not a bf16 (8 mantissa bits), so it rounds to even, 256.
/// let sum = <bf16 as ReduceElement>::add(bf16::from_f32(256.0), bf16::from_f32(1.0));
/// assert_eq!(sum.to_f32(), 256.0);
/// assert_eq!((<f32 as ReduceElement>::NAME, <bf16 as ReduceElement>::NAME), ("f32", "bf16"));
/// ```
pub trait ReduceElement: DeviceElement {
    /// The type's name in error messages ("f32", "bf16").
    const NAME: &'static str;
    /// The sum of two elements as a reduction computes it (bf16 adds in f32 and rounds once).
    fn add(a: Self, b: Self) -> Self;
}

impl ReduceElement for f32 {
    const NAME: &'static str = "f32";
    fn add(a: f32, b: f32) -> f32 {
        a + b
    }
}

impl ReduceElement for bf16 {
    const NAME: &'static str = "bf16";
    fn add(a: bf16, b: bf16) -> bf16 {
        bf16::from_f32(a.to_f32() + b.to_f32())
    }
}

/// The collective operations between the ranks of one group, each rank holding one `Collective`. Every rank must
/// call the same operations in the same order with buffers of the same length; a call returns once this rank's
/// result is in place (the thread double) or enqueued on its stream (NCCL).
pub trait Collective: Send + Sync {
    /// This rank's index in the group, `0..world_size()`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world_size(&self) -> usize;
    /// In place: every rank's `buffer` becomes the element-wise sum over ranks.
    fn all_reduce_sum_f32(&self, buffer: &DeviceBuffer<f32>) -> Result<()>;
    /// The bf16 form of [`Collective::all_reduce_sum_f32`].
    fn all_reduce_sum_bf16(&self, buffer: &DeviceBuffer<bf16>) -> Result<()>;
    /// `out` (`world_size * send.len()` elements) receives every rank's `send`, in rank order; `Error::Shape` when
    /// `out` has another length.
    fn all_gather_bf16(&self, send: &DeviceBuffer<bf16>, out: &DeviceBuffer<bf16>) -> Result<()>;
}

/// Host-memory exchange shared by the ranks of one `ThreadCollective` group.
struct Hub {
    barrier: Barrier,
    slots: Mutex<Vec<Vec<u8>>>,
}

/// One rank of a group of threads. Create the group with `ThreadCollective::group(n)` and move each rank to its
/// own thread; every rank must call the same collectives in the same order (as with NCCL).
///
/// Two ranks, each with its own interpreter device, summing a buffer:
///
/// ```
/// use small4::device::collective::{Collective, ThreadCollective};
/// use small4::device::{simulator, DeviceBuffer};
///
/// let ranks = ThreadCollective::group(2)?;
/// let sums = std::thread::scope(|scope| {
///     let handles: Vec<_> = ranks
///         .into_iter()
///         .map(|rank| {
///             scope.spawn(move || {
///                 let device = simulator();
///                 let r = rank.rank() as f32;
///                 let buffer = DeviceBuffer::from_slice(&device, &[1.0 + r, 10.0 * r, -r])?;
///                 rank.all_reduce_sum_f32(&buffer)?;
///                 buffer.to_vec()
///             })
///         })
///         .collect();
///     handles.into_iter().map(|h| h.join().unwrap()).collect::<Result<Vec<_>, small4::Error>>()
/// })?;
/// // rank 0 holds [1, 0, 0], rank 1 holds [2, 10, -1]: both end with the sum
/// assert_eq!(sums, vec![vec![3.0, 10.0, -1.0]; 2]);
/// # Ok::<(), small4::Error>(())
/// ```
pub struct ThreadCollective {
    rank: usize,
    world: usize,
    hub: Arc<Hub>,
}

impl ThreadCollective {
    /// The `world` ranks of a new group, in rank order. `Error::InvalidArgument` when `world` is 0.
    pub fn group(world: usize) -> Result<Vec<ThreadCollective>> {
        if world == 0 {
            return Err(Error::InvalidArgument("a collective group needs at least one rank".into()));
        }
        let hub = Arc::new(Hub { barrier: Barrier::new(world), slots: Mutex::new(vec![Vec::new(); world]) });
        Ok((0..world).map(|rank| ThreadCollective { rank, world, hub: hub.clone() }).collect())
    }

    /// Deposits this rank's bytes, waits for all, returns every rank's bytes in rank order, waits again so no rank
    /// overwrites a slot another still reads.
    fn exchange(&self, mine: Vec<u8>) -> Vec<Vec<u8>> {
        self.hub.slots.lock().unwrap()[self.rank] = mine;
        self.hub.barrier.wait();
        let all = self.hub.slots.lock().unwrap().clone();
        self.hub.barrier.wait();
        all
    }

    fn all_reduce<T: ReduceElement>(&self, buffer: &DeviceBuffer<T>) -> Result<()> {
        let mine = buffer.to_vec()?;
        let all = self.exchange(bytemuck::cast_slice(&mine).to_vec());
        if all.iter().any(|b| b.len() != all[0].len()) {
            return Err(Error::shape(format!("all_reduce_sum<{}> across ranks", T::NAME), all[0].len(), "different lengths"));
        }
        let mut sum: Vec<T> = bytemuck::pod_collect_to_vec(&all[0]);
        for other in &all[1..] {
            let other: Vec<T> = bytemuck::pod_collect_to_vec(other);
            for (s, o) in sum.iter_mut().zip(other) {
                *s = T::add(*s, o);
            }
        }
        buffer.copy_from(&sum)
    }
}

impl Collective for ThreadCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum_f32(&self, buffer: &DeviceBuffer<f32>) -> Result<()> {
        self.all_reduce(buffer)
    }
    fn all_reduce_sum_bf16(&self, buffer: &DeviceBuffer<bf16>) -> Result<()> {
        self.all_reduce(buffer)
    }
    fn all_gather_bf16(&self, send: &DeviceBuffer<bf16>, out: &DeviceBuffer<bf16>) -> Result<()> {
        if out.len() != send.len() * self.world {
            return Err(Error::shape("all_gather output", send.len() * self.world, out.len()));
        }
        let mine = send.to_vec()?;
        let all = self.exchange(bytemuck::cast_slice(&mine).to_vec());
        let gathered: Vec<bf16> = all.iter().flat_map(|b| bytemuck::pod_collect_to_vec::<u8, bf16>(b)).collect();
        out.copy_from(&gathered)
    }
}

/// NCCL over several CUDA devices driven from one process. Each rank enqueues on its device's stream.
///
/// It needs GPUs and libnccl: on a machine without them (this one) the example takes the `NoGpu` path.
///
/// ```
/// use std::sync::Arc;
/// use half::bf16;
/// use small4::device::collective::{Collective, NcclCollective};
/// use small4::device::cuda::CudaBackend;
/// use small4::device::{Device, DeviceBuffer};
/// use small4::Error;
///
/// let ranks = CudaBackend::new(0).map(Arc::new).and_then(|gpu| Ok((NcclCollective::for_devices(&[gpu.clone()])?, gpu)));
/// match ranks {
///     Ok((ranks, gpu)) => {
///         // One rank: the all-reduce sums over itself, so the buffer is unchanged.
///         assert_eq!((ranks.len(), ranks[0].rank(), ranks[0].world_size()), (1, 0, 1));
///         let device: Device = gpu;
///         let buffer = DeviceBuffer::from_slice(&device, &[bf16::from_f32(2.0); 4])?;
///         ranks[0].all_reduce_sum_bf16(&buffer)?;
///         assert_eq!(buffer.to_vec()?, vec![bf16::from_f32(2.0); 4]);
///     }
///     Err(Error::NoGpu(_)) => {} // no driver, no GPU or no libnccl
///     Err(other) => return Err(other),
/// }
/// # Ok::<(), small4::Error>(())
/// ```
pub struct NcclCollective {
    rank: usize,
    world: usize,
    comm: NcclComm,
    stream: cudarc::driver::sys::CUstream,
}

struct NcclComm(cudarc::nccl::sys::ncclComm_t);
// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not concurrent; each rank's
// communicator is owned by exactly one NcclCollective, which the engine drives from one thread.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}
unsafe impl Send for NcclCollective {}
unsafe impl Sync for NcclCollective {}

impl NcclCollective {
    /// One communicator per device (ranks 0..devices.len() in order). Fails with `Error::NoGpu` when NCCL or a GPU
    /// is missing.
    pub fn for_devices(devices: &[Arc<super::cuda::CudaBackend>]) -> Result<Vec<NcclCollective>> {
        // SAFETY: only tries to dlopen the NCCL library.
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Err(Error::NoGpu("the NCCL library (libnccl.so) was not found".into()));
        }
        let ordinals: Vec<i32> = devices.iter().map(|d| d.ordinal() as i32).collect();
        let mut comms = vec![std::ptr::null_mut(); devices.len()];
        unsafe { cudarc::nccl::result::comm_init_all(comms.as_mut_ptr(), devices.len() as i32, ordinals.as_ptr()) }
            .map_err(|e| Error::Cuda(format!("ncclCommInitAll: {e:?}")))?;
        Ok(comms
            .into_iter()
            .zip(devices)
            .enumerate()
            .map(|(rank, (comm, device))| NcclCollective { rank, world: devices.len(), comm: NcclComm(comm), stream: device.cu_stream() })
            .collect())
    }

    fn all_reduce_raw(&self, addr: u64, count: usize, dtype: cudarc::nccl::sys::ncclDataType_t) -> Result<()> {
        unsafe {
            cudarc::nccl::result::all_reduce(
                addr as *const std::ffi::c_void,
                addr as *mut std::ffi::c_void,
                count,
                dtype,
                cudarc::nccl::sys::ncclRedOp_t::ncclSum,
                self.comm.0,
                self.stream as _,
            )
        }
        .map(|_| ())
        .map_err(|e| Error::Cuda(format!("ncclAllReduce: {e:?}")))
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum_f32(&self, buffer: &DeviceBuffer<f32>) -> Result<()> {
        self.all_reduce_raw(buffer.addr(), buffer.len(), cudarc::nccl::sys::ncclDataType_t::ncclFloat32)
    }
    fn all_reduce_sum_bf16(&self, buffer: &DeviceBuffer<bf16>) -> Result<()> {
        self.all_reduce_raw(buffer.addr(), buffer.len(), cudarc::nccl::sys::ncclDataType_t::ncclBfloat16)
    }
    fn all_gather_bf16(&self, send: &DeviceBuffer<bf16>, out: &DeviceBuffer<bf16>) -> Result<()> {
        if out.len() != send.len() * self.world {
            return Err(Error::shape("all_gather output", send.len() * self.world, out.len()));
        }
        unsafe {
            cudarc::nccl::result::all_gather(
                send.addr() as *const std::ffi::c_void,
                out.addr() as *mut std::ffi::c_void,
                send.len(),
                cudarc::nccl::sys::ncclDataType_t::ncclBfloat16,
                self.comm.0,
                self.stream as _,
            )
        }
        .map(|_| ())
        .map_err(|e| Error::Cuda(format!("ncclAllGather: {e:?}")))
    }
}

/// Devices for the `world` ranks of a thread group, of the same kind as `like`: separate interpreter backends
/// (separate memories, as separate GPUs have), or on hardware one backend per rank on CUDA device 0. Same-kind
/// devices keep a comparison with a one-rank run on `like` bit-exact: the interpreter's transcendental functions
/// are not the GPU's, so mixing kinds would compare rounding, not the sharding.
///
/// ```
/// use half::bf16;
/// use small4::device::collective::{ranks_like, Collective, ThreadCollective};
/// use small4::device::{simulator, DeviceBuffer};
///
/// let devices = ranks_like(&simulator(), 2)?;
/// assert!(devices.iter().all(|d| d.name() == "sim"));
/// // Each rank sends two values; all_gather gives every rank all four, in rank order.
/// let gathered = std::thread::scope(|scope| {
///     let handles: Vec<_> = ThreadCollective::group(2)?
///         .into_iter()
///         .zip(&devices)
///         .map(|(rank, device)| {
///             scope.spawn(move || {
///                 let r = rank.rank() as f32;
///                 let send = DeviceBuffer::from_slice(device, &[bf16::from_f32(r), bf16::from_f32(r + 0.5)])?;
///                 let out = DeviceBuffer::<bf16>::alloc(device, 2 * rank.world_size())?;
///                 rank.all_gather_bf16(&send, &out)?;
///                 out.to_vec()
///             })
///         })
///         .collect();
///     handles.into_iter().map(|h| h.join().unwrap()).collect::<Result<Vec<_>, small4::Error>>()
/// })?;
/// let expected: Vec<bf16> = [0.0, 0.5, 1.0, 1.5].map(bf16::from_f32).to_vec();
/// assert_eq!(gathered, vec![expected.clone(), expected]);
/// # Ok::<(), small4::Error>(())
/// ```
pub fn ranks_like(like: &Device, world: usize) -> crate::error::Result<Vec<Device>> {
    (0..world).map(|_| if like.name() == "sim" { Ok(super::simulator()) } else { super::gpu() }).collect()
}
