//! cuBLASLt for the bf16 projections that the skinny GEMM does not take (prefill, mixed steps, lm_head, batches over
//! 16 rows), with one plan per GEMM shape.
//!
//! cudarc's `Matmul::matmul` builds three matrix layouts, a matmul descriptor and a preference, and asks cuBLASLt's
//! heuristic for an algorithm on every call, then destroys them all. The heuristic query alone costs the host
//! microseconds, and an eager 1B prefill step makes 65 such calls (four projections a layer, then lm_head): on the
//! H100 (2026-11-27) such a step took 1.36 ms of host issue time for 1.87 ms of device time. Here the first call of
//! a shape builds its plan (the same descriptors, the same heuristic query, so the same algorithm and bits as
//! cudarc's path) and later calls reuse it: one `cublasLtMatmul` per call.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::{result, sys};
use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::{Error, Result};

/// Plans kept before the cache starts over: a run meets one shape per projection and step size, so only a server
/// whose step sizes keep changing reaches it.
const MAX_PLANS: usize = 1024;

/// A cuBLASLt handle on one stream, with its workspace (32 MiB on compute capability 9.x and later, 4 MiB before,
/// as NVIDIA recommends) and a plan per `(rows, k, n, output row stride)` shape of [`Blas::gemm_strided`].
pub struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
    plans: Mutex<HashMap<(usize, usize, usize, usize), Plan>>,
}

// SAFETY: the handle is only used with `stream`'s context, and the plans (host objects of cuBLASLt that
// `cublasLtMatmul` only reads) behind the mutex; cudarc treats its own cuBLASLt handle the same way.
unsafe impl Send for Blas {}
// SAFETY: as above; every use of a plan holds the mutex.
unsafe impl Sync for Blas {}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blas").field("workspace_bytes", &self.workspace.len()).field("plans", &self.plans()).finish()
    }
}

/// What cuBLASLt said, as this crate's error.
fn lt(what: &str) -> impl Fn(result::CublasError) -> Error + '_ {
    move |e| Error::Backend(format!("cuBLASLt {what}: {e:?}"))
}

