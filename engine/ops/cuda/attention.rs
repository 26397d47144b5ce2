//! CUDA wrappers for the `attention` kernel family (in progress).
