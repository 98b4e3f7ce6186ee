//! The CUDA driver backend (cudarc, loaded dynamically: nothing CUDA is needed to build, and a machine without a
//! driver gets `Error::NoGpu`). Modules are loaded from the embedded sm_90a cubin, falling back to the PTX for
//! drivers that can JIT it. All work goes to one stream; a decode step is captured on a side stream as a CUDA graph
//! and replayed on it.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys, CudaContext, CudaStream};

use super::tensor_map::{refused, TensorMap, TiledTensorMap};
use super::{Backend, Graph, Kernel, LaunchConfig};
use crate::error::{Error, Result};

/// One CUDA device driven through the driver API: its primary context, one stream for all work, and the kernels
/// loaded so far (each module is loaded on the first launch of one of its kernels).
///
/// Without a driver or GPU (as on the machine that runs these examples) construction is `Error::NoGpu`; with one,
/// the example checks the accessors and borrows the backend's own stream for a second backend:
///
/// ```
/// use std::sync::Arc;
/// use small4::device::cuda::CudaBackend;
/// use small4::device::{Device, DeviceBuffer};
/// use small4::Error;
///
/// match CudaBackend::new(0) {
///     Ok(gpu) => {
///         assert_eq!(gpu.ordinal(), 0);
///         assert!(gpu.device_name()?.starts_with("NVIDIA"));
///         // SAFETY: the stream belongs to device 0's primary context, and `gpu` (its owner) outlives `borrowed`.
///         let borrowed = unsafe { CudaBackend::on_borrowed_stream(0, gpu.cu_stream())? };
///         assert_eq!(borrowed.cu_stream(), gpu.cu_stream());
///         let device: Device = Arc::new(borrowed);
///         let buffer = DeviceBuffer::from_slice(&device, &[7u32; 3])?;
///         assert_eq!(buffer.to_vec()?, vec![7; 3]);
///     }
///     Err(Error::NoGpu(why)) => assert!(!why.is_empty()),
///     Err(other) => return Err(other),
/// }
/// assert!(matches!(CudaBackend::new(1 << 20), Err(Error::NoGpu(_)))); // no such device anywhere
/// # Ok::<(), small4::Error>(())
/// ```
pub struct CudaBackend {
    ordinal: usize,
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: Mutex<HashMap<(&'static str, &'static str), FunctionHandle>>,
    /// While a graph capture is open: the stream it records (the legacy default stream cannot be captured).
    capture: Mutex<Option<Arc<CudaStream>>>,
    /// Kernels that wait for prior grids launch with programmatic stream serialization (`Backend::set_programmatic_launches`).
    programmatic: super::ProgrammaticSwitch,
}

/// An instantiated CUDA graph; destroyed with the `Graph` that owns it.
struct GraphExec(sys::CUgraphExec);
// SAFETY: an executable graph handle may be launched from any thread with its context current.
unsafe impl Send for GraphExec {}
unsafe impl Sync for GraphExec {}
impl Drop for GraphExec {
    fn drop(&mut self) {
        // SAFETY: created by `instantiate`, destroyed once.
        let _ = unsafe { result::graph::exec_destroy(self.0) };
    }
}

/// A loaded kernel; CUfunction is a driver handle valid for the context's lifetime.
#[derive(Clone, Copy)]
struct FunctionHandle(sys::CUfunction);
// SAFETY: driver function handles may be used from any thread once the context is current there.
unsafe impl Send for FunctionHandle {}

fn driver_error(what: &str) -> impl Fn(result::DriverError) -> Error + '_ {
    move |e| Error::Cuda(format!("{what}: {e:?}"))
}

impl CudaBackend {
    /// The backend of CUDA device `ordinal` (0-based), on its primary context's default stream. `Error::NoGpu` when
    /// the driver library is missing or cannot be initialised, or the device does not exist.
    pub fn new(ordinal: usize) -> Result<Self> {
        let context = Self::context(ordinal)?;
        let stream = context.default_stream();
        Ok(Self::on_stream(ordinal, context, stream))
    }

    /// A backend whose launches, copies and synchronisations all go to `cu_stream`, a stream of device `ordinal`'s
    /// primary context owned by the caller (a runtime's own stream, as the C ABI receives it).
    ///
    /// # Safety
    /// `cu_stream` must be a valid stream of that primary context and outlive the backend; the caller orders its own
    /// work on the stream with the backend's.
    pub unsafe fn on_borrowed_stream(ordinal: usize, cu_stream: sys::CUstream) -> Result<Self> {
        let context = Self::context(ordinal)?;
        // SAFETY: forwarded from this function's contract.
        let stream = unsafe { context.wrap_borrowed_stream(cu_stream) };
        Ok(Self::on_stream(ordinal, context, stream))
    }

