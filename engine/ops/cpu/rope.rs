//! Rotary position embeddings in the `rotate_half` layout HF Llama uses, the CPU twin of `kernels/rope.cu`.

use rayon::prelude::*;

/// Rotates `num_heads` heads of `head_dim` at the start of each row of `x` (row stride `stride`), row `r` at
/// position `positions[r]`: for `j < head_dim/2`, `(x[j], x[j+half])` turns by angle `positions[r] * inv_freq[j]`.
///
/// The angle is the f32 product, as transformers computes it. Panics on inconsistent lengths.
pub fn rope(x: &mut [f32], stride: usize, num_heads: usize, head_dim: usize, positions: &[u32], inv_freq: &[f32]) {
    let half = head_dim / 2;
    assert_eq!(inv_freq.len(), half, "rope: inv_freq length");
    assert!(num_heads * head_dim <= stride, "rope: heads exceed the row stride");
    assert_eq!(x.len(), positions.len() * stride, "rope: x length");
    x.par_chunks_mut(stride).zip(positions.par_iter()).for_each(|(row, &pos)| {
        let (sin, cos): (Vec<f32>, Vec<f32>) = inv_freq
            .iter()
            .map(|&f| {
                let angle = pos as f32 * f;
                let (s, c) = (angle as f64).sin_cos();
                (s as f32, c as f32)
            })
            .unzip();
        for head in row[..num_heads * head_dim].chunks_mut(head_dim) {
            let (a, b) = head.split_at_mut(half);
            for j in 0..half {
                let (x1, x2) = (a[j], b[j]);
                a[j] = x1 * cos[j] - x2 * sin[j];
                b[j] = x2 * cos[j] + x1 * sin[j];
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarter_turn() {
        // Position 0 is the identity; position 3 turns the first pair by 3 radians.
        let mut x = vec![1.0f32, 0.0, 0.0, 1.0];
        rope(&mut x, 4, 1, 4, &[0], &[1.0, 0.5]);
        assert_eq!(x, vec![1.0, 0.0, 0.0, 1.0]);
        let mut y = vec![1.0f32, 0.0, 0.0, 0.0];
        rope(&mut y, 4, 1, 4, &[3], &[1.0, 0.5]);
        let (s, c) = 3f64.sin_cos();
        assert!((y[0] - c as f32).abs() < 1e-6 && (y[2] - s as f32).abs() < 1e-6);
        // The norm of each rotated pair is preserved.
        assert!((y[0] * y[0] + y[2] * y[2] - 1.0).abs() < 1e-6);
    }
}
