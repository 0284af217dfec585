//! Machine-learning building blocks shared by the stages that train and evaluate students:
//! the losses of the method (`loss`), the retrieval metrics (`retrieval`), the students
//! (`student`, `scenes_small` with its word vocabulary `vocab`), the optimiser set-up (`optim`),
//! what matrix products compute in (`precision`), the walk over a module's parameters
//! (`params`), single-pass CPU versions of the students' costliest steps (`cpu_ops`) and a
//! vectorised exponential for SelfAlign's host loops (`fast_exp`).
//!
//! Everything here is generic over a burn [`Backend`](burn::tensor::backend::Backend) and knows
//! nothing about pipelines, files or the cache.

pub mod clip;
pub mod cpu_ops;
pub mod embed;
mod fast_exp;
pub mod loss;
pub mod objective;
pub mod optim;
pub mod params;
pub mod precision;
pub mod retrieval;
pub mod scenes_small;
pub mod selfalign;
mod selfalign_host;
pub mod stats;
pub mod student;
pub mod vocab;

/// What kind of device the objective is computed for, which decides how some of its terms are
/// written — the same function either way, each form checked against the float64 references.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Where {
    /// A CPU backend (the tensors are in host memory anyway): SelfAlign's Sinkhorn by loops and
    /// LCA and CRA with their gradients by hand (`selfalign_host`); InfoNCE and CSA read the
    /// caption→image direction as a transposed view of the similarity matrix (one product).
    #[default]
    Host,
    /// A GPU: tensor operations where the tensors live and autodiff for every gradient; the
    /// caption→image similarities are their own product, a contiguous matrix, so no reduction
    /// runs over a transposed view (on an H200, burn 0.21's CUDA backend reduced those wrongly:
    /// InfoNCE and CSA came out 104 % and 165 % off).
    Device,
}
