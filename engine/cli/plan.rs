//! `llama32 plan`: the tensor-parallel performance model.

use clap::Args;

use crate::{Error, Result};

/// Arguments of the subcommand.
#[derive(Debug, Args)]
pub struct PlanArgs {}

/// Runs the subcommand.
pub fn cmd_plan(_a: PlanArgs) -> Result<()> {
    Err(Error::request("not implemented yet"))
}
