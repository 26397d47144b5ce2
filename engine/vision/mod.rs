//! Llama 3.2 Vision (`MllamaForConditionalGeneration`, 11B/90B) on the CPU reference: configuration and weights
//! ([`config`], [`weights`]), image preprocessing identical to transformers' `MllamaImageProcessor` ([`image`]),
//! the vision encoder and projector ([`encoder`]), the text decoder with cross-attention layers ([`text`]), and the
//! whole path from image bytes to logits or generated text ([`pipeline`]).

pub mod config;
pub mod cuda;
pub mod encoder;
pub mod exec;
pub mod image;
pub mod jpeg;
pub mod pipeline;
pub mod text;
pub mod tiles;
pub mod weights;
