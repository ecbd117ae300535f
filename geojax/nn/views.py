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
``[ref, 0, 1, ..., ref-1, ref+1, ...]``; :func:`restore_views` undoes it. Both are written as
shifts by one view (``lax.pad``) and selects rather than as a gather along ``S``: the result is
bit-identical (pure data movement), and when the views are split over a ``"view"`` mesh axis
the partitioner turns a shift into one view exchanged between neighbouring devices and the
pick of the reference view into an all-reduce of one view, where a gather along a split axis
would all-gather every token of every view onto every device.
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


def _shift_views(x: jax.Array, k: int) -> jax.Array:
  """``y[:, p] = x[:, p - k]`` along the view axis 1 (``k = +-1``), zeros shifted in."""
  cfg = [(0, 0, 0)] * x.ndim
  cfg[1] = (k, -k, 0)
  return jax.lax.pad(x, jnp.zeros((), x.dtype), cfg)


def _view_mask(cond: jax.Array, ndim: int) -> jax.Array:
  """A ``(B, S)`` condition broadcastable against ``(B, S, ...)`` with ``ndim`` dims."""
  return cond.reshape(cond.shape + (1,) * (ndim - 2))


def _pick_view(x: jax.Array, ref: jax.Array) -> jax.Array:
  """``x[b, ref[b]]`` as ``(B, 1, ...)``: a masked sum over views (exact: one term is kept)."""
  hit = _view_mask(jnp.arange(x.shape[1])[None] == ref[:, None], x.ndim)
  return jnp.sum(jnp.where(hit, x, jnp.zeros((), x.dtype)), axis=1, keepdims=True, dtype=x.dtype)


def reorder_views(x: jax.Array, ref: jax.Array) -> jax.Array:
  """Views ``[ref, 0, ..., ref-1, ref+1, ...]`` of ``x`` ``(B, S, ...)`` (see the module)."""
  pos, r = jnp.arange(x.shape[1])[None], ref[:, None]
  out = jnp.where(_view_mask(pos <= r, x.ndim), _shift_views(x, 1), x)
  return jnp.where(_view_mask(pos == 0, x.ndim), _pick_view(x, ref), out)


def restore_views(x: jax.Array, ref: jax.Array) -> jax.Array:
  """Inverse of :func:`reorder_views`."""
  pos, r = jnp.arange(x.shape[1])[None], ref[:, None]
  out = jnp.where(_view_mask(pos < r, x.ndim), _shift_views(x, -1), x)
  return jnp.where(_view_mask(pos == r, x.ndim), _pick_view(x, jnp.zeros_like(ref)), out)
