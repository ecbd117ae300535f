"""Logical axis names -> mesh axes, and model creation with or without a mesh.

Parameters carry logical names (``embed``, ``mlp``, ``heads``, ``conv_in``, ``conv_out``,
``layers``). Under ``jax.set_mesh(mesh)`` and ``nnx.logical_axis_rules(rules)`` they are created
sharded; without a mesh they are created as ordinary single-device arrays.
"""

from __future__ import annotations

import contextlib

import jax
from flax import nnx

MESH_AXES = ("data", "fsdp", "tensor")

# Default rules: FSDP over the embedding axis, tensor parallelism over MLP/heads.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("conv_in", None),
    ("conv_out", None),
    ("layers", None),
)


def make_mesh(shape: tuple[int, int, int] = (-1, 1, 1), names=MESH_AXES) -> jax.sharding.Mesh:
  """An Auto-typed mesh over all devices; one ``-1`` entry takes the remaining devices."""
  shape = list(shape)
  n = jax.device_count()
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)} may contain at most one -1")
  if -1 in shape:
    rest = 1
    for d in shape:
      rest *= d if d != -1 else 1
    if n % rest:
      raise ValueError(f"mesh shape {tuple(shape)} does not divide {n} devices")
    shape[shape.index(-1)] = n // rest
  total = 1
  for d in shape:
    total *= d
  if total != n:
    raise ValueError(f"mesh shape {tuple(shape)} needs {total} devices; {n} are available")
  return jax.make_mesh(tuple(shape), tuple(names),
                       axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def creation_context():
  """Context for building modules: eager sharding only when a mesh is active."""
  if jax.sharding.get_abstract_mesh().empty:
    return nnx.use_eager_sharding(False)
  return contextlib.nullcontext()


def create(ctor, rngs: nnx.Rngs):
  """``ctor(rngs)`` traced under one ``nnx.jit``: a single compilation for the whole model
  instead of one per distinct initializer shape (seconds instead of tens of seconds on CPU)."""
  with creation_context():
    return nnx.jit(ctor)(rngs)
