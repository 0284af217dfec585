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

    /// Where to compute, judging the setting, the build and the engine's grant; the caller
    /// adds its own runtime checks through [`Device::without_cuda`].
    pub fn choose(self, granted: &[usize]) -> Result<Choice, StageError> {
        if self == Device::Cpu {
            return Ok(Choice::Cpu("`device: cpu`".into()));
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = granted;
            self.without_cuda(
                "this cusa-pipe was built without the `cuda` feature",
                "rebuild with `cargo build --release --features cuda`",
            )
            .map(Choice::Cpu)
        }
        #[cfg(feature = "cuda")]
        match granted.first() {
            Some(&gpu) => Ok(Choice::Gpu(gpu)),
            None => self
                .without_cuda(
                    "the stage has no GPU",
                    "add `resources: {gpu: 1}` to the stage (and run on a machine with an NVIDIA GPU)",
                )
                .map(Choice::Cpu),
        }
    }
}

/// What [`Device::choose`] decided. A GPU can only be chosen in a build with the `cuda`
/// feature: without it the variant does not exist, so no caller needs an unreachable arm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// The CPU, and why (for the log).
    Cpu(String),
    /// This granted GPU (the kind's runtime checks may still fall back to the CPU).
    #[cfg(feature = "cuda")]
    Gpu(usize),
}

/// Where a burn computation runs.
pub enum Placement {
    Cpu(String),
    #[cfg(feature = "cuda")]
    Cuda(usize),
}

/// Picks the device; probes for a CUDA driver before any CUDA call (burn 0.21's CUDA backend
/// panics when there is none).
pub fn place(device: Device, gpus: &[usize]) -> Result<Placement, StageError> {
    match device.choose(gpus)? {
        Choice::Cpu(why) => Ok(Placement::Cpu(why)),
        #[cfg(feature = "cuda")]
        Choice::Gpu(_) if !cuda_driver_present() => device
            .without_cuda(
                "no CUDA driver was found (libcuda.so.1 does not load)",
                "install the NVIDIA driver, or use `device: cpu`",
            )
            .map(Placement::Cpu),
        #[cfg(feature = "cuda")]
        Choice::Gpu(gpu) => Ok(Placement::Cuda(gpu)),
    }
}

/// Whether the CUDA driver library loads (without initialising anything).
#[cfg(feature = "cuda")]
fn cuda_driver_present() -> bool {
    let name = std::ffi::CString::new("libcuda.so.1").expect("no NUL");
    // SAFETY: dlopen/dlclose of a library by name; nothing from it is called.
    unsafe {
        let handle = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if handle.is_null() {
            return false;
        }
        libc::dlclose(handle);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_falls_back_with_a_reason_and_cuda_refuses() {
        assert_eq!(
            Device::Cpu.choose(&[0]).unwrap(),
            Choice::Cpu("`device: cpu`".into())
        );
        let Choice::Cpu(auto) = Device::Auto.choose(&[]).unwrap() else {
            panic!("no GPU was granted")
        };
        let refused = Device::Cuda.choose(&[]).unwrap_err().to_string();
        assert_eq!(refused, format!("`device: cuda` but {auto}"));
        #[cfg(feature = "cuda")]
        {
            assert_eq!(Device::Auto.choose(&[3]).unwrap(), Choice::Gpu(3));
            assert_eq!(auto, "the stage has no GPU");
        }
        #[cfg(not(feature = "cuda"))]
        {
            assert_eq!(auto, "this cusa-pipe was built without the `cuda` feature");
            assert!(Device::Cuda.choose(&[3]).is_err());
        }
    }
}
