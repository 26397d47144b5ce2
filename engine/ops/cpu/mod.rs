//! CPU reference kernels (f32, multithreaded with rayon). Each is the twin of a CUDA kernel family.
pub mod norm;
