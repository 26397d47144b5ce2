//! Kernel families: each has a CPU twin in [`cpu`] and, where built, a CUDA wrapper in [`cuda`].
pub mod cpu;
pub mod cuda;
