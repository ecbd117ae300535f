"""Multi-view helpers: reference-view selection and view reordering (DA3).

Selection runs on the per-view class/camera token ``x[:, :, 0]`` of ``(B, S, N, C)`` tokens.

Ties. The official ``saddle_sim_range`` subtracts the identity from the cosine-similarity
matrix, so each view's own (rounded) self-similarity minus one takes part in the minimum.
Whenever all cross-view similarities are positive - the usual case - the two most similar views
then score exactly the same up to float rounding, and which of them the official code picks
depends on the last bits of its BLAS. geojax resolves such ties deterministically: every view
whose score is within :data:`TIE_TOL` of the best counts as best and the lowest index wins.
Outside ties the choice is the official one.

Reordering puts the reference view first and keeps the others in order:
``[ref, 0, 1, ..., ref-1, ref+1, ...]``; :func:`restore_views` undoes it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

STRATEGIES = ("saddle_balanced", "first", "middle", "saddle_sim_range")
TIE_TOL = 1e-5


def _first_best(score: jax.Array) -> jax.Array:
  """Lowest index whose ``score`` (higher is better) is within ``TIE_TOL`` of the best."""
  best = score.max(axis=1, keepdims=True)
  return jnp.argmax(score >= best - TIE_TOL, axis=1).astype(jnp.int32)


def select_reference_view(x: jax.Array, strategy: str = "saddle_balanced") -> jax.Array:
  """Index ``(B,)`` of the reference view for tokens ``x`` ``(B, S, N, C)`` (ties: see module)."""
  if strategy not in STRATEGIES:
    raise ValueError(f"ref_view_strategy must be one of {STRATEGIES}; got {strategy!r}")
  b, s = x.shape[:2]
  if s <= 1 or strategy == "first":
    return jnp.zeros((b,), jnp.int32)
  if strategy == "middle":
    return jnp.full((b,), s // 2, jnp.int32)
  c = x[:, :, 0].astype(jnp.float32)
  norm = jnp.linalg.norm(c, axis=-1)
  ch = c / norm[..., None]
  sim = jnp.einsum("bsc,btc->bst", ch, ch, precision=jax.lax.Precision.HIGHEST)
  sim = sim - jnp.eye(s, dtype=sim.dtype)
  if strategy == "saddle_sim_range":
    return _first_best(sim.max(-1) - sim.min(-1))
  sim_score = sim.sum(-1) / (s - 1)
  var = jnp.var(ch, axis=-1, ddof=1)  # torch.var is unbiased

  def unit(m):
    lo, hi = m.min(1, keepdims=True), m.max(1, keepdims=True)
    return (m - lo) / (hi - lo + 1e-8)

  score = (jnp.abs(unit(sim_score) - 0.5) + jnp.abs(unit(norm) - 0.5)
           + jnp.abs(unit(var) - 0.5))
  return _first_best(-score)


def reorder_index(ref: jax.Array, s: int) -> jax.Array:
  """``(B, S)`` gather indices that move view ``ref`` to the front."""
  pos = jnp.arange(s)[None]
  r = ref[:, None]
  idx = jnp.where((pos > 0) & (pos <= r), pos - 1, pos)
  return jnp.where(pos == 0, r, idx)


def reorder_views(x: jax.Array, ref: jax.Array) -> jax.Array:
  idx = reorder_index(ref, x.shape[1])
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def restore_views(x: jax.Array, ref: jax.Array) -> jax.Array:
  pos = jnp.arange(x.shape[1])[None]
  r = ref[:, None]
  idx = jnp.where(pos < r, pos + 1, pos)
  idx = jnp.where(pos == r, 0, idx)
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
