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
