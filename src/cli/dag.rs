//! `cusa-pipe dag [PIPELINE] [--format text|dot|mermaid] [--collapse]`

use std::path::PathBuf;

use clap::Args;

use super::{CliError, DagFormat};

#[derive(Args)]
pub struct DagArgs {
    /// The pipeline file
    #[arg(default_value = "pipeline.yaml")]
    pipeline: PathBuf,
    #[arg(long, value_enum, default_value = "text")]
    format: DagFormat,
    /// Draw each matrix stage as one node with its axes, not one node per element
    #[arg(long)]
    collapse: bool,
}

pub fn dag(args: DagArgs) -> Result<i32, CliError> {
    let (pipeline, dag) = super::load(&args.pipeline, &[])?;
    print!(
        "{}",
        crate::graph::render(&pipeline, &dag, args.format, args.collapse)
    );
    Ok(0)
}
