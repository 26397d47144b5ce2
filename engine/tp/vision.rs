//! Tensor parallelism for Llama 3.2 Vision on the CPU reference.
