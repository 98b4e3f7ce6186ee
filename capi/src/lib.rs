//! The C ABI of small4 (`include/small4.h`, generated from this file by cbindgen): the generator (open a checkpoint
//! on the CPU reference, the PTX interpreter or a GPU, and generate token ids) and the kernels over raw device
//! addresses of the caller's own buffers, launched on the caller's CUDA stream.
//!
//! Conventions of every function:
//! - it returns a [`Small4Status`]; [`Small4Status::Ok`] is 0, every other value mirrors a `small4::Error` variant
//!   (plus [`Small4Status::Panic`] for a bug inside small4), and [`small4_last_error`] gives the message of the
//!   calling thread's last failure;
//! - no panic crosses the boundary (each call runs under `catch_unwind`), and a null handle or pointer is an
//!   [`Small4Status::InvalidArgument`], never a crash;
//! - handles are opaque, created by `*_open` and released by `*_free` (which accept null);
//! - device memory is named by its `uint64_t` device address: on a GPU a `CUdeviceptr` (what `cudaMalloc` returns,
//!   cast), on the interpreter an address from [`small4_device_alloc`].
//!
//! The ABI is versioned by [`SMALL4_ABI_VERSION`]: see docs/capi.md.

#![warn(missing_docs)]

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use half::bf16;
use small4::device::{Device, DeviceBuffer, DeviceElement};
use small4::kernels::attention::{
    mla_attention, mla_cache_write, AttentionScratch, BlockTables, CacheWriteWeights, PagedCache, Queries, QueryLayout, TokenSlots, KV_LORA_RANK, QK_ROPE,
};
use small4::kernels::moe::{moe_layer, moe_tile_m, Fp8ActScales, Grouping, MoeLayerWeights, MoeWorkspace, RoutingBuffers};
use small4::kernels::ops::{rope_q_k, sample, QueryScale, SamplingInputs};
use small4::kernels::router::{moe_align, route_and_align_into, Alignment, ExpertMap, RouterConfig, RouterWorkspace, Routing};
use small4::model::checkpoint::{Checkpoint, Layout};
use small4::model::engine::Sampling;
use small4::model::generator::{GenerationBackend, Generator, GeneratorOptions};
use small4::model::kv_cache::{BatchTables, CacheDescriptor, CacheDtype};
use small4::quant::repack::{repack_gate_up, repack_linear, MatrixRef, PackedWeights, QuantData};
use small4::quant::WeightFormat;
use small4::{Error, Result};

/// The version of this C ABI. It changes whenever a declaration of `small4.h` changes incompatibly (a function's
/// signature or meaning, a struct's layout, an enum's values); additions keep it. Compare it with
/// [`small4_abi_version`] at run time to detect a header/library mismatch.
pub const SMALL4_ABI_VERSION: u32 = 1;

/// What a call returned. `Ok` is 0; the others mirror `small4::Error`'s variants.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Small4Status {
    /// Success.
    Ok = 0,
    /// No CUDA driver or no GPU (`Error::NoGpu`).
    NoGpu = 1,
    /// The CUDA driver failed (`Error::Cuda`).
    Cuda = 2,
    /// The PTX interpreter reported a fault: out of bounds, uninitialised read, race (`Error::Simulator`).
    Simulator = 3,
    /// A size or shape does not match (`Error::Shape`).
    Shape = 4,
    /// A bad argument: null pointer, zero size, unaligned address, value out of its domain (`Error::InvalidArgument`).
    InvalidArgument = 5,
    /// A dtype the call does not know (`Error::UnknownDtype`).
    UnknownDtype = 6,
    /// An index (a token id, an expert) out of range (`Error::OutOfRange`).
    OutOfRange = 7,
    /// A model configuration is invalid (`Error::Config`).
    Config = 8,
    /// A checkpoint is missing or malformed (`Error::Checkpoint`).
    Checkpoint = 9,
    /// The tokenizer failed (`Error::Tokenizer`).
    Tokenizer = 10,
    /// An unknown sequence (`Error::UnknownSequence`).
    UnknownSequence = 11,
    /// The KV cache has no free pages left (`Error::OutOfPages`).
    OutOfPages = 12,
    /// A file could not be read or written (`Error::Io`).
    Io = 13,
    /// A JSON file is malformed (`Error::Json`).
    Json = 14,
    /// An image could not be decoded (`Error::ImageUnreadable`).
    ImageUnreadable = 15,
    /// An image file or side is over the limits (`Error::ImageTooLarge`).
    ImageTooLarge = 16,
    /// A bug inside small4 (a panic, caught at the boundary); the message says where.
    Panic = 99,
}

impl From<&Error> for Small4Status {
    fn from(e: &Error) -> Self {
        match e {
            Error::NoGpu(_) => Small4Status::NoGpu,
            Error::Cuda(_) => Small4Status::Cuda,
            Error::Simulator(_) => Small4Status::Simulator,
            Error::Shape { .. } => Small4Status::Shape,
            Error::InvalidArgument(_) => Small4Status::InvalidArgument,
            Error::UnknownDtype(_) => Small4Status::UnknownDtype,
            Error::OutOfRange { .. } => Small4Status::OutOfRange,
            Error::Config(_) => Small4Status::Config,
            Error::Checkpoint(_) => Small4Status::Checkpoint,
            Error::Tokenizer(_) => Small4Status::Tokenizer,
            Error::UnknownSequence(_) => Small4Status::UnknownSequence,
            Error::OutOfPages { .. } => Small4Status::OutOfPages,
            Error::Io { .. } => Small4Status::Io,
            Error::Json { .. } => Small4Status::Json,
            Error::ImageUnreadable { .. } => Small4Status::ImageUnreadable,
            Error::ImageTooLarge { .. } => Small4Status::ImageTooLarge,
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: String) {
    // A message with an interior NUL is cut there rather than lost.
    let message = CString::new(message).unwrap_or_else(|e| {
        let end = e.nul_position();
        CString::new(&e.into_vec()[..end]).unwrap_or_default()
    });
    LAST_ERROR.with(|last| *last.borrow_mut() = message);
}

/// Runs one ABI call: its error becomes a status and the thread's last-error message, a panic becomes
/// [`Small4Status::Panic`].
fn call(body: impl FnOnce() -> Result<()>) -> Small4Status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => Small4Status::Ok,
        Ok(Err(e)) => {
            set_last_error(e.to_string());
            Small4Status::from(&e)
        }
        Err(panic) => {
            let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
            set_last_error(format!("internal error (a bug in small4): {}", what.unwrap_or_else(|| "a panic".into())));
            Small4Status::Panic
        }
    }
}

fn null(what: &str) -> Error {
    Error::InvalidArgument(format!("{what} is a null pointer"))
}

/// `&T` from a caller's pointer, or a typed error when it is null.
///
/// # Safety
/// A non-null `ptr` must point to a valid `T` for the call's duration.
unsafe fn reference<'a, T>(ptr: *const T, what: &str) -> Result<&'a T> {
    unsafe { ptr.as_ref() }.ok_or_else(|| null(what))
}

/// # Safety
/// A non-null `ptr` must point to a valid, writable `T` not aliased for the call's duration.
unsafe fn reference_mut<'a, T>(ptr: *mut T, what: &str) -> Result<&'a mut T> {
    unsafe { ptr.as_mut() }.ok_or_else(|| null(what))
}

/// A slice from a caller's pointer and length (a null pointer is allowed only with length 0).
///
/// # Safety
/// A non-null `ptr` must point to `len` valid elements for the call's duration.
unsafe fn slice<'a, T>(ptr: *const T, len: usize, what: &str) -> Result<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(null(what));
    }
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// # Safety
/// As [`slice`], and the elements must be writable and not aliased.
unsafe fn slice_mut<'a, T>(ptr: *mut T, len: usize, what: &str) -> Result<&'a mut [T]> {
    if len == 0 {
        return Ok(&mut []);
    }
    if ptr.is_null() {
        return Err(null(what));
    }
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

/// # Safety
/// A non-null `ptr` must be a NUL-terminated string.
unsafe fn string<'a>(ptr: *const c_char, what: &str) -> Result<&'a str> {
    if ptr.is_null() {
        return Err(null(what));
    }
    unsafe { CStr::from_ptr(ptr) }.to_str().map_err(|_| Error::InvalidArgument(format!("{what} is not UTF-8")))
}

/// Stores a new handle in `*out` (after checking `out` before any work is done).
///
/// # Safety
/// A non-null `out` must be writable.
unsafe fn store<T>(out: *mut *mut T, value: T) -> Result<()> {
    let slot = unsafe { reference_mut(out, "the output handle") }?;
    *slot = Box::into_raw(Box::new(value));
    Ok(())
}

fn elements(a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| Error::InvalidArgument(format!("{what}: {a} x {b} elements overflow")))
}

/// The version of the library that was loaded: compare with the header's [`SMALL4_ABI_VERSION`].
#[no_mangle]
pub extern "C" fn small4_abi_version() -> u32 {
    SMALL4_ABI_VERSION
}

