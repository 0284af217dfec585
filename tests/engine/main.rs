//! End-to-end tests of the engine through the real `cusa-pipe` binary.
//!
//! One test binary (faster to build than many). Transcripts are insta snapshots with hashes,
//! durations, paths and ports filtered; behaviour that depends on scheduling order is asserted
//! from `--json` output or from files the stages write.

mod cache_cmds;
mod clip;
mod crash;
mod dataset;
mod download;
mod eval;
mod export;
mod failures;
mod fuzz;
mod gpu_check;
mod incremental;
mod matrix;
mod parallel;
mod quickstart;
mod remote;
mod selfalign;
mod slurm;
mod spec_errors;
mod support;
mod teacher;
mod teacher_quality;
mod train;
mod trust;