impl Blas {
    /// A handle and workspace for work on `stream`. A missing cuBLASLt library is an error that says so (cudarc
    /// would panic on its first call).
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        // SAFETY: only tries to dlopen the library by its usual names; nothing is called through it.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Backend(
                "cuBLASLt: libcublasLt.so was not found (install the CUDA 13 runtime libraries, or put them on \
                 LD_LIBRARY_PATH)"
                    .into(),
            ));
        }
        let ctx = stream.context();
        ctx.bind_to_thread().map_err(|e| Error::Backend(format!("cuBLASLt: binding the CUDA context: {e}")))?;
        let major = ctx
            .attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .map_err(|e| Error::Backend(format!("cuBLASLt: querying the compute capability: {e}")))?;
        let bytes = if major >= 9 { 32 << 20 } else { 4 << 20 };
        let workspace = stream
            .alloc_zeros::<u8>(bytes)
            .map_err(|e| Error::Backend(format!("cuBLASLt: allocating its {bytes}-byte workspace: {e}")))?;
        let handle = result::create_handle().map_err(lt("create handle"))?;
        Ok(Blas { handle, workspace, stream: stream.clone(), plans: Mutex::new(HashMap::new()) })
    }

    /// The shapes planned so far.
    pub fn plans(&self) -> usize {
        self.plans.lock().map_or(0, |p| p.len())
    }

    /// `out[rows, n] = x[rows, k] @ w[n, k]^T` in bf16 with f32 accumulation (column-major view: `out^T = w x^T`),
    /// enqueued on the handle's stream. A shape's first call plans it (cuBLASLt's heuristic picks the algorithm);
    /// later calls launch at once.
    pub fn gemm<I: DevicePtr<bf16>>(
        &self,
        x: &I,
        w: &I,
        rows: usize,
        kdim: usize,
        n: usize,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> Result<()> {
        self.gemm_strided(x, w, (rows, kdim, n), out, n)
    }

    /// [`gemm`](Self::gemm) into rows `out_stride` elements apart: `out[r * out_stride + j]` for `r < rows`, `j < n`
    /// (so a column block of a wider output, `out` starting at the block's first column); the other elements are
    /// not touched.
    pub fn gemm_strided<I: DevicePtr<bf16>>(
        &self,
        x: &I,
        w: &I,
        (rows, kdim, n): (usize, usize, usize),
        out: &mut impl DevicePtrMut<bf16>,
        out_stride: usize,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let out_need = (rows - 1) * out_stride + n;
        if out_stride < n || x.len() < rows * kdim || w.len() < n * kdim || out.len() < out_need {
            return Err(Error::Backend(format!(
                "gemm: buffers too small for [{rows}, {kdim}] x [{n}, {kdim}]^T (output rows {out_stride} apart)"
            )));
        }
        let mut plans = self.plans.lock().map_err(|_| Error::Backend("gemm: the plan cache is poisoned".into()))?;
        let key = (rows, kdim, n, out_stride);
        if !plans.contains_key(&key) {
            if plans.len() >= MAX_PLANS {
                plans.clear();
            }
            let plan = Plan::new(self.handle, key, self.workspace.len())?;
            plans.insert(key, plan);
        }
        let plan = plans.get(&key).ok_or_else(|| Error::Backend("gemm: plan missing".into()))?;
        let s = &self.stream;
        let (wp, _w) = w.device_ptr(s);
        let (xp, _x) = x.device_ptr(s);
        let (op, _o) = out.device_ptr_mut(s);
        let (ws, _ws) = self.workspace.device_ptr(s);
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the three buffers were checked above to hold the elements the plan's layouts address, the
        // workspace holds the bytes the plan's algorithm was allowed, and the guards live past the launch.
        unsafe {
            result::matmul(
                self.handle,
                plan.desc,
                (&alpha) as *const f32 as *const c_void,
                (&beta) as *const f32 as *const c_void,
                wp as *const c_void,
                plan.w,
                xp as *const c_void,
                plan.x,
                op as *const c_void,
                plan.out,
                op as *mut c_void,
                plan.out,
                &plan.algo,
                ws as *mut c_void,
                self.workspace.len(),
                s.cu_stream() as *mut _,
            )
        }
        .map_err(lt("matmul"))
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        if let Ok(mut plans) = self.plans.lock() {
            plans.clear();
        }
        // SAFETY: the handle was created by `new` and is destroyed once; no plan uses it any more. A failure here
        // (a context already torn down) leaves nothing to clean up.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

/// One shape's descriptors and algorithm: the weight `[n, k]` read transposed as A (`k x n`, leading dimension k),
/// the activations as B (`k x rows`), the output as C and D (`n x rows`, leading dimension the output row stride),
/// f32 compute and scale.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    w: sys::cublasLtMatrixLayout_t,
    x: sys::cublasLtMatrixLayout_t,
    out: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Plan {
    fn new(
        handle: sys::cublasLtHandle_t,
        (rows, kdim, n, out_stride): (usize, usize, usize, usize),
        workspace: usize,
    ) -> Result<Plan> {
        let bf = sys::cudaDataType_t::CUDA_R_16BF;
        let (r, k, n) = (rows as u64, kdim as u64, n as u64);
        // Each handle goes into the plan as soon as it exists, so that an error below destroys what was made.
        let mut plan = Plan {
            desc: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            x: std::ptr::null_mut(),
            out: std::ptr::null_mut(),
            // SAFETY: a plain C struct of integers; overwritten by the heuristic's pick before any use.
            algo: unsafe { std::mem::zeroed() },
        };
        plan.w = result::create_matrix_layout(bf, k, n, kdim as i64).map_err(lt("matrix layout"))?;
        plan.x = result::create_matrix_layout(bf, k, r, kdim as i64).map_err(lt("matrix layout"))?;
        plan.out = result::create_matrix_layout(bf, n, r, out_stride as i64).map_err(lt("matrix layout"))?;
        plan.desc =
            result::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)
                .map_err(lt("matmul descriptor"))?;
        let transpose: i32 = 1;
        // SAFETY: the attribute is an int32 (cublasOperation_t), passed by pointer with its size.
        unsafe {
            result::set_matmul_desc_attribute(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&transpose) as *const i32 as *const c_void,
                std::mem::size_of::<i32>(),
            )
        }
        .map_err(lt("matmul descriptor"))?;
        let pref = Pref(result::create_matmul_pref().map_err(lt("matmul preference"))?);
        // SAFETY: the attribute is a size_t, passed by pointer with its size.
        unsafe {
            result::set_matmul_pref_attribute(
                pref.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&workspace) as *const usize as *const c_void,
                std::mem::size_of::<usize>(),
            )
        }
        .map_err(lt("matmul preference"))?;
        // SAFETY: every handle was created above and is alive.
        let heuristic =
            unsafe { result::get_matmul_algo_heuristic(handle, plan.desc, plan.w, plan.x, plan.out, plan.out, pref.0) }
                .map_err(|e| {
                    Error::Backend(format!("cuBLASLt: no algorithm for bf16 [{rows}, {kdim}] x [{n}, {kdim}]^T: {e:?}"))
                })?;
        plan.algo = heuristic.algo;
        Ok(plan)
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each non-null handle was created by `Plan::new` and is destroyed once here.
        unsafe {
            if !self.desc.is_null() {
                let _ = result::destroy_matmul_desc(self.desc);
            }
            for layout in [self.w, self.x, self.out] {
                if !layout.is_null() {
                    let _ = result::destroy_matrix_layout(layout);
                }
            }
        }
    }
}

/// A matmul preference, destroyed when planning is done.
struct Pref(sys::cublasLtMatmulPreference_t);

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by `Plan::new`, destroyed once.
        let _ = unsafe { result::destroy_matmul_pref(self.0) };
    }
}
