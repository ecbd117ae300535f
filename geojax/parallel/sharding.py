"""Logical axis names -> mesh axes, model creation with or without a mesh, and view parallelism.

Parameters carry logical names (``embed``, ``mlp``, ``heads``, ``conv_in``, ``conv_out``,
``layers``). Under ``jax.set_mesh(mesh)`` and ``nnx.logical_axis_rules(rules)`` they are created
sharded; without a mesh they are created as ordinary single-device arrays.

View parallelism. Multi-view models hold tokens as ``(B, S, N, C)``. When the active mesh has an
axis named ``"view"`` (see :func:`make_view_mesh`), the views ``S`` are split over it: every
within-view layer (patch embedding, local attention, MLPs, DPT heads) runs on each device's own
views, and cross-view attention keeps its queries split along the token axis ``S*N`` while the
keys and values are all-gathered. Activation memory per device is then about ``1/n`` of the
single-device one, the ``(S*N)^2`` attention logits included; what is not divided is the
parameters and one global layer's gathered keys and values. The helpers below only add
``with_sharding_constraint`` hints (Auto meshes; GSPMD/Shardy inserts the collectives) and are
no-ops without a mesh, without a ``"view"`` axis, or when the axis does not divide the size.
Every other dimension is left ``P.UNCONSTRAINED`` so that a ``"data"`` axis (batch) composes.
"""

from __future__ import annotations

import contextlib

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
VIEW_AXIS = "view"
VIEW_MESH_AXES = ("data", VIEW_AXIS)

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


def make_view_mesh(view_devices: int | None = None) -> jax.sharding.Mesh:
  """An Auto mesh ``("data", "view")`` of shape ``(1, n)`` for view-parallel inference.

  ``n = view_devices`` (default: every device) must divide the device count; the mesh uses the
  first ``n`` devices. Under ``jax.set_mesh(mesh)`` multi-view models split their views over
  ``"view"`` (see the module docstring).
  """
  count = jax.device_count()
  n = count if view_devices is None else int(view_devices)
  if n < 1:
    raise ValueError(f"view_devices must be >= 1; got {view_devices}")
  if count % n:
    raise ValueError(f"view_devices={n} does not divide the {count} available device(s); use a "
                     f"divisor of {count}")
  return jax.make_mesh((1, n), VIEW_MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:n])


def view_axis_size() -> int:
  """Size of the active mesh's ``"view"`` axis; 1 without a mesh or without that axis, and
  inside a ``shard_map`` that is manual over it (values there are already per device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or VIEW_AXIS not in mesh.axis_names or VIEW_AXIS in mesh.manual_axes:
    return 1
  return int(mesh.shape[VIEW_AXIS])


def _constrain(x: jax.Array, axis: int | None, replicate: tuple[int, ...] = ()) -> jax.Array:
  """``x`` with dim ``axis`` on ``"view"``, dims ``replicate`` whole, the rest unconstrained."""
  spec = [P.UNCONSTRAINED] * x.ndim
  for a in replicate:
    spec[a % x.ndim] = None
  if axis is not None:
    spec[axis % x.ndim] = VIEW_AXIS
  return jax.lax.with_sharding_constraint(x, P(*spec))


def shard_views(x: jax.Array, axis: int = 1) -> jax.Array:
  """Split dim ``axis`` of ``x`` (views, or views*tokens) over the ``"view"`` mesh axis.

  A no-op without a ``"view"`` axis of size > 1 or when the axis does not divide the dim (the
  partitioner then picks a layout itself).
  """
  n = view_axis_size()
  if n <= 1 or x.shape[axis] % n:
    return x
  return _constrain(x, axis)


def shard_tokens(x: jax.Array, axis: int = 1) -> jax.Array:
  """Cross-view queries, logits and outputs: the token axis ``S*N`` split over ``"view"``.

  Views are contiguous in ``S*N`` (view-major), so this is the layout of ``(B, S, N, C)``
  tokens split over ``S``; the reshape between the two costs no communication.
  """
  return shard_views(x, axis)


def gather_tokens(x: jax.Array, axis: int = 1) -> jax.Array:
  """Cross-view keys and values: the token axis whole on every device (an all-gather).

  Only the token axis is pinned; batch, head and channel dims stay unconstrained. A no-op when
  :func:`shard_views` would be one.
  """
  n = view_axis_size()
  if n <= 1 or x.shape[axis] % n:
    return x
  return _constrain(x, None, replicate=(axis,))
