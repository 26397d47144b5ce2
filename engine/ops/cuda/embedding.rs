//! CUDA wrappers for the `embedding` kernel family (in progress).