/// The message of the calling thread's last failed call (empty when none failed yet). The string stays valid until
/// the thread's next failing call.
#[no_mangle]
pub extern "C" fn small4_last_error() -> *const c_char {
    LAST_ERROR.with(|last| last.borrow().as_ptr())
}

// ---------------------------------------------------------------------------------------------------------------
// Devices and their memory

/// A device the kernels launch on: the PTX interpreter, or a GPU bound to one CUDA stream.
pub struct Small4Device {
    device: Device,
}

/// Opens the PTX interpreter: it runs the kernels' exact PTX on the CPU with memory checks. Its device memory comes
/// from [`small4_device_alloc`].
///
/// # Safety
/// `out` must be null or writable.
#[no_mangle]
pub unsafe extern "C" fn small4_device_open_sim(out: *mut *mut Small4Device) -> Small4Status {
    call(|| unsafe { store(out, Small4Device { device: small4::device::simulator() }) })
}

/// Opens CUDA device `ordinal` with every launch, copy and synchronisation on `cu_stream` (a `CUstream` or
/// `cudaStream_t` of the device's primary context, which the runtime API uses); null means a stream of small4's own.
/// Without a driver or a GPU: [`Small4Status::NoGpu`].
///
/// # Safety
/// A non-null `cu_stream` must be a valid stream of that context and outlive the device handle; `out` must be null
/// or writable.
#[no_mangle]
pub unsafe extern "C" fn small4_device_open_gpu(ordinal: u32, cu_stream: *mut c_void, out: *mut *mut Small4Device) -> Small4Status {
    call(|| {
        let backend = if cu_stream.is_null() {
            small4::device::cuda::CudaBackend::new(ordinal as usize)?
        } else {
            // SAFETY: forwarded from this function's contract.
            unsafe { small4::device::cuda::CudaBackend::on_borrowed_stream(ordinal as usize, cu_stream.cast()) }?
        };
        unsafe { store(out, Small4Device { device: std::sync::Arc::new(backend) }) }
    })
}

/// Releases a device handle (null is ignored). Memory from [`small4_device_alloc`] must be freed before.
///
/// # Safety
/// `device` must be null or a handle from a `small4_device_open_*` call, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn small4_device_free(device: *mut Small4Device) {
    if !device.is_null() {
        // Dropping the backend runs no user code that could panic across the boundary except the driver's teardown,
        // which is caught here like every other call.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(device) })));
    }
}

/// # Safety
/// A non-null `device` must be a live handle.
unsafe fn device<'a>(device: *const Small4Device) -> Result<&'a Device> {
    Ok(&unsafe { reference(device, "the device handle") }?.device)
}

/// Allocates `bytes` of device memory (uninitialised: the interpreter reports reads before writes) and stores its
/// address in `*addr`.
///
/// # Safety
/// `device` must be null or live; `addr` null or writable.
#[no_mangle]
pub unsafe extern "C" fn small4_device_alloc(device: *const Small4Device, bytes: usize, addr: *mut u64) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        let out = unsafe { reference_mut(addr, "addr") }?;
        *out = device.alloc(bytes.max(1))?;
        Ok(())
    })
}

/// Frees memory from [`small4_device_alloc`]; any other address is an error, not undefined behaviour.
///
/// # Safety
/// `device` must be null or live.
#[no_mangle]
pub unsafe extern "C" fn small4_device_release(device: *const Small4Device, addr: u64) -> Small4Status {
    call(|| unsafe { self::device(device) }?.free(addr))
}

/// Copies `bytes` from host memory `src` to device address `dst` (after the device's queued work).
///
/// # Safety
/// `device` must be null or live; `src` null or `bytes` readable bytes; `dst` device memory of `bytes` bytes.
#[no_mangle]
pub unsafe extern "C" fn small4_device_write(device: *const Small4Device, dst: u64, src: *const c_void, bytes: usize) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        device.write(dst, unsafe { slice(src.cast::<u8>(), bytes, "src") }?)
    })
}

/// Copies `bytes` from device address `src` to host memory `dst` (after the device's queued work).
///
/// # Safety
/// `device` must be null or live; `dst` null or `bytes` writable bytes; `src` device memory of `bytes` bytes.
#[no_mangle]
pub unsafe extern "C" fn small4_device_read(device: *const Small4Device, dst: *mut c_void, src: u64, bytes: usize) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        device.read(src, unsafe { slice_mut(dst.cast::<u8>(), bytes, "dst") }?)
    })
}

/// Waits for the device's queued work; errors kernels raised asynchronously surface here.
///
/// # Safety
/// `device` must be null or live.
#[no_mangle]
pub unsafe extern "C" fn small4_device_synchronize(device: *const Small4Device) -> Small4Status {
    call(|| unsafe { self::device(device) }?.synchronize())
}

// ---------------------------------------------------------------------------------------------------------------
// Kernels over raw device addresses

/// A view of `len` elements of the caller's device memory at `addr`.
///
/// # Safety
/// `addr` must hold `len` elements of `T` on `device` for the duration of the call.
unsafe fn borrowed<T: DeviceElement>(device: &Device, addr: u64, len: usize) -> Result<DeviceBuffer<T>> {
    // SAFETY: forwarded from the calling ABI function's contract.
    unsafe { DeviceBuffer::from_raw_borrowed(device, addr, len) }
}

/// RMSNorm of `rows` bf16 rows of `cols` columns: `out = x * rsqrt(mean(x^2) + eps) * weight` (f32 accumulation).
/// `x`, `out`: `[rows, cols]` bf16; `weight`: `[cols]` bf16.
///
/// # Safety
/// `device` must be null or live; the addresses must hold the sizes above on that device.
#[no_mangle]
pub unsafe extern "C" fn small4_rms_norm(device: *const Small4Device, x: u64, weight: u64, out: u64, rows: usize, cols: usize, eps: f32) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        let n = elements(rows, cols, "rms_norm")?;
        let (x, out) = unsafe { (borrowed::<bf16>(device, x, n)?, borrowed::<bf16>(device, out, n)?) };
        let weight = unsafe { borrowed::<bf16>(device, weight, cols) }?;
        small4::kernels::norm::rms_norm(x.view([rows, cols])?, weight.as_vector(), out.view([rows, cols])?, eps)
    })
}

/// The decoder's fused step: `residual_out = x + residual` (rounded to bf16), then `out = rms_norm(residual_out)`.
/// `x`, `residual`, `residual_out`, `out`: `[rows, cols]` bf16; `weight`: `[cols]` bf16.
///
/// # Safety
/// `device` must be null or live; the addresses must hold the sizes above on that device.
#[no_mangle]
pub unsafe extern "C" fn small4_add_rms_norm(
    device: *const Small4Device,
    x: u64,
    residual: u64,
    weight: u64,
    residual_out: u64,
    out: u64,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        let n = elements(rows, cols, "add_rms_norm")?;
        let rows_of = |addr| unsafe { borrowed::<bf16>(device, addr, n) };
        let (x, residual, residual_out, out) = (rows_of(x)?, rows_of(residual)?, rows_of(residual_out)?, rows_of(out)?);
        let weight = unsafe { borrowed::<bf16>(device, weight, cols) }?;
        let shape = [rows, cols];
        small4::kernels::norm::add_rms_norm(x.view(shape)?, residual.view(shape)?, weight.as_vector(), residual_out.view(shape)?, out.view(shape)?, eps)
    })
}

/// SwiGLU: `out[t] = silu(gate_up[t, :hidden]) * gate_up[t, hidden:]`. `gate_up`: `[tokens, 2 * hidden]` bf16;
/// `out`: `[tokens, hidden]` bf16.
///
/// # Safety
/// `device` must be null or live; the addresses must hold the sizes above on that device.
#[no_mangle]
pub unsafe extern "C" fn small4_silu_mul(device: *const Small4Device, gate_up: u64, out: u64, tokens: usize, hidden: usize) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        let n = elements(tokens, hidden, "silu_mul")?;
        let gate_up = unsafe { borrowed::<bf16>(device, gate_up, elements(n, 2, "silu_mul")?) }?;
        let out = unsafe { borrowed::<bf16>(device, out, n) }?;
        small4::kernels::ops::silu_mul(gate_up.view([tokens, elements(2, hidden, "silu_mul")?])?, out.view([tokens, hidden])?)
    })
}

