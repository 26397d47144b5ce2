//! `llama32 quantize`: writes a 4-bit checkpoint.

use clap::Args;

use crate::{Error, Result};

/// Arguments of the subcommand.
#[derive(Debug, Args)]
pub struct QuantizeArgs {}

/// Runs the subcommand.
pub fn cmd_quantize(_a: QuantizeArgs) -> Result<()> {
    Err(Error::request("not implemented yet"))
}
