"""Layer stacks: parameters stacked along a leading ``layers`` axis, applied with ``nnx.scan``.

A :class:`LayerStack` creates ``depth`` copies of a block with ``nnx.vmap`` (one ``Param`` per
weight with a leading layer axis, logical name ``"layers"``) and runs any contiguous range of
them with :func:`LayerStack.run`: a ``lax.scan`` over layer indices (each step reads its layer
from the stacked parameters in place) with ``jax.checkpoint`` (policy by name), or an unrolled
Python loop (``scan=False``) for debugging. A range may
be scanned in groups (``group=2`` scans over (local, global) pairs for alternating attention).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

REMAT_POLICIES = ("none", "full", "nothing_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable", "everything_saveable")


def remat_policy(name: str | None):
  """Map a config string to a ``jax.checkpoint_policies`` policy (``None`` = no remat)."""
  if name in (None, "", "none"):
    return None
  if name == "full":
    name = "nothing_saveable"
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat policy must be one of {REMAT_POLICIES}; got {name!r}")
  return getattr(jax.checkpoint_policies, name)


class LayerStack(nnx.Module):
  """``depth`` blocks built by ``make_block(rngs)`` with their parameters stacked."""

  def __init__(self, make_block: Callable[[nnx.Rngs], nnx.Module], depth: int, *,
               rngs: nnx.Rngs, scan: bool = True, remat: str | None = None):
    if depth < 1:
      raise ValueError(f"a layer stack needs depth >= 1; got {depth}")
    self.depth = depth
    self.scan = scan
    self.remat = remat

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=0, out_axes=0, axis_size=depth)
    @nnx.transform_metadata(in_axes=0, out_axes=0, partition="layers")
    def make(r):
      return make_block(r)

    self.layers = make(rngs)

  def layer(self, i: int) -> nnx.Module:
    """Block ``i`` as an ordinary module (a view of slice ``i`` of the stacked parameters)."""
    gd, st = nnx.split(self.layers)
    return nnx.merge(gd, jax.tree.map(lambda a: a[i], st))

  def run(self, carry: Any, body: Callable[[Any, nnx.Module], Any], start: int = 0,
          stop: int | None = None, group: int = 1) -> Any:
    """Apply ``carry = body(carry, block)`` for layers ``start .. stop-1`` in order.

    With ``group > 1`` the body receives a block whose parameters have a leading axis of size
    ``group`` (use :func:`unstack` to get the members), and the range must divide evenly.
    """
    stop = self.depth if stop is None else stop
    n = stop - start
    if n <= 0:
      return carry
    if n % group:
      raise ValueError(f"layer range {start}:{stop} does not split into groups of {group}")
    gd, st = nnx.split(self.layers)

    def take(i):
      """Layer ``i`` (or layers ``i .. i+group-1``) of the stacked parameters."""
      if group > 1:
        return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, i, group), st)
      return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), st)

    if not self.scan:
      for i in range(start, stop, group):
        carry = body(carry, nnx.merge(gd, take(i)))
      return carry

    # The scan indexes the full stack inside the loop instead of scanning over a slice of it:
    # a slice ``params[start:stop]`` is materialised by XLA (a second copy of the weights for
    # the whole forward), an index inside the body reads one layer in place.
    def step(c, i):
      return body(c, nnx.merge(gd, take(i))), None

    policy = remat_policy(self.remat)
    if policy is not None:
      step = jax.checkpoint(step, policy=policy)
    carry, _ = jax.lax.scan(step, carry, jnp.arange(start, stop, group))
    return carry

  def map_layers(self, fn: Callable[[nnx.Module], Any]) -> Any:
    """``fn(block)`` for every layer at once (vectorised), outputs stacked on a leading layer
    axis: e.g. each cross-attention layer's keys and values of one context."""
    gd, st = nnx.split(self.layers)
    return jax.vmap(lambda s: fn(nnx.merge(gd, s)))(st)

  def run_with(self, carry: Any, body: Callable[[Any, nnx.Module, Any], Any], xs: Any) -> Any:
    """``carry = body(carry, block_i, xs_i)`` for every layer in order, ``xs`` a pytree whose
    leaves have a leading layer axis (e.g. the output of :meth:`map_layers`)."""
    gd, st = nnx.split(self.layers)
    at = lambda tree, i: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False),
                                      tree)
    if not self.scan:
      for i in range(self.depth):
        carry = body(carry, nnx.merge(gd, at(st, i)), at(xs, i))
      return carry

    def step(c, i):
      return body(c, nnx.merge(gd, at(st, i)), at(xs, i)), None

    policy = remat_policy(self.remat)
    if policy is not None:
      step = jax.checkpoint(step, policy=policy)
    carry, _ = jax.lax.scan(step, carry, jnp.arange(self.depth))
    return carry


def run_together(stacks: tuple[LayerStack, ...], carry: Any,
                 body: Callable[[Any, tuple[nnx.Module, ...]], Any], start: int = 0,
                 stop: int | None = None) -> Any:
  """``carry = body(carry, (stacks[0].layer(i), stacks[1].layer(i), ...))`` for ``i`` in
  ``start .. stop-1``: stacks of equal depth walked in lockstep (VGGT's separate frame and
  global block lists). Scanned, reading each layer in place, when the first stack scans."""
  depth = stacks[0].depth
  if any(st.depth != depth for st in stacks):
    raise ValueError(f"stacks of different depths {[st.depth for st in stacks]}")
  stop = depth if stop is None else stop
  if stop <= start:
    return carry
  split = [nnx.split(st.layers) for st in stacks]

  def take(i):
    return tuple(nnx.merge(gd, jax.tree.map(
        lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), st)) for gd, st in split)

  if not stacks[0].scan:
    for i in range(start, stop):
      carry = body(carry, take(i))
    return carry

  def step(c, i):
    return body(c, take(i)), None

  policy = remat_policy(stacks[0].remat)
  if policy is not None:
    step = jax.checkpoint(step, policy=policy)
  carry, _ = jax.lax.scan(step, carry, jnp.arange(start, stop))
  return carry


def unstack(block: nnx.Module, n: int) -> list[nnx.Module]:
  """Split a block with stacked parameters (leading axis ``n``) into ``n`` blocks."""
  gd, st = nnx.split(block)
  return [nnx.merge(gd, jax.tree.map(lambda a, i=i: a[i], st)) for i in range(n)]