/// RoPE in place, on interleaved pairs (pair i of a head is its values `head_dim - rope_dim + 2i`, `+ 2i + 1`, turned
/// by `positions[t] * inv_freq[i]`): the last `rope_dim` values of every head of `q` (`[tokens, heads, head_dim]`
/// bf16), then all of q times the llama-4 query scale `1 + scale_beta * ln(1 + floor(position / original_max_position))`;
/// and, when `k` is not 0, the `rope_dim` values at `k_offset` of each `k_row_stride`-element bf16 row of `k` (e.g.
/// the k_rope inside the kv_a projection's output: offset 256, stride 320). `positions`: `[tokens]` int32 (>= 0);
/// `inv_freq`: `[rope_dim / 2]` f32 (the YaRN frequencies). head_dim, rope_dim, k_offset and k_row_stride are
/// multiples of 8.
///
/// # Safety
/// `device` must be null or live; the addresses must hold the sizes above on that device.
#[no_mangle]
pub unsafe extern "C" fn small4_rope_q_k(
    device: *const Small4Device,
    q: u64,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    k: u64,
    k_offset: usize,
    k_row_stride: usize,
    positions: u64,
    inv_freq: u64,
    rope_dim: usize,
    scale_beta: f32,
    original_max_position: usize,
) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        if rope_dim % 2 != 0 {
            return Err(Error::InvalidArgument(format!("rope_dim {rope_dim} is odd")));
        }
        let q = unsafe { borrowed::<bf16>(device, q, elements(elements(tokens, heads, "rope q")?, head_dim, "rope q")?) }?;
        let k = if k == 0 { None } else { Some(unsafe { borrowed::<bf16>(device, k, elements(tokens, k_row_stride, "rope k")?) }?) };
        let positions = unsafe { borrowed::<i32>(device, positions, tokens) }?;
        let inv_freq = unsafe { borrowed::<f32>(device, inv_freq, rope_dim / 2) }?;
        // The rope values of each k row: rope_dim columns at k_offset of rows k_row_stride apart.
        let k = match &k {
            Some(_) if k_offset + rope_dim > k_row_stride => {
                return Err(Error::InvalidArgument(format!("rope k: offset {k_offset} + rope_dim {rope_dim} exceeds the row stride {k_row_stride}")))
            }
            Some(rows) => Some(small4::kernels::TensorView::strided(rows, k_offset, [tokens, rope_dim], k_row_stride)?),
            None => None,
        };
        let scale = QueryScale { beta: scale_beta, original_max_position };
        rope_q_k(q.view([tokens, heads, head_dim])?, k, positions.as_vector(), inv_freq.as_vector(), scale)
    })
}

/// Embedding lookup: `out[t] = table[ids[t]]`. `ids`: `[tokens]` int32; `table`: `[vocab, dim]` bf16; `out`:
/// `[tokens, dim]` bf16. An id outside `0..vocab` is [`Small4Status::OutOfRange`] (the table is never read out of
/// bounds). Synchronises the device to check the ids.
///
/// # Safety
/// `device` must be null or live; the addresses must hold the sizes above on that device.
#[no_mangle]
pub unsafe extern "C" fn small4_embedding_gather(
    device: *const Small4Device,
    ids: u64,
    tokens: usize,
    table: u64,
    vocab: usize,
    dim: usize,
    out: u64,
) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        let ids = unsafe { borrowed::<i32>(device, ids, tokens) }?;
        let table = unsafe { borrowed::<bf16>(device, table, elements(vocab, dim, "embedding table")?) }?;
        let out = unsafe { borrowed::<bf16>(device, out, elements(tokens, dim, "embedding out")?) }?;
        small4::kernels::ops::embedding_gather_checked(ids.as_vector(), table.view([vocab, dim])?, out.view([tokens, dim])?)
    })
}

/// Greedy sampling: `ids[r] = argmax(logits[r])` (ties to the lower id). `logits`: `[rows, vocab]` f32; `ids`:
/// `[rows]` int32.
///
/// # Safety
/// `device` must be null or live; the addresses must hold the sizes above on that device.
#[no_mangle]
pub unsafe extern "C" fn small4_argmax(device: *const Small4Device, logits: u64, rows: usize, vocab: usize, ids: u64) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        let logits = unsafe { borrowed::<f32>(device, logits, elements(rows, vocab, "argmax logits")?) }?;
        let ids = unsafe { borrowed::<i32>(device, ids, rows) }?;
        small4::kernels::ops::argmax(logits.view([rows, vocab])?, ids.as_vector())
    })
}

/// Seeded temperature + top-p sampling: `ids[r]` is drawn from `softmax(logits[r] / temperature[r])` restricted to
/// its nucleus (the most likely tokens whose probabilities reach `top_p[r]`), with integer arithmetic throughout, so
/// a row's token depends only on its logits, settings, `seeds[r]` and `steps[r]` (bit-reproducible on every
/// device; `small4::reference::sampling` computes the same token). A row with `temperature[r] <= 0` is greedy.
/// `logits`: `[rows, vocab]` f32; `temperature`, `top_p`: `[rows]` f32; `seeds`: `[rows]` uint64; `steps`: `[rows]`
/// int32; `ids`: `[rows]` int32 (all on the device, so a captured graph replays with new values).
///
/// # Safety
/// `device` must be null or live; the addresses must hold the sizes above on that device.
#[no_mangle]
pub unsafe extern "C" fn small4_sample(
    device: *const Small4Device,
    logits: u64,
    rows: usize,
    vocab: usize,
    temperature: u64,
    top_p: u64,
    seeds: u64,
    steps: u64,
    ids: u64,
) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        let logits = unsafe { borrowed::<f32>(device, logits, elements(rows, vocab, "sample logits")?) }?;
        let per_row = |addr| unsafe { borrowed::<f32>(device, addr, rows) };
        let (temperature, top_p) = (per_row(temperature)?, per_row(top_p)?);
        let seeds = unsafe { borrowed::<u64>(device, seeds, rows) }?;
        let steps = unsafe { borrowed::<i32>(device, steps, rows) }?;
        let ids = unsafe { borrowed::<i32>(device, ids, rows) }?;
        let inputs = SamplingInputs { temperature: temperature.as_vector(), top_p: top_p.as_vector(), seeds: seeds.as_vector(), steps: steps.as_vector() };
        sample(logits.view([rows, vocab])?, &inputs, ids.as_vector())
    })
}

/// The MoE router of `tokens` rows: gate logits `hidden @ gate^T`, softmax over all `experts` in f32, top-`k` (ties
/// to the lower index), weights renormalised over the k and scaled by `routed_scale`. `hidden`: `[tokens, dim]`
/// bf16; `gate`: `[experts, dim]` bf16; outputs `topk_ids`: `[tokens, k]` int32 and `topk_weights`: `[tokens, k]`
/// f32. Scratch is allocated on the device for the call.
///
/// # Safety
/// `device` must be null or live; the addresses must hold the sizes above on that device.
#[no_mangle]
pub unsafe extern "C" fn small4_router_topk(
    device: *const Small4Device,
    hidden: u64,
    gate: u64,
    tokens: usize,
    dim: usize,
    experts: usize,
    k: usize,
    routed_scale: f32,
    topk_ids: u64,
    topk_weights: u64,
) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        let hidden = unsafe { borrowed::<bf16>(device, hidden, elements(tokens, dim, "router hidden")?) }?;
        let gate = unsafe { borrowed::<bf16>(device, gate, elements(experts, dim, "router gate")?) }?;
        let pairs = elements(tokens, k, "router top-k")?;
        let map = ExpertMap::identity(device, experts)?;
        // The smallest tile: the alignment the router also writes is scratch here.
        let config = RouterConfig { k, routed_scale, tile_m: 1 };
        let routing = Routing {
            topk_ids: unsafe { borrowed::<i32>(device, topk_ids, pairs) }?,
            topk_weights: unsafe { borrowed::<f32>(device, topk_weights, pairs) }?,
            alignment: Alignment::alloc(device, pairs, experts, config.tile_m)?,
            tokens,
            k,
        };
        let workspace = RouterWorkspace::new(device, tokens, experts, dim)?;
        route_and_align_into(hidden.view([tokens, dim])?, gate.view([experts, dim])?, &map, &config, &workspace, &routing)?;
        // The scratch is freed when this returns: the launches reading it must be done by then.
        device.synchronize()
    })
}

/// FP8 e4m3 dequantisation with one scale: `out = e4m3(data) * scale`. `data`: `[rows, cols]` bytes; `out`:
/// `[rows, cols]` bf16.
///
/// # Safety
/// `device` must be null or live; the addresses must hold the sizes above on that device.
#[no_mangle]
pub unsafe extern "C" fn small4_dequant_fp8(device: *const Small4Device, data: u64, scale: f32, out: u64, rows: usize, cols: usize) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        let n = elements(rows, cols, "dequant_fp8")?;
        let (data, out) = unsafe { (borrowed::<u8>(device, data, n)?, borrowed::<bf16>(device, out, n)?) };
        small4::kernels::dequant::dequant_fp8_per_tensor(data.view([rows, cols])?, scale, out.view([rows, cols])?)
    })
}

/// FP8 e4m3 dequantisation with 128x128 block scales: `out[r, c] = e4m3(data[r, c]) * block_scales[r / 128, c / 128]`.
/// `data`: `[rows, cols]` bytes (`cols` a multiple of 16); `block_scales`: `[ceil(rows / 128), ceil(cols / 128)]`
/// f32; `out`: `[rows, cols]` bf16.
///
/// # Safety
/// `device` must be null or live; the addresses must hold the sizes above on that device.
#[no_mangle]
pub unsafe extern "C" fn small4_dequant_fp8_block128(
    device: *const Small4Device,
    data: u64,
    block_scales: u64,
    out: u64,
    rows: usize,
    cols: usize,
) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        let n = elements(rows, cols, "dequant_fp8_block128")?;
        let (data, out) = unsafe { (borrowed::<u8>(device, data, n)?, borrowed::<bf16>(device, out, n)?) };
        let scales = unsafe { borrowed::<f32>(device, block_scales, elements(rows.div_ceil(128), cols.div_ceil(128), "block scales")?) }?;
        let scale_dims = [rows.div_ceil(128), cols.div_ceil(128)];
        small4::kernels::dequant::dequant_fp8_block128(data.view([rows, cols])?, scales.view(scale_dims)?, out.view([rows, cols])?)
    })
}