    /// A backend on `stream` of `context`, with nothing loaded yet.
    fn on_stream(ordinal: usize, context: Arc<CudaContext>, stream: Arc<CudaStream>) -> Self {
        CudaBackend {
            ordinal,
            context,
            stream,
            functions: Mutex::new(HashMap::new()),
            capture: Mutex::new(None),
            programmatic: super::ProgrammaticSwitch::new(),
        }
    }

    fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
        // SAFETY: only tries to dlopen the driver library.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoGpu("the CUDA driver library (libcuda.so) was not found".into()));
        }
        // cudarc panics inside some calls when the library is absent; it is present here, but stay defensive.
        let context = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| Error::NoGpu("the CUDA driver could not be initialised".into()))?
            .map_err(|e| Error::NoGpu(format!("CUDA device {ordinal}: {e:?}")))?;
        Ok(context)
    }

    /// The CUDA device ordinal this backend drives.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The stream every launch and copy of this backend goes to (collectives enqueue on it too).
    pub fn cu_stream(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }

    /// The GPU's name as the driver reports it ("NVIDIA H200"); `Error::Cuda` when the driver call fails.
    pub fn device_name(&self) -> Result<String> {
        self.context.name().map_err(driver_error("device name"))
    }

    /// Host operations are refused while a capture is open (the captured step must only launch kernels).
    fn not_capturing(&self, what: &str) -> Result<()> {
        if self.capture.lock().unwrap().is_some() {
            return Err(Error::InvalidArgument(format!("{what} inside a graph capture: a captured step may only launch kernels")));
        }
        Ok(())
    }

    fn function(&self, kernel: &Kernel) -> Result<sys::CUfunction> {
        let mut cache = self.functions.lock().unwrap();
        if let Some(f) = cache.get(&(kernel.module.name, kernel.entry)) {
            return Ok(f.0);
        }
        self.context.bind_to_thread().map_err(driver_error("bind context"))?;
        // SAFETY: cubin and PTX images are valid, NUL-terminated where needed, and outlive the load call.
        let module = unsafe { result::module::load_data(kernel.module.cubin.as_ptr().cast()) }.or_else(|_| {
            let ptx = CString::new(kernel.module.ptx).map_err(|e| Error::Cuda(e.to_string()))?;
            unsafe { result::module::load_data(ptx.as_ptr().cast()) }.map_err(driver_error(&format!("load module {}", kernel.module.name)))
        })?;
        let entry = CString::new(kernel.entry).map_err(|e| Error::Cuda(e.to_string()))?;
        let function =
            unsafe { result::module::get_function(module, entry) }.map_err(driver_error(&format!("kernel {}::{}", kernel.module.name, kernel.entry)))?;
        cache.insert((kernel.module.name, kernel.entry), FunctionHandle(function));
        Ok(function)
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn alloc(&self, bytes: usize) -> Result<u64> {
        self.not_capturing("alloc")?;
        self.context.bind_to_thread().map_err(driver_error("bind context"))?;
        // SAFETY: plain allocation; freed by `free`.
        unsafe { result::malloc_sync(bytes) }.map_err(driver_error("cuMemAlloc"))
    }

    fn free(&self, addr: u64) -> Result<()> {
        self.not_capturing("free")?;
        self.context.bind_to_thread().map_err(driver_error("bind context"))?;
        self.stream.synchronize().map_err(driver_error("synchronize before free"))?;
        unsafe { result::free_sync(addr) }.map_err(driver_error("cuMemFree"))
    }

    fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.not_capturing("a copy to the device")?;
        self.context.bind_to_thread().map_err(driver_error("bind context"))?;
        self.stream.synchronize().map_err(driver_error("synchronize before copy"))?;
        unsafe { result::memcpy_htod_sync(addr, data) }.map_err(driver_error("copy to device"))
    }

    fn read(&self, addr: u64, out: &mut [u8]) -> Result<()> {
        self.not_capturing("a copy to the host")?;
        self.context.bind_to_thread().map_err(driver_error("bind context"))?;
        self.stream.synchronize().map_err(driver_error("synchronize before copy"))?;
        unsafe { result::memcpy_dtoh_sync(out, addr) }.map_err(driver_error("copy to host"))
    }

    fn memset(&self, addr: u64, byte: u8, bytes: usize) -> Result<()> {
        self.not_capturing("memset")?;
        self.context.bind_to_thread().map_err(driver_error("bind context"))?;
        self.stream.synchronize().map_err(driver_error("synchronize before memset"))?;
        unsafe { result::memset_d8_sync(addr, byte, bytes) }.map_err(driver_error("memset"))
    }

    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.not_capturing("a device copy")?;
        self.context.bind_to_thread().map_err(driver_error("bind context"))?;
        self.stream.synchronize().map_err(driver_error("synchronize before copy"))?;
        unsafe { result::memcpy_dtod_sync(dst, src, bytes) }.map_err(driver_error("copy on the device"))
    }

    fn encode_tensor_map_tiled(&self, map: &TiledTensorMap) -> Result<TensorMap> {
        // The driver reads `rank` entries of each array: lengths are checked here, everything else by the driver.
        map.check_lengths()?;
        self.context.bind_to_thread().map_err(driver_error("bind context"))?;
        let mut encoded = sys::CUtensorMap { opaque: [0; 16] };
        // SAFETY: the enums' values are CUDA's (ptxsim::tensor_map mirrors cuda.h), each a variant of cudarc's enum of
        // the same name; the arrays hold `rank` (strides: `rank - 1`) entries, checked above; `encoded` is a
        // CUtensorMap (64-byte aligned) the driver writes.
        let status = unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut encoded,
                std::mem::transmute::<u32, sys::CUtensorMapDataType>(map.data_type as u32),
                map.rank,
                map.global_address as *mut c_void,
                map.global_dim.as_ptr(),
                map.global_strides.as_ptr(),
                map.box_dim.as_ptr(),
                map.element_strides.as_ptr(),
                std::mem::transmute::<u32, sys::CUtensorMapInterleave>(map.interleave as u32),
                std::mem::transmute::<u32, sys::CUtensorMapSwizzle>(map.swizzle as u32),
                std::mem::transmute::<u32, sys::CUtensorMapL2promotion>(map.l2_promotion as u32),
                std::mem::transmute::<u32, sys::CUtensorMapFloatOOBfill>(map.oob_fill as u32),
            )
        };
        match status {
            sys::CUresult::CUDA_SUCCESS => Ok(TensorMap { opaque: encoded.opaque }),
            sys::CUresult::CUDA_ERROR_INVALID_VALUE => Err(refused(format!("the driver refused {map:?} (CUDA_ERROR_INVALID_VALUE)"))),
            other => Err(Error::Cuda(format!("cuTensorMapEncodeTiled: {other:?}"))),
        }
    }

    fn launch(&self, kernel: &Kernel, config: &LaunchConfig, params: &[u8]) -> Result<()> {
        let function = self.function(kernel)?;
        if config.shared_bytes > 48 * 1024 {
            // Above 48 KiB a kernel must opt in to dynamic shared memory (up to 227 KiB on H100).
            unsafe {
                result::function::set_function_attribute(
                    function,
                    sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    config.shared_bytes as i32,
                )
            }
            .map_err(driver_error("set max dynamic shared memory"))?;
        }
        let (g, b) = (config.grid, config.block);
        // The kernel's single parameter is the struct; the driver copies `params.len()` bytes from this pointer
        // (into the graph's node too, when capturing).
        let mut storage = params.to_vec();
        let mut args = [storage.as_mut_ptr().cast::<c_void>()];
        let stream = self.capture.lock().unwrap().as_ref().map_or(self.stream.cu_stream(), |s| s.cu_stream());
        let what = || format!("launch {}::{}", kernel.module.name, kernel.entry);
        if !self.programmatic.applies_to(kernel) {
            return unsafe { result::launch_kernel(function, (g.x, g.y, g.z), (b.x, b.y, b.z), config.shared_bytes, stream, &mut args) }
                .map_err(driver_error(&what()));
        }
        // Programmatic dependent launch: the kernel may start once every block of the kernel before it on the stream
        // executed griddepcontrol.launch_dependents or exited; its griddepcontrol.wait orders it after that kernel's
        // completion. Stream capture records the attribute as a programmatic edge of the graph.
        // SAFETY: a zeroed attribute value is a valid union (all integer fields); the field set is the one the id names.
        let mut attribute = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value: unsafe { std::mem::zeroed() },
        };
        attribute.value.programmaticStreamSerializationAllowed = 1;
        let launch_config = sys::CUlaunchConfig {
            gridDimX: g.x,
            gridDimY: g.y,
            gridDimZ: g.z,
            blockDimX: b.x,
            blockDimY: b.y,
            blockDimZ: b.z,
            sharedMemBytes: config.shared_bytes,
            hStream: stream,
            attrs: &mut attribute,
            numAttrs: 1,
        };
        // SAFETY: the config, its one attribute and the argument array outlive the call; the function is loaded.
        unsafe { sys::cuLaunchKernelEx(&launch_config, function, args.as_mut_ptr(), std::ptr::null_mut()) }.result().map_err(driver_error(&what()))
    }

    fn set_programmatic_launches(&self, on: bool) {
        self.programmatic.set(on);
    }

    fn programmatic_launches(&self) -> bool {
        self.programmatic.is_on()
    }

    fn launch_timed(&self, kernel: &Kernel, config: &LaunchConfig, params: &[u8]) -> Result<Option<f64>> {
        self.not_capturing("a timed launch")?;
        self.context.bind_to_thread().map_err(driver_error("bind context"))?;
        let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
        let start = result::event::create(flags).map_err(driver_error("cuEventCreate"))?;
        let end = match result::event::create(flags) {
            Ok(end) => end,
            Err(e) => {
                // SAFETY: created above, used by nothing else.
                let _ = unsafe { result::event::destroy(start) };
                return Err(driver_error("cuEventCreate")(e));
            }
        };
        let stream = self.stream.cu_stream();
        // SAFETY: both events belong to this context and are destroyed below, after the end event completed.
        let timed = unsafe {
            result::event::record(start, stream)
                .map_err(driver_error("cuEventRecord"))
                .and_then(|_| self.launch(kernel, config, params))
                .and_then(|_| result::event::record(end, stream).map_err(driver_error("cuEventRecord")))
                .and_then(|_| result::event::synchronize(end).map_err(driver_error("cuEventSynchronize")))
                .and_then(|_| result::event::elapsed(start, end).map_err(driver_error("cuEventElapsedTime")))
        };
        unsafe {
            let _ = result::event::destroy(start);
            let _ = result::event::destroy(end);
        }
        Ok(Some(timed? as f64 * 1e3))
    }

    fn synchronize(&self) -> Result<()> {
        self.not_capturing("synchronize")?;
        self.stream.synchronize().map_err(driver_error("synchronize"))
    }

    fn begin_capture(&self) -> Result<()> {
        let mut capture = self.capture.lock().unwrap();
        if capture.is_some() {
            return Err(Error::InvalidArgument("begin_capture: a capture is already open".into()));
        }
        self.context.bind_to_thread().map_err(driver_error("bind context"))?;
        // Work before the capture (uploads of the step's inputs) is finished first: the graph has no dependency on it.
        self.stream.synchronize().map_err(driver_error("synchronize before capture"))?;
        let stream = self.context.new_stream().map_err(driver_error("capture stream"))?;
        // Relaxed: kernel loading (cuModuleLoadData) and attribute calls stay legal while recording.
        unsafe { result::stream::begin_capture(stream.cu_stream(), sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED) }
            .map_err(driver_error("cuStreamBeginCapture"))?;
        *capture = Some(stream);
        Ok(())
    }

    fn end_capture(&self) -> Result<Graph> {
        let stream = self.capture.lock().unwrap().take().ok_or_else(|| Error::InvalidArgument("end_capture without begin_capture".into()))?;
        let graph = unsafe { result::stream::end_capture(stream.cu_stream()) }.map_err(driver_error("cuStreamEndCapture"))?;
        let mut nodes = 0usize;
        // SAFETY: counting nodes only (a null array asks for the count).
        unsafe { sys::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut nodes) }.result().map_err(driver_error("cuGraphGetNodes"))?;
        let exec = unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) };
        // SAFETY: the graph was created by the capture; the executable copy is independent of it.
        let _ = unsafe { result::graph::destroy(graph) };
        let exec = exec.map_err(driver_error("cuGraphInstantiate"))?;
        Ok(Graph::new(Box::new(GraphExec(exec)), nodes))
    }

    fn replay(&self, graph: &Graph) -> Result<()> {
        self.not_capturing("a graph replay")?;
        let exec = graph.inner.downcast_ref::<GraphExec>().ok_or_else(|| Error::InvalidArgument("replay: a graph recorded by another backend".into()))?;
        self.context.bind_to_thread().map_err(driver_error("bind context"))?;
        unsafe { result::graph::launch(exec.0, self.stream.cu_stream()) }.map_err(driver_error("cuGraphLaunch"))
    }

    fn device_name(&self) -> String {
        CudaBackend::device_name(self).unwrap_or_else(|_| "CUDA device".into())
    }
}
