//! CUDA wrappers for the `activation` kernel family (in progress).
