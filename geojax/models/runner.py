"""Compiled inference for any geojax model: split once, ``jax.jit`` a pure function.

``jax.jit`` over the split state is cheaper than ``nnx.jit`` (no object-graph traversal per
call). Keyword options of the model call are static (one compilation per distinct value).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def jit_forward(model: nnx.Module, **static_kwargs: Any) -> Callable[..., Any]:
  """``f(*arrays)`` equivalent to ``model(*arrays, **static_kwargs)``, compiled per shape."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def apply(state, *args):
    return nnx.merge(graphdef, state)(*args, **static_kwargs)

  return lambda *args: apply(state, *args)


_CACHE: "weakref.WeakKeyDictionary[nnx.Module, dict]" = weakref.WeakKeyDictionary()


def compiled_call(model: nnx.Module, static: tuple[tuple[str, Any], ...], args: tuple,
                  mesh: jax.sharding.Mesh | None = None,
                  keep: tuple[str, ...] | None = None,
                  fn: Callable[..., Any] | None = None) -> Callable[..., Any]:
  """``f(*args)`` = ``model(*args, **dict(static))`` (or ``fn(model, *args, **dict(static))``,
  e.g. a model's ``infer`` with its post-processing; only the ``keep`` keys of a dict result),
  compiled ahead of time for these argument shapes and ``mesh`` (parameters replicated over
  it) and cached while the model lives; ``None`` arguments stay ``None``."""
  per_model = _CACHE.setdefault(model, {})
  key = (fn, static, keep, jax.tree.map(lambda a: (a.shape, str(a.dtype)), args),
         None if mesh is None else (mesh.axis_names, mesh.axis_sizes, tuple(mesh.device_ids.flat)))
  if key not in per_model:
    graphdef, state = nnx.split(model)
    if mesh is not None:
      state = jax.device_put(state, NamedSharding(mesh, P()))
    kwargs = dict(static)

    def apply(state, *a):
      m = nnx.merge(graphdef, state)
      out = m(*a, **kwargs) if fn is None else fn(m, *a, **kwargs)
      return out if keep is None else {name: out[name] for name in keep if name in out}

    exe = jax.jit(apply).lower(state, *args).compile()
    per_model[key] = (exe, state)
  exe, state = per_model[key]
  return lambda *a: exe(state, *a)
