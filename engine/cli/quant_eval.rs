//! `llama32 quant-eval`: logit error and greedy agreement of a quantization scheme.

use clap::Args;

use crate::{Error, Result};

/// Arguments of the subcommand.
#[derive(Debug, Args)]
pub struct QuantEvalArgs {}

/// Runs the subcommand.
pub fn cmd_quant_eval(_a: QuantEvalArgs) -> Result<()> {
    Err(Error::request("not implemented yet"))
}
