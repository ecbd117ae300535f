"""Model checkpoints with Orbax: parameters plus the JSON needed to rebuild the model.

A *model checkpoint* is an Orbax directory with two items: ``state`` (the ``nnx.State`` of the
model, restored with its sharding when a mesh is active) and ``model`` (JSON: ``family``, e.g.
``"da3"``, and ``config``, the family's config as plain JSON). Orbax writes into a temporary
directory and renames it when complete, so an interrupted save never leaves a half-written
checkpoint; an existing path is never overwritten unless ``overwrite=True``.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding, SingleDeviceSharding


def _checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_model(path: str, model: nnx.Module, family: str, config: dict[str, Any], *,
               overwrite: bool = False) -> str:
  """Write ``model`` to ``path`` (absolute or relative) and return the absolute path."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"save_model: {path} exists; pass overwrite=True to replace it")
  state = nnx.state(model)
  _checkpointer().save(path, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      model=ocp.args.JsonSave({"family": family, "config": config})), force=overwrite)
  return path


def read_model_info(path: str) -> dict[str, Any]:
  """The ``{"family", "config"}`` JSON of a model checkpoint; clear errors for bad paths."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"model checkpoint {path} does not exist")
  if not os.path.isdir(os.path.join(path, "model")) or not os.path.isdir(
      os.path.join(path, "state")):
    raise ValueError(f"{path} is not a geojax model checkpoint (expected 'model' and 'state' "
                     "items written by geojax.io.checkpoint.save_model)")
  try:
    out = _checkpointer().restore(path, args=ocp.args.Composite(model=ocp.args.JsonRestore()))
  except Exception as e:  # noqa: BLE001 - Orbax/tensorstore raise many types for a damaged file
    raise ValueError(f"{path}: cannot read the model description ({_first_line(e)}); the "
                     "checkpoint is incomplete or damaged") from None
  info = out["model"]
  if not isinstance(info, dict) or not isinstance(info.get("family"), str) or not isinstance(
      info.get("config"), dict):
    raise ValueError(f"{path}: the model item is not a geojax model description (expected "
                     "'family' and 'config')")
  return dict(info)


def _first_line(e: BaseException, limit: int = 240) -> str:
  text = " ".join(str(e).split("[tensorstore_spec")[0].split())
  text = f"{type(e).__name__}: {text}"
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _concrete_target(leaf):
  """An abstract leaf created under ``jax.set_mesh`` carries a sharding over the abstract mesh,
  which Orbax cannot place: give it the active concrete mesh (same axes) or the default
  device."""
  sharding = getattr(leaf, "sharding", None)
  if not isinstance(sharding, NamedSharding) or not isinstance(sharding.mesh, AbstractMesh):
    return leaf
  mesh = jax.sharding.get_mesh()
  if tuple(mesh.axis_names) == tuple(sharding.mesh.axis_names):
    target = NamedSharding(mesh, sharding.spec)
  else:
    target = SingleDeviceSharding(jax.devices()[0])
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=target)


def restore_state(path: str, model: nnx.Module) -> nnx.Module:
  """Load the parameters at ``path`` into ``model`` (same structure; abstract is fine)."""
  path = os.path.abspath(path)
  graphdef, abstract = nnx.split(model)
  abstract = jax.tree.map(_concrete_target, abstract)
  try:
    out = _checkpointer().restore(path, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"{path}: cannot restore the model parameters ({_first_line(e)}); the "
                     "checkpoint is incomplete, damaged or of another model version") from None
  return nnx.merge(graphdef, out["state"])
