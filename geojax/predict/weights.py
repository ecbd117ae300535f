"""Finding and loading the model for inference.

``load_model(weights)`` accepts:

- an **official checkpoint directory**, laid out as the released hub checkpoints are:
  ``*.safetensors`` plus ``config.json``; each registered family says whether the weights are
  its own and which preset they are (``Family.identify_official``); ``preset`` (``--model``)
  names it when the files do not;
- a single official ``.safetensors`` file;
- a **geojax model checkpoint** (an Orbax directory with ``model/`` and ``state/``, written by
  ``train.py`` as ``<workdir>/model`` or by :func:`geojax.io.checkpoint.save_model`), or a
  training workdir holding one in ``model/``.

``hub_snapshot(repo_id)`` downloads a hub repository into the local Hugging Face cache first
(needs ``huggingface_hub`` and a network connection; never used by the tests).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
from flax import nnx


def _is_geojax_checkpoint(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "model")) and os.path.isdir(os.path.join(path, "state"))


def load_model(weights: str, *, preset: str | None = None,
               overrides: dict[str, Any] | None = None,
               option: str = "--weights") -> tuple[nnx.Module, dict[str, Any]]:
  """``(model, info)`` for a weights path (see the module docstring); ``info`` describes it.

  ``preset`` names the model when the weights do not (any registered family's preset);
  ``overrides`` are runtime fields of the family's config (``dtype`` as a string such as
  ``"bfloat16"``, ``attn_impl``, ``head_chunk``). ``option`` names the path in messages.

  Raises:
    FileNotFoundError for a missing path; ValueError for a path that is no checkpoint, weights
    no registered family recognises, or a ``preset`` that contradicts a geojax checkpoint.
  """
  from geojax.models import registry
  path = os.path.abspath(os.fspath(weights))
  overrides = dict(overrides or {})
  if not os.path.exists(path):
    raise FileNotFoundError(f"{option} {weights}: no such file or directory")
  family = None
  if preset is not None:
    try:
      family = registry.family_for_preset(preset)
    except ValueError as e:
      raise ValueError(f"--model {preset!r}: {e}") from None
  if os.path.isdir(path) and not _is_geojax_checkpoint(path) and _is_geojax_checkpoint(
      os.path.join(path, "model")):
    path = os.path.join(path, "model")  # a training workdir
  if os.path.isdir(path) and _is_geojax_checkpoint(path):
    model, _, config = registry.load_checkpoint(
        path, family=None if family is None else family.name, what=option,
        overrides=overrides)
    if preset is not None and config.get("preset") != preset:
      raise ValueError(f"{option} {weights} holds a {config.get('preset')!r} model but --model "
                       f"says {preset!r}")
    return model, {"weights": path, "format": "geojax", "preset": config.get("preset")}
  is_dir = os.path.isdir(path)
  if is_dir and os.path.isdir(os.path.join(path, "state")) and any(
      os.path.isdir(os.path.join(path, d)) for d in ("config", "data")):
    raise ValueError(f"{option} {weights}: a training checkpoint step (optimizer state and data "
                     "position), not a model checkpoint; pass the run's workdir (its model/ "
                     "folder is written when training ends)")
  has_st = (any(f.endswith(".safetensors") for f in os.listdir(path)) if is_dir
            else path.endswith(".safetensors"))
  if not has_st:
    raise ValueError(f"{option} {weights}: not a checkpoint (expected an official directory with "
                     f"model.safetensors and config.json, a .safetensors file, or a geojax "
                     f"checkpoint with model/ and state/); convert official .pth/.pt/.bin files "
                     f"once with `geojax convert`")
  from geojax.convert.torch_layout import safetensors_keys
  safetensors_keys(path)  # a corrupt or truncated file: one error naming it, before identification
  candidates = [family] if family is not None else [
      f for f in registry.families().values() if f.load_official is not None]
  for fam in candidates:
    found = fam.identify_official(path) if fam.identify_official else None
    if found is None and family is None:
      continue
    preset = preset or found or None
    if isinstance(overrides.get("dtype"), str):
      overrides["dtype"] = jnp.dtype(overrides["dtype"])
    try:
      model = fam.load_official(path, {"preset": preset or "", "overrides": overrides})
    except ValueError as e:
      raise ValueError(f"{option} {weights}: {e}" if path not in str(e) else str(e)) from None
    return model, {"weights": path, "format": "official",
                   "preset": preset or _preset_of(fam, model)}
  raise ValueError(f"{option} {weights}: no registered model family ({', '.join(sorted(registry.families()))}) "
                   f"recognises these weights; name the preset with --model")


def _preset_of(family, model: nnx.Module) -> str | None:
  """The preset whose config equals ``model.cfg`` (runtime fields aside), if any."""
  cfg = getattr(model, "cfg", None)
  for name in family.presets:
    try:
      ref = nnx.eval_shape(lambda: family.build({"preset": name}, nnx.Rngs(0)))
    except Exception:  # pylint: disable=broad-except
      continue
    if _same_architecture(getattr(ref, "cfg", None), cfg):
      return name
  return None


def _same_architecture(a, b) -> bool:
  import dataclasses
  if a is None or b is None or type(a) is not type(b):
    return False
  runtime = {"attn_impl", "dtype", "scan", "remat", "head_chunk"}
  return all(getattr(a, f.name) == getattr(b, f.name)
             for f in dataclasses.fields(a) if f.name not in runtime)


def hub_snapshot(repo_id: str) -> str:
  """Download ``repo_id`` from the Hugging Face hub into the local cache; return its folder."""
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("--hub needs huggingface_hub: pip install huggingface_hub") from e
  try:
    return snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.json"])
  except Exception as e:  # network errors come in many types
    raise ValueError(f"--hub {repo_id}: download failed ({type(e).__name__}: {e})") from e
