//! Every GPU test in one binary (each binary carries the whole kernel library, and the device tool carries at most
//! 64 MiB): the kernel twin tests, the CUDA golden tests and the ignored kernel benchmarks. Without a CUDA device
//! each test prints "skipped: no CUDA device (...)" and returns.

#[path = "../common/mod.rs"]
mod common;

mod cuda_attention;
mod cuda_decode_stack;
mod cuda_elementwise;
mod cuda_encoder_attention;
mod cuda_gemv;
mod cuda_golden;
mod cuda_int8_table;
mod cuda_kernels;
mod cuda_logprobs;
mod cuda_quant;
mod cuda_sampling;
mod cuda_tp;
mod cuda_vision;
mod cuda_vision_quant;
mod cuda_w4a16_large;
mod cuda_w4a8_wgmma;
mod scored;
mod watchdog;
