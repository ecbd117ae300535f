"""Compiled inference for any geojax model: split once, ``jax.jit`` a pure function.

``jax.jit`` over the split state is cheaper than ``nnx.jit`` (no object-graph traversal per
call). Keyword options of the model call are static (one compilation per distinct value).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx


def jit_forward(model: nnx.Module, **static_kwargs: Any) -> Callable[..., Any]:
  """``f(*arrays)`` equivalent to ``model(*arrays, **static_kwargs)``, compiled per shape."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def apply(state, *args):
    return nnx.merge(graphdef, state)(*args, **static_kwargs)

  return lambda *args: apply(state, *args)
