//! ONNX Runtime, loaded from the library file the pipeline names (an input, usually a
//! `download` stage's output), never from an environment variable the user must export.
//!
//! `ort` binds one library per process, so the first teacher stage to run loads it and later
//! ones must name a library with the same content; another version in the same run is an error
//! that says so. Too old a library (ort 2.0.0-rc.15 needs ONNX Runtime ≥ 1.22) is refused with
//! the version found.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;

use crate::api::StageError;

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
            let builder = ort::init_from(lib).map_err(|e| {
                StageError::failed_with_hint(
                    format!("cannot load ONNX Runtime from {}: {e}", lib.display()),
                    "the `onnxruntime` input must be libonnxruntime.so ≥ 1.22 (e.g. member onnxruntime/capi/libonnxruntime.so.1.32.0 of the onnxruntime==1.32.0 wheel)",
                )
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

/// A session on `model_bytes` with `threads` intra-op threads.
pub fn session(
    env: &ort::environment::Environment,
    model_bytes: &[u8],
    threads: usize,
    model: &Path,
) -> Result<Session, StageError> {
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
    builder.commit_from_memory(model_bytes).map_err(fail)
}
