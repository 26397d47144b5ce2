//! llama32: an inference engine for Meta's Llama 3.2 family.
//!
//! The data path, from request to kernel: [`chat_template`] and [`tokenizer`] turn a request into ids,
//! [`exec`] runs batched steps ([`exec::StepInput`]) through the model recipe in [`model`], written once over
//! the [`model::Ops`] trait with a CPU reference backend ([`ops::cpu`]) and CUDA kernels ([`ops::cuda`]);
//! [`sampling`] picks the next ids and [`tokenizer::StreamDecoder`] turns them back into text.
#![warn(missing_docs)]

pub mod chat_template;
pub mod cli;
pub mod config;
pub mod error;
pub mod exec;
pub mod kv;
pub mod model;
pub mod npy;
pub mod ops;
pub mod quant;
pub mod sampling;
pub mod sched;
pub mod serve;
pub mod telemetry;
pub mod tokenizer;
pub mod tool_calls;
pub mod tp;
pub mod vision;
pub mod weights;

pub use error::{Error, Result};
