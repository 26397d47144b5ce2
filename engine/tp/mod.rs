//! Tensor parallelism: sharding plan, communicators and the rank-parallel executors.
//!
//! - [`plan`]: which rows/columns of each checkpoint tensor a rank holds ([`TpPlan`]), and the rank-local config.
//! - [`load`]: a rank reads only its slices from the memory-mapped safetensors ([`load_rank_weights`]).
//! - [`comm`]: the [`Communicator`] trait and the in-process [`LocalComm`]; [`nccl`]: NCCL through cudarc with a
//!   TCP rendezvous for multi-process and multi-node groups.
//! - [`exec`]: [`TpCpuExecutor`], the CPU reference run as N ranks in N threads; the model recipe calls the
//!   [`crate::model::Ops`] hooks `all_reduce` and `gather_logits` at the communication points.
//! - [`cuda`]: [`cuda::TpCudaExecutor`], CUDA ranks of a text model in one process over a [`cuda::DeviceComm`]
//!   (NCCL or host-staged); [`cuda_vision`]: [`cuda_vision::TpMllamaCudaExecutor`], the same for the text decoder
//!   of Llama 3.2 Vision; [`vision`]: its CPU reference.
//! - [`multinode`]: runs over several nodes: node 0 drives the other nodes' ranks over a TCP control connection
//!   ([`multinode::MultiNodeExecutor`], [`multinode::follow`]).
//! - [`perf`]: the performance model behind `llama32 plan`.
//!
//! docs/parallelism.md describes the design.

pub mod comm;
pub mod cuda;
pub mod cuda_vision;
pub mod exec;
pub mod load;
pub mod multinode;
pub mod nccl;
pub mod perf;
pub mod plan;
pub mod vision;

pub use comm::{Communicator, LocalComm};
pub use exec::{TpCpuExecutor, TpRankOps};
pub use load::load_rank_weights;
pub use plan::{RankShard, Split, TensorShard, TpPlan};