/// INT4 grouped dequantisation: `out[r, c] = (q - z) * scales[r, c / group]`, `q` the nibble of column `c` in
/// `packed` (`[rows, cols / 2]` bytes, the even column in the low nibble), `z` = `zeros[r, c / group]` (bytes 0..=15)
/// or 8 when `zeros` is 0 (symmetric). `scales`: `[rows, cols / group]` bf16; `group` a multiple of 32 dividing
/// `cols`; `out`: `[rows, cols]` bf16.
///
/// # Safety
/// `device` must be null or live; the addresses must hold the sizes above on that device.
#[no_mangle]
pub unsafe extern "C" fn small4_dequant_int4(
    device: *const Small4Device,
    packed: u64,
    scales: u64,
    zeros: u64,
    out: u64,
    rows: usize,
    cols: usize,
    group: usize,
) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        let n = elements(rows, cols, "dequant_int4")?;
        if group == 0 || cols % group != 0 {
            return Err(Error::InvalidArgument(format!("dequant_int4: group {group} must divide the {cols} columns")));
        }
        let groups = n / group;
        let (packed, out) = unsafe { (borrowed::<u8>(device, packed, n / 2)?, borrowed::<bf16>(device, out, n)?) };
        let scales = unsafe { borrowed::<bf16>(device, scales, groups) }?;
        let zeros = if zeros == 0 { None } else { Some(unsafe { borrowed::<u8>(device, zeros, groups) }?) };
        let zeros = zeros.as_ref().map(|z| z.view([rows, cols / group])).transpose()?;
        small4::kernels::dequant::dequant_int4(packed.view([rows, cols / 2])?, scales.view([rows, cols / group])?, zeros, out.view([rows, cols])?, group)
    })
}

/// NVFP4 dequantisation: `out[r, c] = e2m1(q) * e4m3(scales[r, c / 16]) / global_scale`, `q` the nibble of column
/// `c` in `packed` (`[rows, cols / 2]` bytes, the even column in the low nibble); `scales`: `[rows, cols / 16]`
/// e4m3 bytes; `cols` a multiple of 16; `out`: `[rows, cols]` bf16.
///
/// # Safety
/// `device` must be null or live; the addresses must hold the sizes above on that device.
#[no_mangle]
pub unsafe extern "C" fn small4_dequant_nvfp4(
    device: *const Small4Device,
    packed: u64,
    scales: u64,
    global_scale: f32,
    out: u64,
    rows: usize,
    cols: usize,
) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        let n = elements(rows, cols, "dequant_nvfp4")?;
        let (packed, out) = unsafe { (borrowed::<u8>(device, packed, n / 2)?, borrowed::<bf16>(device, out, n)?) };
        let scales = unsafe { borrowed::<u8>(device, scales, n / 16) }?;
        small4::kernels::dequant::dequant_nvfp4(packed.view([rows, cols / 2])?, scales.view([rows, cols / 16])?, global_scale, out.view([rows, cols])?)
    })
}

/// The weights of one MoE layer on a device, packed into the grouped GEMM's layout (made by
/// [`small4_moe_layer_open_bf16`]).
pub struct Small4MoeLayer {
    weights: MoeLayerWeights,
}

/// How a checkpoint stores a set of expert matrices (the `format` of [`Small4ExpertMatrices`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Small4WeightFormat {
    /// bf16 values.
    Bf16 = 0,
    /// FP8 e4m3 codes with one f32 scale a matrix (the published checkpoint's `qscale_weight`).
    Fp8 = 1,
    /// FP8 e4m3 codes with an f32 scale per 128x128 block.
    Fp8Block128 = 2,
    /// INT4, two a byte (low nibble = even column), a bf16 scale per `group` columns of a row, symmetric (zero 8) or
    /// with 4-bit zero points.
    Int4 = 3,
    /// NVFP4: e2m1, two a byte (low nibble = even column), an e4m3 scale per 16 columns, an f32 global divisor a
    /// matrix: `w = e2m1 * scale / global_scale`.
    Nvfp4 = 4,
}

/// `experts` matrices of one role (`[rows, cols]` each, as stored `[out, in]`), stacked, in host memory.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Small4ExpertMatrices {
    /// A [`Small4WeightFormat`] value (an integer, so that a wrong value is an error rather than undefined behaviour).
    pub format: u32,
    /// BF16: `[experts, rows, cols]` bf16; FP8, FP8_BLOCK128: `[experts, rows, cols]` e4m3 bytes; INT4, NVFP4:
    /// `[experts, rows, cols / 2]` bytes.
    pub data: *const c_void,
    /// FP8: `[experts]` f32; FP8_BLOCK128: `[experts, ceil(rows / 128), ceil(cols / 128)]` f32; INT4:
    /// `[experts, rows, cols / group]` bf16; NVFP4: `[experts, rows, cols / 16]` e4m3 bytes. BF16: unused.
    pub scales: *const c_void,
    /// INT4: `[experts, rows, cols / group]` zero points in 0..=15, or null for symmetric. Other formats: unused.
    pub zeros: *const u8,
    /// INT4: columns per scale (a multiple of 64 dividing cols). Other formats: unused.
    pub group: usize,
    /// NVFP4: `[experts]` f32 global scales. Other formats: unused.
    pub global_scales: *const f32,
}

/// One [`MatrixRef`] per expert over the caller's stacked arrays, every length taken from the shape.
///
/// # Safety
/// The pointers of `m` that its format uses must hold the sizes [`Small4ExpertMatrices`] gives.
unsafe fn expert_matrices<'a>(m: &Small4ExpertMatrices, experts: usize, rows: usize, cols: usize, what: &str) -> Result<Vec<MatrixRef<'a>>> {
    let values = elements(rows, cols, what)?;
    /// `len` elements of `T` a matrix, stacked. A pointer misaligned for `T` is an error, not undefined behaviour.
    ///
    /// # Safety
    /// A non-null `ptr` must hold `experts * len` elements of `T`.
    unsafe fn per_expert<'a, T>(ptr: *const c_void, experts: usize, len: usize, what: &str) -> Result<Vec<&'a [T]>> {
        if ptr.cast::<T>().align_offset(std::mem::align_of::<T>()) != 0 {
            return Err(Error::InvalidArgument(format!("{what} is not aligned to {} bytes", std::mem::align_of::<T>())));
        }
        let all = unsafe { slice(ptr.cast::<T>(), elements(experts, len, what)?, what) }?;
        Ok(all.chunks_exact(len.max(1)).collect())
    }
    let name = |field: &str| format!("{what} {field}");
    // SAFETY: the caller's contract covers every pointer of `m` that its format uses.
    let data: Vec<QuantData<'a>> = unsafe {
        match m.format {
            0 => per_expert::<bf16>(m.data, experts, values, &name("data"))?.into_iter().map(QuantData::Bf16).collect(),
            1 => {
                let scales = per_expert::<f32>(m.scales, experts, 1, &name("scales"))?;
                per_expert::<u8>(m.data, experts, values, &name("data"))?
                    .into_iter()
                    .zip(scales)
                    .map(|(data, s)| QuantData::Fp8 { data, scale: s[0] })
                    .collect()
            }
            2 => {
                let blocks = elements(rows.div_ceil(128), cols.div_ceil(128), what)?;
                let scales = per_expert::<f32>(m.scales, experts, blocks, &name("block scales"))?;
                per_expert::<u8>(m.data, experts, values, &name("data"))?
                    .into_iter()
                    .zip(scales)
                    .map(|(data, scales)| QuantData::Fp8Block { data, scales })
                    .collect()
            }
            3 => {
                if m.group == 0 || cols % m.group != 0 {
                    return Err(Error::InvalidArgument(format!("{what}: int4 group {} must divide {cols} columns", m.group)));
                }
                let groups = values / m.group;
                let scales = per_expert::<bf16>(m.scales, experts, groups, &name("scales"))?;
                let zeros: Vec<Option<&[u8]>> = if m.zeros.is_null() {
                    vec![None; experts]
                } else {
                    per_expert::<u8>(m.zeros.cast(), experts, groups, &name("zeros"))?.into_iter().map(Some).collect()
                };
                let packed = per_expert::<u8>(m.data, experts, values / 2, &name("data"))?;
                packed.into_iter().zip(scales).zip(zeros).map(|((packed, scales), zeros)| QuantData::Int4 { packed, scales, zeros, group: m.group }).collect()
            }
            4 => {
                let global = per_expert::<f32>(m.global_scales.cast(), experts, 1, &name("global scales"))?;
                let scales = per_expert::<u8>(m.scales, experts, values / 16, &name("scales"))?;
                let packed = per_expert::<u8>(m.data, experts, values / 2, &name("data"))?;
                packed.into_iter().zip(scales).zip(global).map(|((packed, scales), g)| QuantData::Nvfp4 { packed, scales, global_scale: g[0] }).collect()
            }
            other => return Err(Error::UnknownDtype(format!("{what}: weight format {other} (0 bf16, 1 fp8, 2 fp8 block128, 3 int4, 4 nvfp4)"))),
        }
    };
    let matrices: Vec<MatrixRef<'a>> = data.into_iter().map(|data| MatrixRef { rows, cols, data }).collect();
    for (e, matrix) in matrices.iter().enumerate() {
        matrix.validate(&format!("{what} of expert {e}"))?;
    }
    Ok(matrices)
}

