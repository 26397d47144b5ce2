//! CUDA 4-bit projections: W4A16 and W4A8 kernels with their host wrappers.
