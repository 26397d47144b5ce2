//! CPU twins of the quantized projections: W4A16 and W4A8 (int8 per-token activations, int4 group weights).