/// The gate/up pair (SwiGLU-interleaved) and the down matrices of `experts` experts, packed for the grouped GEMM.
///
/// # Safety
/// As [`expert_matrices`] for each of `w1`, `w3` and `w2` (non-null).
unsafe fn pack_experts(
    experts: usize,
    dim: usize,
    hidden: usize,
    w1: &Small4ExpertMatrices,
    w3: &Small4ExpertMatrices,
    w2: &Small4ExpertMatrices,
    what: &str,
) -> Result<(PackedWeights, PackedWeights)> {
    let gate = unsafe { expert_matrices(w1, experts, hidden, dim, &format!("{what}w1")) }?;
    let up = unsafe { expert_matrices(w3, experts, hidden, dim, &format!("{what}w3")) }?;
    let down = unsafe { expert_matrices(w2, experts, dim, hidden, &format!("{what}w2")) }?;
    let pairs: Vec<(MatrixRef, MatrixRef)> = gate.into_iter().zip(up).collect();
    Ok((repack_gate_up(&pairs)?, repack_linear(&down)?))
}

/// Packs and uploads one MoE layer in any checkpoint format ([`Small4ExpertMatrices`], host memory): `w1` (gate) and
/// `w3` (up) `[experts, hidden, dim]`, `w2` (down) `[experts, dim, hidden]`, and the shared expert's `shared_w1`,
/// `shared_w3` `[hidden, dim]` and `shared_w2` `[dim, hidden]` (each a set of one matrix, in its own format), all
/// three null for a layer without one. The weights are dequantised inside the grouped GEMM. `dim` and `hidden` must be
/// multiples of 64.
///
/// # Safety
/// `device` must be null or live; each matrix set null or valid as [`Small4ExpertMatrices`] says; `out` null or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn small4_moe_layer_open(
    device: *const Small4Device,
    experts: usize,
    dim: usize,
    hidden: usize,
    w1: *const Small4ExpertMatrices,
    w3: *const Small4ExpertMatrices,
    w2: *const Small4ExpertMatrices,
    shared_w1: *const Small4ExpertMatrices,
    shared_w3: *const Small4ExpertMatrices,
    shared_w2: *const Small4ExpertMatrices,
    out: *mut *mut Small4MoeLayer,
) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        unsafe { reference_mut(out, "the output handle") }?;
        if experts == 0 || experts > small4::kernels::router::MAX_EXPERTS {
            return Err(Error::InvalidArgument(format!("{experts} experts (1..={})", small4::kernels::router::MAX_EXPERTS)));
        }
        let (w1, w3, w2) = unsafe { (reference(w1, "w1")?, reference(w3, "w3")?, reference(w2, "w2")?) };
        let (gate_up, down) = unsafe { pack_experts(experts, dim, hidden, w1, w3, w2, "") }?;
        let shared = match unsafe { (shared_w1.as_ref(), shared_w3.as_ref(), shared_w2.as_ref()) } {
            (None, None, None) => None,
            (Some(w1), Some(w3), Some(w2)) => Some(unsafe { pack_experts(1, dim, hidden, w1, w3, w2, "shared ") }?),
            _ => return Err(Error::InvalidArgument("the shared expert needs all of shared_w1, shared_w3 and shared_w2, or none".into())),
        };
        let weights = MoeLayerWeights::upload(device, &gate_up, &down, shared.as_ref().map(|(u, d)| (u, d)))?;
        unsafe { store(out, Small4MoeLayer { weights }) }
    })
}

/// [`small4_moe_layer_open`] with every matrix in bf16 (bit patterns as `uint16_t`): `w1`, `w3`
/// `[experts, hidden, dim]`, `w2` `[experts, dim, hidden]`, the shared expert's `[hidden, dim]`, `[hidden, dim]`,
/// `[dim, hidden]` or all three null.
///
/// # Safety
/// `device` must be null or live; the weight pointers null or holding the sizes above (host memory); `out` null or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn small4_moe_layer_open_bf16(
    device: *const Small4Device,
    experts: usize,
    dim: usize,
    hidden: usize,
    w1: *const u16,
    w3: *const u16,
    w2: *const u16,
    shared_w1: *const u16,
    shared_w3: *const u16,
    shared_w2: *const u16,
    out: *mut *mut Small4MoeLayer,
) -> Small4Status {
    let bf16_set = |data: *const u16| Small4ExpertMatrices {
        format: Small4WeightFormat::Bf16 as u32,
        data: data.cast(),
        scales: std::ptr::null(),
        zeros: std::ptr::null(),
        group: 0,
        global_scales: std::ptr::null(),
    };
    let [w1, w3, w2, shared_w1, shared_w3, shared_w2] = [w1, w3, w2, shared_w1, shared_w3, shared_w2].map(bf16_set);
    // A null shared matrix stays a null set, so that "no shared expert" keeps its meaning.
    let set_or_null = |set: &Small4ExpertMatrices| if set.data.is_null() { std::ptr::null() } else { set as *const _ };
    unsafe {
        small4_moe_layer_open(device, experts, dim, hidden, &w1, &w3, &w2, set_or_null(&shared_w1), set_or_null(&shared_w3), set_or_null(&shared_w2), out)
    }
}

/// Releases a MoE layer (null is ignored).
///
/// # Safety
/// `layer` must be null or a handle from [`small4_moe_layer_open_bf16`], not used afterwards, and its device still
/// open.
#[no_mangle]
pub unsafe extern "C" fn small4_moe_layer_free(layer: *mut Small4MoeLayer) {
    if !layer.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(layer) })));
    }
}

/// One MoE layer over `tokens` rows already routed (by [`small4_router_topk`] or the caller):
/// `out[t] = shared(x[t]) + sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])`, SwiGLU experts, f32
/// accumulation, bf16 activations. `x`, `out`: `[tokens, dim]` bf16; `topk_ids` `[tokens, k]` int32 (each in
/// `0..experts`); `topk_weights` `[tokens, k]` f32. Scratch is allocated on the device for the call (synchronises).
///
/// # Safety
/// `device` and `layer` must be null or live (the layer opened on this device); the addresses must hold the sizes
/// above on that device.
#[no_mangle]
pub unsafe extern "C" fn small4_moe_layer_forward(
    device: *const Small4Device,
    layer: *const Small4MoeLayer,
    x: u64,
    tokens: usize,
    topk_ids: u64,
    topk_weights: u64,
    k: usize,
    out: u64,
) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        let weights = &unsafe { reference(layer, "the MoE layer handle") }?.weights;
        let (dim, experts) = (weights.dim(), weights.experts());
        if k == 0 || k > experts {
            return Err(Error::InvalidArgument(format!("moe layer: k = {k} must be in 1..={experts}")));
        }
        let pairs = elements(tokens, k, "moe layer pairs")?;
        let x = unsafe { borrowed::<bf16>(device, x, elements(tokens, dim, "moe layer x")?) }?;
        let out = unsafe { borrowed::<bf16>(device, out, elements(tokens, dim, "moe layer out")?) }?;
        let topk_ids = unsafe { borrowed::<i32>(device, topk_ids, pairs) }?;
        let topk_weights = unsafe { borrowed::<f32>(device, topk_weights, pairs) }?;
        let map = ExpertMap::identity(device, experts)?;
        let alignment = moe_align(topk_ids.view([tokens, k])?, &map, moe_tile_m(tokens, k, experts))?;
        let workspace = MoeWorkspace::new(device, weights, tokens, k, alignment.sorted_pairs.len())?;
        let routing = RoutingBuffers { topk_ids: topk_ids.view([tokens, k])?, topk_weights: topk_weights.view([tokens, k])?, expert_map: None, experts };
        moe_layer(weights, x.view([tokens, dim])?, &routing, &Grouping::from(&alignment), &workspace, out.view([tokens, dim])?)?;
        // The scratch is freed when this returns: the launches reading it must be done by then.
        device.synchronize()
    })
}

