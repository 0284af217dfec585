//! `device: auto | cpu | cuda` — where a stage computes, decided the same way for every kind.
//!
//! CUDA needs three things: a binary built with the `cuda` feature, a GPU granted to the stage
//! by the engine (`resources: {gpu: N}`), and whatever the kind's runtime checks on top (a
//! CUDA-enabled ONNX Runtime, a loadable driver). With `auto` any missing piece means the CPU
//! and a reason for the log; with `cuda` it is an error naming the piece and what to do.

use serde::{Deserialize, Serialize};

use crate::api::StageError;

/// `device:` of a stage that can use a GPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// CUDA when everything it needs is there, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl Device {
    /// CUDA cannot be used because of `why`: on `auto` the CPU (returns `why` for the log), on
    /// `cuda` an error with `hint`.
    pub fn without_cuda(self, why: impl Into<String>, hint: &str) -> Result<String, StageError> {
        let why = why.into();
        match self {
            Device::Cuda => Err(StageError::failed_with_hint(
                format!("`device: cuda` but {why}"),
                hint,
            )),
            Device::Auto | Device::Cpu => Ok(why),
        }
    }

    /// The GPU to use, or why the CPU (`Ok(Err(why))`), judging the setting, the build and
    /// the engine's grant; the caller adds its own runtime checks through
    /// [`Device::without_cuda`].
    pub fn gpu(self, granted: &[usize]) -> Result<Result<usize, String>, StageError> {
        if self == Device::Cpu {
            return Ok(Err("`device: cpu`".into()));
        }
        if !cfg!(feature = "cuda") {
            return self
                .without_cuda(
                    "this cusa-pipe was built without the `cuda` feature",
                    "rebuild with `cargo build --release --features cuda`",
                )
                .map(Err);
        }
        match granted.first() {
            Some(&gpu) => Ok(Ok(gpu)),
            None => self
                .without_cuda(
                    "the stage has no GPU",
                    "add `resources: {gpu: 1}` to the stage (and run on a machine with an NVIDIA GPU)",
                )
                .map(Err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_falls_back_with_a_reason_and_cuda_refuses() {
        assert_eq!(Device::Cpu.gpu(&[0]).unwrap(), Err("`device: cpu`".into()));
        let auto = Device::Auto.gpu(&[]).unwrap().unwrap_err();
        let refused = Device::Cuda.gpu(&[]).unwrap_err().to_string();
        assert_eq!(refused, format!("`device: cuda` but {auto}"));
        if cfg!(feature = "cuda") {
            assert_eq!(Device::Auto.gpu(&[3]).unwrap(), Ok(3));
            assert_eq!(auto, "the stage has no GPU");
        } else {
            assert_eq!(auto, "this cusa-pipe was built without the `cuda` feature");
            assert!(Device::Cuda.gpu(&[3]).is_err());
        }
    }
}
