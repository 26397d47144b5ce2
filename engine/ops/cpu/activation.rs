//! SwiGLU activation, the CPU twin of `kernels/activation.cu`.

use rayon::prelude::*;

/// `out[r, j] = silu(gate_up[r, j]) * gate_up[r, inter + j]` for a `[rows, 2 * inter]` input.
pub fn silu_mul(gate_up: &[f32], inter: usize, out: &mut [f32]) {
    assert_eq!(gate_up.len(), 2 * out.len(), "silu_mul: lengths");
    assert_eq!(out.len() % inter.max(1), 0, "silu_mul: out is not a multiple of inter");
    out.par_chunks_mut(inter).zip(gate_up.par_chunks(2 * inter)).for_each(|(o, gu)| {
        let (g, u) = gu.split_at(inter);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn silu_mul_values() {
        let mut out = vec![0.0f32; 2];
        super::silu_mul(&[0.0, 2.0, 5.0, 3.0], 2, &mut out);
        assert_eq!(out[0], 0.0);
        assert!((out[1] - 2.0 / (1.0 + (-2.0f32).exp()) * 3.0).abs() < 1e-6);
    }
}