/// Runs the layer's routed experts in W8A8 from now on: each projection's input quantised to e4m3 with a static
/// per-tensor scale (`up_scale` for the layer input of w1/w3, `down_scale` for the SwiGLU activation of w2; the
/// checkpoint's `qscale_act`), then e4m3 x e4m3 on the tensor cores. Both 0: back to bf16 activations. The shared
/// expert keeps bf16 activations.
///
/// `SMALL4_STATUS_INVALID_ARGUMENT` when the routed experts are not per-tensor FP8 (`SMALL4_WEIGHT_FORMAT_FP8`) or a
/// scale is negative, zero (but not both) or not finite; the layer is unchanged then.
///
/// # Safety
/// `layer` must be null or a live handle from `small4_moe_layer_open*`, not used by another call at the same time.
#[no_mangle]
pub unsafe extern "C" fn small4_moe_layer_set_fp8_activations(layer: *mut Small4MoeLayer, up_scale: f32, down_scale: f32) -> Small4Status {
    call(|| {
        let layer = unsafe { reference_mut(layer, "the MoE layer handle") }?;
        let scales = if up_scale == 0.0 && down_scale == 0.0 { None } else { Some(Fp8ActScales { up: up_scale, down: down_scale }) };
        layer.weights.set_fp8_activations(scales)
    })
}

// ---------------------------------------------------------------------------------------------------------------
// MLA attention over a paged latent cache

/// Element type of a paged MLA cache.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Small4CacheDtype {
    /// bf16 values.
    Bf16 = 0,
    /// FP8 e4m3 codes; a cached value is `code * fp8_scale`.
    Fp8E4m3 = 1,
}

/// One layer's paged latent cache in the caller's device memory: `[num_pages, page_size, 320]` elements, each token
/// `[normalised latent 256 | rotated k_rope 64]` (Mistral Small 4's geometry; the kernels are built for it).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Small4MlaCache {
    /// Device address of the pages.
    pub pages: u64,
    /// Pages in the pool.
    pub num_pages: usize,
    /// Tokens per page.
    pub page_size: usize,
    /// A [`Small4CacheDtype`] value (an integer, so that a wrong value is an error rather than undefined behaviour).
    pub dtype: u32,
    /// FP8 caches: the scale of the codes (finite, > 0); ignored for bf16.
    pub fp8_scale: f32,
}

/// Which pages hold which sequence (host memory, checked before any launch: every page a sequence's length covers
/// must be a page of the cache).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Small4MlaBatch {
    /// Sequences.
    pub num_seqs: usize,
    /// Block-table columns.
    pub max_pages: usize,
    /// `[num_seqs, max_pages]` int32: the page of each block of each sequence (entries past its length are never
    /// read; -1 by convention).
    pub block_tables: *const i32,
    /// `[num_seqs]` int32: tokens in the cache of each sequence.
    pub seq_lens: *const i32,
}

/// The cache descriptor and borrowed pages of `cache`, and the checked, uploaded block tables of `batch`.
///
/// # Safety
/// `cache` and `batch` must be null or valid; `cache.pages` must hold the whole pool on `device`; the batch's arrays
/// must hold the sizes [`Small4MlaBatch`] gives.
unsafe fn paged_cache(device: &Device, cache: *const Small4MlaCache, batch: *const Small4MlaBatch) -> Result<(PagedCache, BlockTables)> {
    let cache = unsafe { reference(cache, "the MLA cache") }?;
    let batch = unsafe { reference(batch, "the MLA batch") }?;
    let dtype = match cache.dtype {
        0 => CacheDtype::Bf16,
        1 => CacheDtype::Fp8E4m3 { scale: cache.fp8_scale },
        other => return Err(Error::UnknownDtype(format!("MLA cache dtype {other} (0: bf16, 1: fp8 e4m3)"))),
    };
    let desc = CacheDescriptor::mla(cache.num_pages, cache.page_size, dtype)?;
    let pages = unsafe { borrowed::<u8>(device, cache.pages, desc.total_bytes()) }?;
    let tables = BatchTables {
        block_tables: unsafe { slice(batch.block_tables, elements(batch.num_seqs, batch.max_pages, "MLA block tables")?, "block_tables") }?.to_vec(),
        seq_lens: unsafe { slice(batch.seq_lens, batch.num_seqs, "seq_lens") }?.to_vec(),
        max_pages: batch.max_pages,
    };
    let tables = BlockTables::upload(device, &tables, &desc)?;
    Ok((PagedCache::from_buffer(desc, pages)?, tables))
}

/// Writes `tokens` new tokens into their cache slots: token t is row t of `kv` (`kv_row_stride` bf16 elements a row,
/// columns `[latent 256 | k_rope 64]`, the kv_a projection's output), stored at position `positions[t]` of sequence
/// `token_seq[t]` as `[rms_norm(latent) * norm_weight | rope(k_rope, position)]` (RoPE on interleaved pairs: pair l
/// is values 2l, 2l+1 and turns by `position * inv_freq[l]`). `norm_weight`: `[256]` bf16 and `inv_freq`: `[32]` f32
/// on the device; `token_seq`, `positions`: `[tokens]` int32 in host memory, each position inside its sequence's
/// length. Synchronises before returning.
///
/// # Safety
/// `device` must be null or live; `cache` and `batch` as [`Small4MlaCache`] and [`Small4MlaBatch`] say; the addresses
/// and host arrays must hold the sizes above.
#[no_mangle]
pub unsafe extern "C" fn small4_mla_cache_write(
    device: *const Small4Device,
    cache: *const Small4MlaCache,
    batch: *const Small4MlaBatch,
    kv: u64,
    kv_row_stride: usize,
    tokens: usize,
    norm_weight: u64,
    eps: f32,
    inv_freq: u64,
    token_seq: *const i32,
    positions: *const i32,
) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        let (cache, tables) = unsafe { paged_cache(device, cache, batch) }?;
        let width = KV_LORA_RANK + QK_ROPE;
        // A view of one row ignores its stride; the C contract still asks for rows at least 320 apart.
        if kv_row_stride < width {
            return Err(Error::InvalidArgument(format!("kv row stride {kv_row_stride} is shorter than a row of {width}")));
        }
        let kv_len = if tokens == 0 { 0 } else { elements(tokens - 1, kv_row_stride, "cache write kv")? + width };
        let kv = unsafe { borrowed::<bf16>(device, kv, kv_len) }?;
        let norm_weight = unsafe { borrowed::<bf16>(device, norm_weight, KV_LORA_RANK) }?;
        let inv_freq = unsafe { borrowed::<f32>(device, inv_freq, QK_ROPE / 2) }?;
        let slots = TokenSlots::upload(device, unsafe { slice(token_seq, tokens, "token_seq") }?, unsafe { slice(positions, tokens, "positions") }?)?;
        let kv = small4::kernels::TensorView::strided(&kv, 0, [tokens, width], kv_row_stride)?;
        mla_cache_write(&cache, &tables, kv, &CacheWriteWeights { norm_weight: norm_weight.as_vector(), eps, inv_freq: inv_freq.as_vector() }, &slots)?;
        // The uploaded tables and slots are freed when this returns: the launch reading them must be done by then.
        device.synchronize()
    })
}

/// Causal latent attention of `heads` query heads over the paged cache, for decode (one query token a sequence)
/// and chunked prefill (several): sequence s owns query tokens `q_start[s]..q_start[s+1]` (host `[num_seqs + 1]`
/// int32, starting at 0), which are its last tokens, already in the cache. Per query row (token, head):
/// `o_lat = softmax(softmax_scale * (q_lat . latent_j + q_rope . k_rope_j)) @ latent_j` over the cached tokens j the
/// row may see. `q_lat`, `o_lat`: `[tokens, heads, 256]` bf16 (q_nope already through W_UK); `q_rope`:
/// `[tokens, heads, 64]` bf16, rotated. Split-KV with a deterministic combine; scratch is allocated for the call
/// (synchronises).
///
/// # Safety
/// `device` must be null or live; `cache` and `batch` as [`Small4MlaCache`] and [`Small4MlaBatch`] say; `q_start`
/// must hold `num_seqs + 1` values; the addresses must hold the sizes above on that device.
#[no_mangle]
pub unsafe extern "C" fn small4_mla_attention(
    device: *const Small4Device,
    cache: *const Small4MlaCache,
    batch: *const Small4MlaBatch,
    q_start: *const i32,
    heads: usize,
    q_lat: u64,
    q_rope: u64,
    o_lat: u64,
    softmax_scale: f32,
) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        let (cache, tables) = unsafe { paged_cache(device, cache, batch) }?;
        let layout = QueryLayout::upload(device, unsafe { slice(q_start, tables.num_seqs() + 1, "q_start") }?)?;
        let rows = elements(layout.tokens(), heads, "attention rows")?;
        let q_lat = unsafe { borrowed::<bf16>(device, q_lat, elements(rows, KV_LORA_RANK, "q_lat")?) }?;
        let q_rope = unsafe { borrowed::<bf16>(device, q_rope, elements(rows, QK_ROPE, "q_rope")?) }?;
        let o_lat = unsafe { borrowed::<bf16>(device, o_lat, elements(rows, KV_LORA_RANK, "o_lat")?) }?;
        let tokens = layout.tokens();
        let queries = Queries { layout: &layout, q_lat: q_lat.view([tokens, heads, KV_LORA_RANK])?, q_rope: q_rope.view([tokens * heads, QK_ROPE])? };
        let mut scratch = AttentionScratch::new(device);
        mla_attention(&cache, &tables, &queries, o_lat.view([tokens, heads, KV_LORA_RANK])?, softmax_scale, None, &mut scratch)?;
        // The scratch and the uploaded tables are freed when this returns: the launches must be done by then.
        device.synchronize()
    })
}

