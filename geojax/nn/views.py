"""Multi-view helpers: reference-view selection and view reordering (DA3), and running a
module over many views a chunk at a time (:func:`map_in_view_chunks`).

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

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from geojax.parallel.sharding import shard_views, view_axis_size

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


def map_view_chunks(module: nnx.Module, call: Callable[[nnx.Module, list], Any],
                     inputs: Sequence[jax.Array], chunk: int) -> Any:
  """``call(module, inputs)`` over the leading (view) axis ``V`` of ``inputs``, ``chunk`` at a time.

  The views are padded with zeros to ``steps * chunk`` and laid out as ``(chunk, steps)`` -
  view ``i * steps + j`` at ``[i, j]`` - and a ``lax.scan`` runs over ``j``. The scanned axis is
  therefore never the one split over devices: with ``V`` split over ``n`` devices in contiguous
  blocks and ``n | chunk``, axis ``i`` carries exactly that split, and every step processes
  ``chunk / n`` views on every device without moving data (scanning a ``(steps, chunk)`` layout
  would instead hand each step to one device after another). The module enters the loop as
  ``nnx.split`` state, merged inside the body, so nothing is mutated across the trace boundary.
  Every output must have the leading view axis; padded views are dropped.
  """
  v = inputs[0].shape[0]
  steps = -(-v // chunk)
  pad = steps * chunk - v
  graphdef, state = nnx.split(module)

  def to_chunks(t):
    if pad:
      t = jnp.pad(t, ((0, pad),) + ((0, 0),) * (t.ndim - 1))
    t = shard_views(t, 0).reshape(chunk, steps, *t.shape[1:])
    return shard_views(jnp.swapaxes(t, 0, 1), 1)  # (steps, chunk, ...), scan over steps

  def from_chunks(t):
    t = shard_views(jnp.swapaxes(t, 0, 1), 0).reshape(chunk * steps, *t.shape[2:])
    return shard_views(t[:v], 0)

  def body(carry, xs):
    out = call(nnx.merge(graphdef, state), [shard_views(t, 0) for t in xs])
    return carry, jax.tree.map(lambda t: shard_views(t, 0), out)

  _, out = jax.lax.scan(body, None, [to_chunks(t) for t in inputs])
  return jax.tree.map(from_chunks, out)


def map_in_view_chunks(module: nnx.Module, call: Callable[[nnx.Module, list], Any],
                       inputs: Sequence[jax.Array], chunk: int) -> Any:
  """``call(module, inputs)`` on flattened ``(V, ...)`` views, ``chunk`` at a time
  (:func:`map_view_chunks`) when ``0 < chunk < V``, all at once otherwise. With the views split
  over a view mesh axis of ``n`` devices (``n | V``) the chunk is rounded up to a multiple of
  ``n``, so every device processes its own views at every step."""
  v = inputs[0].shape[0]
  n = view_axis_size()
  if chunk and n > 1 and v % n == 0:
    chunk = -(-chunk // n) * n
  if 0 < chunk < v:
    return map_view_chunks(module, call, inputs, chunk)
  return call(module, inputs)
