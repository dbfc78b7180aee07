"""Grouped matmul: rows of `x`, sorted by group, times that group's weight matrix.

Shapes: M rows (token slots sorted by expert), K contraction, N output, G groups (experts).
"""
import jax


def grouped_matmul(x, w, group_sizes, impl="auto"):
  """[M, K] x [G, K, N] with group_sizes [G] (sum <= M) -> [M, N]; rows past the sum are zero."""
  del impl
  return jax.lax.ragged_dot(x, w, group_sizes.astype("int32"))