// ---------------------------------------------------------------------------------------------------------------
// The vision tower's kernels

/// The activation of [`small4_bias_act`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Small4Activation {
    /// The bias add alone.
    Identity = 0,
    /// Exact GELU `x (1 + erf(x / sqrt 2)) / 2`.
    Gelu = 1,
}

/// Patch unfold (im2col) of one image for the patch embedding's GEMM: `pixels` `[channels, height, width]` f32 (CHW)
/// into `out` `[patches, k_padded]` bf16, `patches = (height / patch) * (width / patch)`; row `gy * (width / patch) +
/// gx` holds the `[c, ky, kx]` values of patch (gy, gx), then zeros up to `k_padded`. Several images fill one GEMM
/// input when `out` points at each image's first row. Both sides must be positive multiples of `patch`
/// ([`Small4Status::Shape`] otherwise), `k_padded` at least `channels * patch^2`.
///
/// # Safety
/// `device` must be null or live; the addresses must hold the sizes above on that device.
#[no_mangle]
pub unsafe extern "C" fn small4_patch_im2col(
    device: *const Small4Device,
    pixels: u64,
    channels: usize,
    height: usize,
    width: usize,
    patch: usize,
    out: u64,
    k_padded: usize,
) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        // A patch of 0 or sides that are not multiples of it are the kernel's Shape error; borrow no rows for them.
        let patches =
            if patch == 0 || height % patch != 0 || width % patch != 0 { 0 } else { elements(height / patch, width / patch, "patch_im2col patches")? };
        let pixels = unsafe { borrowed::<f32>(device, pixels, elements(elements(channels, height, "patch_im2col pixels")?, width, "patch_im2col pixels")?) }?;
        let out = unsafe { borrowed::<bf16>(device, out, elements(patches, k_padded, "patch_im2col out")?) }?;
        small4::kernels::vision::patch_im2col(pixels.view([channels, height, width])?, patch, out.view([patches, k_padded])?)
    })
}

/// 2D RoPE in place on every head of `q` and, when `k` is not 0, `k` (`[tokens, heads, head_dim]` bf16, head_dim a
/// multiple of 4): interleaved pair i of a head (values 2i, 2i + 1) turns by `grid_rows[t] * inv_freq_rows[i]` for
/// `i < head_dim / 4`, else by `grid_cols[t] * inv_freq_cols[i - head_dim / 4]`. `grid_rows`, `grid_cols`: `[tokens]`
/// int32 (>= 0, the token's patch row and column in its image); `inv_freq_rows`, `inv_freq_cols`: `[head_dim / 4]`
/// f32, all on the device.
///
/// # Safety
/// `device` must be null or live; the addresses must hold the sizes above on that device.
#[no_mangle]
pub unsafe extern "C" fn small4_rope_2d(
    device: *const Small4Device,
    q: u64,
    k: u64,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    grid_rows: u64,
    grid_cols: u64,
    inv_freq_rows: u64,
    inv_freq_cols: u64,
) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        let n = elements(elements(tokens, heads, "rope_2d")?, head_dim, "rope_2d")?;
        let q = unsafe { borrowed::<bf16>(device, q, n) }?;
        let k = if k == 0 { None } else { Some(unsafe { borrowed::<bf16>(device, k, n) }?) };
        let (rows, cols) = unsafe { (borrowed::<i32>(device, grid_rows, tokens)?, borrowed::<i32>(device, grid_cols, tokens)?) };
        let freq = |addr| unsafe { borrowed::<f32>(device, addr, head_dim / 4) };
        let (inv_freq_rows, inv_freq_cols) = (freq(inv_freq_rows)?, freq(inv_freq_cols)?);
        let positions = small4::kernels::vision::GridPositions { rows: &rows, cols: &cols, inv_freq_rows: &inv_freq_rows, inv_freq_cols: &inv_freq_cols };
        let shape = [tokens, heads, head_dim];
        small4::kernels::vision::rope_2d(q.view(shape)?, k.as_ref().map(|k| k.view(shape)).transpose()?, &positions)
    })
}

/// Block-diagonal bidirectional attention of the vision tower: `q`, `k`, `v`, `out` `[tokens, heads, 64]` bf16, the
/// tokens cut into `num_segments` images of `segment_lens` tokens each (host `[num_segments]`, each > 0, tokens = their
/// sum); a token attends to the keys of its own image only: `out = softmax(scale * q . k_j) @ v_j`.
///
/// # Safety
/// `device` must be null or live; `segment_lens` must hold `num_segments` values; the addresses must hold the sizes
/// above on that device.
#[no_mangle]
pub unsafe extern "C" fn small4_vision_attention(
    device: *const Small4Device,
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    heads: usize,
    segment_lens: *const usize,
    num_segments: usize,
    scale: f32,
) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        let mut segments = Vec::with_capacity(num_segments);
        for &len in unsafe { slice(segment_lens, num_segments, "segment_lens") }? {
            let start = segments.last().map_or(0, |s: &std::ops::Range<usize>| s.end);
            let end = start.checked_add(len).ok_or_else(|| Error::InvalidArgument("segment lengths overflow".into()))?;
            segments.push(start..end);
        }
        let segments = small4::kernels::vision::TokenSegments::upload(device, &segments)?;
        let shape = [segments.tokens(), heads, small4::kernels::vision::ATTENTION_HEAD_DIM];
        let n = elements(elements(shape[0], heads, "vision attention")?, shape[2], "vision attention")?;
        let [q, k, v, out] = [q, k, v, out].map(|addr| unsafe { borrowed::<bf16>(device, addr, n) });
        let (q, k, v, out) = (q?, k?, v?, out?);
        small4::kernels::vision::vision_attention(q.view(shape)?, k.view(shape)?, v.view(shape)?, out.view(shape)?, &segments, scale)?;
        // The uploaded segment table is freed when this returns: the launch reading it must be done by then.
        device.synchronize()
    })
}

/// In place `x = act(x + bias)`: `x` `[rows, cols]` bf16, `bias` `[cols]` bf16 or 0 for none, `activation` a
/// [`Small4Activation`] value (another one is [`Small4Status::InvalidArgument`]).
///
/// # Safety
/// `device` must be null or live; the addresses must hold the sizes above on that device.
#[no_mangle]
pub unsafe extern "C" fn small4_bias_act(device: *const Small4Device, x: u64, rows: usize, cols: usize, bias: u64, activation: u32) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        let activation = match activation {
            0 => small4::kernels::vision::Activation::Identity,
            1 => small4::kernels::vision::Activation::Gelu,
            other => return Err(Error::InvalidArgument(format!("activation {other} (0: identity, 1: gelu)"))),
        };
        let x = unsafe { borrowed::<bf16>(device, x, elements(rows, cols, "bias_act x")?) }?;
        let bias = if bias == 0 { None } else { Some(unsafe { borrowed::<bf16>(device, bias, cols) }?) };
        small4::kernels::vision::bias_act(x.view([rows, cols])?, bias.as_ref().map(|b| b.as_vector()), activation)
    })
}

/// The patch merger's unfold: the tokens of `images` images, image i a `grids[2 i] x grids[2 i + 1]` (rows x cols)
/// patch grid in row-major order, one after the other in `x` `[tokens, hidden]` bf16, into `out` `[merged rows,
/// hidden * merge^2]` bf16: one row per `merge x merge` block of patches (blocks in row-major order of each image,
/// images in order), `out[r, c * merge^2 + di * merge + dj]` = channel c of the block's patch (di, dj) (torch's unfold
/// order). Grid sides must be multiples of `merge` ([`Small4Status::Shape`]), `merge` positive.
///
/// # Safety
/// `device` must be null or live; `grids` must hold `2 * images` values; the addresses must hold the sizes above on
/// that device.
#[no_mangle]
pub unsafe extern "C" fn small4_patch_merge(
    device: *const Small4Device,
    x: u64,
    hidden: usize,
    grids: *const usize,
    images: usize,
    merge: usize,
    out: u64,
) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        let grids: Vec<(usize, usize)> =
            unsafe { slice(grids, elements(images, 2, "patch_merge grids")?, "grids") }?.chunks_exact(2).map(|g| (g[0], g[1])).collect();
        let sources = small4::kernels::vision::MergeSources::upload(device, &grids, merge)?;
        let tokens = grids.iter().try_fold(0usize, |sum, &(rows, cols)| {
            elements(rows, cols, "patch_merge grid")
                .and_then(|n| sum.checked_add(n).ok_or_else(|| Error::InvalidArgument("patch_merge tokens overflow".into())))
        })?;
        let width = elements(hidden, merge * merge, "patch_merge out")?;
        let x = unsafe { borrowed::<bf16>(device, x, elements(tokens, hidden, "patch_merge x")?) }?;
        let out = unsafe { borrowed::<bf16>(device, out, elements(sources.rows(), width, "patch_merge out")?) }?;
        small4::kernels::vision::patch_merge(x.view([tokens, hidden])?, &sources, out.view([sources.rows(), width])?)?;
        // The uploaded source table is freed when this returns: the launch reading it must be done by then.
        device.synchronize()
    })
}

