//! Tensor parallelism on CUDA: ranks of the CUDA executor joined by a communicator.
