//! Llama 3.2 Vision on CUDA: the vision encoder and the cross-attention text decoder.
