//! CPU reference kernels (f32, multithreaded).
