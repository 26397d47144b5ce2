//! Tensor parallelism: sharding plan, communicators and the rank-parallel executors.
