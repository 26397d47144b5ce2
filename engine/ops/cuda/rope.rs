//! CUDA wrappers for the `rope` kernel family (in progress).
