"""Finding and loading the model for inference.

``load_model(weights)`` accepts:

- an **official checkpoint directory**, laid out as the released hub checkpoints are:
  ``model.safetensors`` plus ``config.json`` whose ``model_name`` names the preset (e.g.
  ``"da3-large"``); ``preset`` (``--model``) names it when ``config.json`` does not, otherwise it
  is inferred from the tensor shapes;
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
               overrides: dict[str, Any] | None = None) -> tuple[nnx.Module, dict[str, Any]]:
  """``(model, info)`` for a weights path (see the module docstring); ``info`` describes it.

  ``overrides`` are runtime fields of the DA3 config (``dtype`` as a string such as
  ``"bfloat16"``, ``attn_impl``, ``head_chunk``).

  Raises:
    FileNotFoundError for a missing path; ValueError for a path that is no checkpoint, or a
    ``preset`` that contradicts a geojax checkpoint.
  """
  from geojax.models import da3, registry
  path = os.path.abspath(os.fspath(weights))
  overrides = dict(overrides or {})
  if not os.path.exists(path):
    raise FileNotFoundError(f"--weights {weights}: no such file or directory")
  if preset is not None and preset not in da3.PRESET_NAMES:
    raise ValueError(f"--model {preset!r} is not a DA3 preset; expected one of {da3.PRESET_NAMES}")
  if os.path.isdir(path) and not _is_geojax_checkpoint(path) and _is_geojax_checkpoint(
      os.path.join(path, "model")):
    path = os.path.join(path, "model")  # a training workdir
  if os.path.isdir(path) and _is_geojax_checkpoint(path):
    model, _, config = registry.load_checkpoint(path, family="da3", what="--weights",
                                                overrides=overrides)
    if preset is not None and config.get("preset") != preset:
      raise ValueError(f"--weights {weights} holds a {config.get('preset')!r} model but --model "
                       f"says {preset!r}")
    return model, {"weights": path, "format": "geojax", "preset": config.get("preset")}
  is_dir = os.path.isdir(path)
  has_st = (any(f.endswith(".safetensors") for f in os.listdir(path)) if is_dir
            else path.endswith(".safetensors"))
  if not has_st:
    raise ValueError(f"--weights {weights}: not a checkpoint (expected an official directory with "
                     f"model.safetensors and config.json, a .safetensors file, or a geojax "
                     f"checkpoint with model/ and state/)")
  from geojax.convert.da3 import load_official
  if preset is None and is_dir and os.path.isfile(os.path.join(path, "config.json")):
    try:
      with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"{os.path.join(path, 'config.json')}: cannot parse JSON: {e}") from e
    name = cfg.get("model_name") if isinstance(cfg, dict) else None
    if isinstance(name, str) and name in da3.PRESET_NAMES:
      preset = name
  if isinstance(overrides.get("dtype"), str):
    overrides["dtype"] = jnp.dtype(overrides["dtype"])
  model = load_official(path, preset, **overrides)
  return model, {"weights": path, "format": "official",
                 "preset": preset or _preset_of(model)}


def _preset_of(model: nnx.Module) -> str | None:
  from geojax.models import da3
  cfg = getattr(model, "cfg", None)
  for name, p in da3.PRESETS.items():
    if cfg is not None and (p.vit, p.head, p.alt_start) == (cfg.vit, cfg.head, cfg.alt_start):
      return name
  return None


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
