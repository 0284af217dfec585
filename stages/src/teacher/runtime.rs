//! ONNX Runtime, loaded from the library file the pipeline names (an input, usually a
//! `download` stage's output), never from an environment variable the user must export.
//!
//! `ort` binds one library per process, so the first teacher stage to run loads it and later
//! ones must name a library with the same content; another version in the same run is an error
//! that says so. Too old a library (ort 2.0.0-rc.15 needs ONNX Runtime ≥ 1.22) is refused with
//! the version found.
//!
//! Execution provider: `device: auto` (default) uses CUDA when the binary was built with the
//! `cuda` feature, the stage was granted a GPU (`resources: {gpu: 1}`), the library was built
//! with CUDA (the `onnxruntime-gpu` wheel) and the provider registers; otherwise CPU, and the
//! log says once which provider runs and why. `device: cuda` turns each of those into an error;
//! `device: cpu` never tries.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;

use crate::api::StageError;
use crate::device::{Choice, Device};

/// The loaded library (path and sha256: paths differ between cache trees, content must not) and
/// the process's one environment.
type Loaded = (PathBuf, String, ort::environment::Environment);
static LOADED: OnceLock<Mutex<Option<Loaded>>> = OnceLock::new();

/// Loads ONNX Runtime from `lib` (once per process) and returns an environment to build sessions.
pub fn environment(lib: &Path) -> Result<ort::environment::Environment, StageError> {
    let digest = crate::download::sha256_file(lib)?;
    let lock = LOADED.get_or_init(|| Mutex::new(None));
    let mut loaded = lock
        .lock()
        .map_err(|_| StageError::failed("the onnxruntime loader lock is poisoned"))?;
    match &*loaded {
        Some((_, d, env)) if *d == digest => Ok(env.clone()),
        Some((p, _, _)) => Err(StageError::failed_with_hint(
            format!(
                "this run already loaded ONNX Runtime from {}; {} is a different library",
                p.display(),
                lib.display()
            ),
            "use one onnxruntime library for all teacher stages of a pipeline",
        )),
        None => {
            const HINT: &str = "the `onnxruntime` input must be libonnxruntime.so ≥ 1.22 (e.g. member onnxruntime/capi/libonnxruntime.so.1.32.0 of the onnxruntime==1.32.0 wheel)";
            let builder = ort::init_from(lib).map_err(|e| match e {
                ort::LoadDynamicError::BadVersion { version_str, .. } => {
                    StageError::failed_with_hint(
                        format!(
                            "{} is ONNX Runtime {version_str}; ort needs ≥ 1.{}",
                            lib.display(),
                            ort::MINOR_VERSION
                        ),
                        HINT,
                    )
                }
                other => StageError::failed_with_hint(
                    format!("cannot load ONNX Runtime from {}: {other}", lib.display()),
                    HINT,
                ),
            })?;
            let env = builder
                .with_name("cusa-pipe")
                .build()
                .map_err(|e| StageError::failed(format!("ONNX Runtime: {e}")))?;
            *loaded = Some((lib.to_path_buf(), digest, env.clone()));
            Ok(env)
        }
    }
}

/// Why a session runs where it runs, for the log.
pub struct Placement {
    pub provider: &'static str,
    pub why: String,
}

/// Registers the CUDA execution provider when `device` asks for it and it can work; see the
/// module doc.
fn place(
    builder: ort::session::builder::SessionBuilder,
    device: Device,
    gpus: &[usize],
) -> Result<(ort::session::builder::SessionBuilder, Placement), StageError> {
    let cpu = |why: String| Placement {
        provider: "CPU",
        why,
    };
    match device.choose(gpus)? {
        Choice::Cpu(why) => Ok((builder, cpu(why))),
        #[cfg(feature = "cuda")]
        Choice::Gpu(gpu) => place_cuda(builder, device, gpu),
    }
}

/// Registers the CUDA execution provider for `gpu`, or falls back as `device` allows.
#[cfg(feature = "cuda")]
fn place_cuda(
    builder: ort::session::builder::SessionBuilder,
    device: Device,
    gpu: usize,
) -> Result<(ort::session::builder::SessionBuilder, Placement), StageError> {
    let cpu = |why: String| Placement {
        provider: "CPU",
        why,
    };
    {
        use ort::ep::ExecutionProvider;
        if !ort::ep::CUDA::is_available().unwrap_or(false) {
            let why = device.without_cuda(
                "this ONNX Runtime library was built without CUDA",
                "take libonnxruntime.so from the onnxruntime-gpu wheel",
            )?;
            return Ok((builder, cpu(why)));
        }
        // The engine restricts CUDA_VISIBLE_DEVICES to the granted GPUs only for processes
        // it starts; inside this process the granted index is the device id.
        let ep = ort::ep::CUDA::default()
            .with_device_id(gpu as i32)
            .build()
            .error_on_failure();
        match builder.with_execution_providers([ep]) {
            Ok(b) => Ok((
                b,
                Placement {
                    provider: "CUDA",
                    why: format!("GPU {gpu}"),
                },
            )),
            Err(e) => {
                let why = device.without_cuda(
                    format!("the CUDA execution provider did not start: {e}"),
                    "check the CUDA and cuDNN libraries that onnxruntime-gpu needs",
                )?;
                Ok((e.recover(), cpu(why)))
            }
        }
    }
}

/// A session on `model_bytes` with `threads` intra-op threads, placed as `device` says.
pub fn session(
    env: &ort::environment::Environment,
    model_bytes: &[u8],
    threads: usize,
    model: &Path,
    device: Device,
    gpus: &[usize],
) -> Result<(Session, Placement), StageError> {
    let fail = |e: ort::Error| {
        StageError::failed_with_hint(
            format!("ONNX Runtime cannot load {}: {e}", model.display()),
            "the `model` input must be an ONNX model file (.onnx)",
        )
    };
    let mut builder = Session::builder(env).map_err(fail)?;
    builder = builder
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| fail(e.into()))?;
    builder = builder
        .with_intra_threads(threads.max(1))
        .map_err(|e| fail(e.into()))?;
    let (builder, placement) = place(builder, device, gpus)?;
    let mut builder = builder;
    let session = builder.commit_from_memory(model_bytes).map_err(fail)?;
    Ok((session, placement))
}
