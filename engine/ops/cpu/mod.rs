//! CPU reference kernels (f32, multithreaded with rayon). Each is the twin of a CUDA kernel family.
pub mod activation;
pub mod attention;
pub mod embedding;
pub mod linear;
pub mod norm;
pub mod quant;
pub mod rope;
pub mod w4a8_segmented;
