//! cusa-pipe's engine: runs any declared DAG of cached stages, and knows nothing about ML.
//!
//! Data flows one way: [`spec`] (YAML → validated pipeline) → [`graph`] (DAG) →
//! [`fingerprint`] (cache keys and why they changed) → [`runner`] (decide, execute with
//! `dagrs`) → [`store`] (content-addressed, crash-safe commits). The stage kinds live in the
//! `cusa-stages` crate and are reached only through its `StageKind` trait; [`cli`] is the
//! binary's edge.

// Diagnostics carry a source excerpt and are returned only on the cold path of loading a
// pipeline; boxing them everywhere would buy nothing.
#![allow(clippy::result_large_err)]

pub mod bench;
pub mod canonical;
pub mod cli;
pub mod executor;
pub mod fingerprint;
pub mod graph;
pub mod remote;
pub mod runner;
pub mod spec;
pub mod store;