/// Row scatter (image features over the `[IMG]` embeddings): `out[targets[i], :] = src[i, :]` for `src` `[count,
/// cols]` and `out` `[out_rows, cols]` bf16; other rows of `out` keep their values. `targets`: host `[count]`, distinct
/// and below `out_rows` ([`Small4Status::OutOfRange`] and [`Small4Status::InvalidArgument`] otherwise, before any
/// launch).
///
/// # Safety
/// `device` must be null or live; `targets` must hold `count` values; the addresses must hold the sizes above on
/// that device.
#[no_mangle]
pub unsafe extern "C" fn small4_scatter_rows(
    device: *const Small4Device,
    src: u64,
    cols: usize,
    targets: *const usize,
    count: usize,
    out: u64,
    out_rows: usize,
) -> Small4Status {
    call(|| {
        let device = unsafe { self::device(device) }?;
        let targets = small4::kernels::vision::RowTargets::upload(device, unsafe { slice(targets, count, "targets") }?, out_rows)?;
        let src = unsafe { borrowed::<bf16>(device, src, elements(count, cols, "scatter_rows src")?) }?;
        let out = unsafe { borrowed::<bf16>(device, out, elements(out_rows, cols, "scatter_rows out")?) }?;
        small4::kernels::vision::scatter_rows(src.view([count, cols])?, &targets, out.view([out_rows, cols])?)?;
        // The uploaded targets are freed when this returns: the launch reading them must be done by then.
        device.synchronize()
    })
}

// ---------------------------------------------------------------------------------------------------------------
// The generator

/// Where a generator computes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Small4Backend {
    /// The CPU reference forward pass (greedy only).
    Reference = 0,
    /// The engine's CUDA kernels on the PTX interpreter.
    Sim = 1,
    /// The engine on CUDA device 0.
    Gpu = 2,
}

/// How a generator is set up; start from [`small4_generator_options_default`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Small4GeneratorOptions {
    /// A [`Small4Backend`] value (an integer here, so that a wrong value is an error rather than undefined
    /// behaviour).
    pub backend: u32,
    /// Stop token (kept as the last generated token); negative: none, generate to `max_tokens`.
    pub eos: i64,
    /// Tokens of one request (prompt + generated) the engine's KV cache holds.
    pub max_context: usize,
}

/// How tokens are picked: `temperature` 0 is greedy; above 0, temperature + top-p sampling that depends only on
/// (`seed`, step).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Small4Sampling {
    /// Softmax temperature; 0: greedy.
    pub temperature: f32,
    /// Nucleus: sample among the most likely tokens whose probabilities add up to `top_p` (0 < top_p <= 1).
    pub top_p: f32,
    /// Seed of the samples.
    pub seed: u64,
}

/// A loaded model that generates token ids.
pub struct Small4Generator {
    generator: Generator,
}

/// The defaults: the reference backend, eos = small4's default stop token, a context of 1024 tokens.
#[no_mangle]
pub extern "C" fn small4_generator_options_default() -> Small4GeneratorOptions {
    let defaults = GeneratorOptions::default();
    Small4GeneratorOptions { backend: Small4Backend::Reference as u32, eos: defaults.eos.map_or(-1, i64::from), max_context: defaults.max_context }
}

/// Writes (once; later calls reuse it) the tiny model that `small4 generate` runs, experts in `format` ("bf16",
/// "fp8", "fp8-block", "int4", "nvfp4"; null: "bf16") with the random weights of `seed` (`small4 generate`'s
/// default is 4), and copies its directory, NUL-terminated, into `path[0..capacity]`. `*path_len` receives the
/// length without the NUL; when `capacity` is too small nothing is copied and the call fails with
/// [`Small4Status::InvalidArgument`], `*path_len` still set.
///
/// # Safety
/// `format` must be null or a NUL-terminated string; `path` null or `capacity` writable bytes; `path_len` writable.
#[no_mangle]
pub unsafe extern "C" fn small4_tiny_checkpoint(format: *const c_char, seed: u64, path: *mut c_char, capacity: usize, path_len: *mut usize) -> Small4Status {
    call(|| {
        let path_len = unsafe { reference_mut(path_len, "path_len") }?;
        let format: WeightFormat = if format.is_null() { WeightFormat::Bf16 } else { unsafe { string(format, "format") }?.parse()? };
        let dir = small4::model::synthetic::tiny_checkpoint(format, &Layout::Native, seed)?;
        let dir = dir.to_str().ok_or_else(|| Error::InvalidArgument(format!("the checkpoint path {} is not UTF-8", dir.display())))?;
        *path_len = dir.len();
        if capacity <= dir.len() {
            return Err(Error::InvalidArgument(format!("a path buffer of {capacity} bytes cannot hold the {} bytes of {dir} and its NUL", dir.len())));
        }
        let out = unsafe { slice_mut(path.cast::<u8>(), capacity, "path") }?;
        out[..dir.len()].copy_from_slice(dir.as_bytes());
        out[dir.len()] = 0;
        Ok(())
    })
}

/// Opens the checkpoint directory `dir` (native or HF layout, any weight format) on `options->backend` (null
/// options: the defaults).
///
/// # Safety
/// `dir` must be null or a NUL-terminated string; `options` null or valid; `out` null or writable.
#[no_mangle]
pub unsafe extern "C" fn small4_generator_open(dir: *const c_char, options: *const Small4GeneratorOptions, out: *mut *mut Small4Generator) -> Small4Status {
    call(|| {
        let dir = PathBuf::from(unsafe { string(dir, "dir") }?);
        let options = match unsafe { options.as_ref() } {
            Some(o) => *o,
            None => small4_generator_options_default(),
        };
        let options = GeneratorOptions {
            backend: match options.backend {
                b if b == Small4Backend::Reference as u32 => GenerationBackend::Reference,
                b if b == Small4Backend::Sim as u32 => GenerationBackend::Sim,
                b if b == Small4Backend::Gpu as u32 => GenerationBackend::Gpu,
                b => return Err(Error::InvalidArgument(format!("backend {b} is not a Small4Backend"))),
            },
            eos: match options.eos {
                eos if eos < 0 => None,
                eos => Some(u32::try_from(eos).map_err(|_| Error::InvalidArgument(format!("eos token {eos}")))?),
            },
            max_context: options.max_context,
            // What `small4 generate` uses: bf16 activations, absorbed attention.
            ..GeneratorOptions::default()
        };
        // Check the output slot before the (slow) load.
        unsafe { reference_mut(out, "the output handle") }?;
        let generator = Generator::open(&Checkpoint::open(&dir)?, &options)?;
        unsafe { store(out, Small4Generator { generator }) }
    })
}

/// Releases a generator (null is ignored).
///
/// # Safety
/// `generator` must be null or a handle from [`small4_generator_open`], not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn small4_generator_free(generator: *mut Small4Generator) {
    if !generator.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(generator) })));
    }
}

/// The size of the model's vocabulary (token ids are below it).
///
/// # Safety
/// `generator` must be null or live; `vocab` null or writable.
#[no_mangle]
pub unsafe extern "C" fn small4_generator_vocab(generator: *const Small4Generator, vocab: *mut usize) -> Small4Status {
    call(|| {
        let generator = unsafe { reference(generator, "the generator handle") }?;
        *unsafe { reference_mut(vocab, "vocab") }? = generator.generator.config().vocab;
        Ok(())
    })
}

/// Prefills `prompt[0..prompt_len]` and generates up to `max_tokens` token ids into `tokens[0..max_tokens]`
/// (fewer after the eos token); `*generated` receives how many. `sampling` null: greedy.
///
/// # Safety
/// `generator` must be null or live and not used by another thread during the call; `prompt` null or `prompt_len`
/// readable ids; `tokens` null or `max_tokens` writable ids; `sampling` null or valid; `generated` writable.
#[no_mangle]
pub unsafe extern "C" fn small4_generate(
    generator: *mut Small4Generator,
    prompt: *const u32,
    prompt_len: usize,
    max_tokens: usize,
    sampling: *const Small4Sampling,
    tokens: *mut u32,
    generated: *mut usize,
) -> Small4Status {
    call(|| {
        let generator = unsafe { reference_mut(generator, "the generator handle") }?;
        let prompt = unsafe { slice(prompt, prompt_len, "prompt") }?;
        let tokens = unsafe { slice_mut(tokens, max_tokens, "tokens") }?;
        let generated = unsafe { reference_mut(generated, "generated") }?;
        *generated = 0;
        let sampling = match unsafe { sampling.as_ref() } {
            None => Sampling::Greedy,
            Some(s) if s.temperature == 0.0 => Sampling::Greedy,
            Some(s) => Sampling::Seeded { temperature: s.temperature, top_p: s.top_p, seed: s.seed },
        };
        let ids = generator.generator.generate(prompt, max_tokens, sampling, |_| {})?;
        tokens[..ids.len()].copy_from_slice(&ids);
        *generated = ids.len();
        Ok(())
    })
}
