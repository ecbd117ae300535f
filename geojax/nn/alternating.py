"""Alternating within-view ("local"/frame) and cross-view ("global") attention.

Tokens live as ``(B, S, N, C)``: batch, views, tokens per view, channels. A local block attends
inside each view on ``(B*S, N, C)``; a global block attends across all views on ``(B, S*N, C)``.
The same block weights can be applied either way; the schedule decides. DA3 (shared weights,
one list), VGGT/URGT (frame/global lists) and the Pi3/DAGE decoder (even = frame, odd = global)
all reduce to :func:`run_schedule` over a :class:`~geojax.nn.stack.LayerStack`.

View parallelism: both kinds keep ``(B, S, N, C)`` split over the ``"view"`` mesh axis when
there is one (:func:`geojax.parallel.sharding.shard_views`). A local block then needs no
communication at all; a global block is called with ``cross_view=True`` so that its attention
gathers keys and values but keeps queries and logits split (:func:`geojax.nn.attention.attend`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from geojax.nn.stack import LayerStack, run_together, unstack
from geojax.parallel.sharding import shard_views

LOCAL, GLOBAL = "local", "global"


def local_attention(block, x: jax.Array, pos: jax.Array | None) -> jax.Array:
  """Apply ``block`` inside each view: ``(B, S, N, C)`` -> ``(B*S, N, C)`` and back."""
  b, s, n, c = x.shape
  y = block(shard_views(x, 1).reshape(b * s, n, c), pos)
  return shard_views(y.reshape(b, s, n, c), 1)


def global_attention(block, x: jax.Array, pos: jax.Array | None) -> jax.Array:
  """Apply ``block`` across views: ``(B, S, N, C)`` -> ``(B, S*N, C)`` and back.

  The block is called with ``cross_view=True`` (its attention spans all views; see the module
  docstring), so it must accept that keyword, as :class:`geojax.nn.vit.Block` does.
  """
  b, s, n, c = x.shape
  y = block(shard_views(x, 1).reshape(b, s * n, c), pos, cross_view=True)
  return shard_views(y.reshape(b, s, n, c), 1)


def _segments(kinds: Sequence[str]):
  """Split a schedule into runs: ('pairs', n) of (local, global) pairs or ('same', kind, n)."""
  out, i = [], 0
  while i < len(kinds):
    j = i
    while j + 1 < len(kinds) and kinds[j] == LOCAL and kinds[j + 1] == GLOBAL:
      j += 2
    if j > i:
      out.append(("pairs", (j - i) // 2))
      i = j
      continue
    j = i
    while j < len(kinds) and kinds[j] == kinds[i]:
      j += 1
    out.append(("same", kinds[i], j - i))
    i = j
  return out


def run_schedule(stack: LayerStack, x: jax.Array, local_x: jax.Array, *, start: int, stop: int,
                 kinds: Sequence[str], pos_local: jax.Array | None = None,
                 pos_global: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Run layers ``start..stop-1`` of ``stack`` with ``kinds[k]`` for layer ``start + k``.

  Returns ``(x, local_x)``, where ``local_x`` is the output of the latest local layer (the
  features that VGGT-style heads concatenate with the global ones). Uniform runs are scanned
  layer by layer and (local, global) runs pair by pair.
  """
  if len(kinds) != stop - start:
    raise ValueError(f"schedule has {len(kinds)} entries for {stop - start} layers")

  def body_local(carry, blk):
    y = local_attention(blk, carry[0], pos_local)
    return (y, y)

  def body_global(carry, blk):
    return (global_attention(blk, carry[0], pos_global), carry[1])

  def body_pair(carry, blk):
    loc, glo = unstack(blk, 2)
    return body_global(body_local(carry, loc), glo)

  carry, i = (x, local_x), start
  for seg in _segments(kinds):
    if seg[0] == "pairs":
      n = seg[1]
      carry = stack.run(carry, body_pair, i, i + 2 * n, group=2)
      i += 2 * n
    else:
      _, kind, n = seg
      carry = stack.run(carry, body_local if kind == LOCAL else body_global, i, i + n)
      i += n
  return carry


def run_frame_global(frame: LayerStack, glob: LayerStack, x: jax.Array, *, start: int,
                     stop: int, pos_local: jax.Array | None = None,
                     pos_global: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """VGGT's aggregator order with separate block lists: for ``i`` in ``start .. stop-1``, frame
  block ``i`` (local) then global block ``i``. ``x`` ``(B, S, N, C)``; returns
  ``(global block stop-1's output, frame block stop-1's output)``."""

  def body(carry, blocks):
    f, g = blocks
    y = local_attention(f, carry[0], pos_local)
    return (global_attention(g, y, pos_global), y)

  return run_together((frame, glob), (x, x), body, start, stop)
