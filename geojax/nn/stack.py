"""Layer stacks: parameters stacked along a leading ``layers`` axis, applied with ``nnx.scan``.

A :class:`LayerStack` creates ``depth`` copies of a block with ``nnx.vmap`` (one ``Param`` per
weight with a leading layer axis, logical name ``"layers"``) and runs any contiguous range of
them with :func:`LayerStack.run`: ``nnx.scan`` + ``nnx.remat`` (policy by name) with
``graph_updates=False``, or an unrolled Python loop (``scan=False``) for debugging. A range may
be scanned in groups (``group=2`` scans over (local, global) pairs for alternating attention).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
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
    sub = jax.tree.map(lambda a: a[start:stop], st)
    if group > 1:
      sub = jax.tree.map(lambda a: a.reshape(n // group, group, *a.shape[1:]), sub)
    if not self.scan:
      for i in range(n // group):
        carry = body(carry, nnx.merge(gd, jax.tree.map(lambda a: a[i], sub)))
      return carry
    policy = remat_policy(self.remat)
    step = body
    if policy is not None:
      step = nnx.remat(body, policy=policy, graph_updates=False)
    scanned = nnx.scan(step, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, graph_updates=False)
    return scanned(carry, nnx.merge(gd, sub))


def unstack(block: nnx.Module, n: int) -> list[nnx.Module]:
  """Split a block with stacked parameters (leading axis ``n``) into ``n`` blocks."""
  gd, st = nnx.split(block)
  return [nnx.merge(gd, jax.tree.map(lambda a, i=i: a[i], st)) for i in range(n)]
