//! CUDA kernel wrappers (in progress).
