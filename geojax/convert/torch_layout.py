"""Shared machinery of the official-PyTorch <-> geojax weight converters (DAGE, Pi3).

A converter supplies ``rules``: ``(regex, replacement)`` pairs that turn a geojax parameter path
(dotted, leaf renamed ``kernel``/``scale`` -> ``weight``) into the official key, with ``{i}``
standing for the layer index of a scanned :class:`~geojax.nn.stack.LayerStack`. Layout changes:
Linear ``(out, in)`` -> ``(in, out)``; Conv ``OIHW`` -> ``HWIO``; transposed convs (a parent
module named ``up``, ``resize0`` or ``resize1``) ``(in, out, kh, kw)`` -> ``(in, kh, kw, out)``; stacked layers along a
leading axis. Only safetensors is read; pickles go through ``geojax convert`` once.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

Rules = Sequence[tuple[str, Any]]


def official_key(parts: tuple[str, ...], rules: Rules) -> str:
  p = ".".join(parts[:-1] + (("weight",) if parts[-1] in ("kernel", "scale") else parts[-1:]))
  for pat, rep in rules:
    if re.match(pat, p):
      return re.sub(pat, rep, p, count=1)
  return p


def _kind(parts: tuple[str, ...], ndim: int) -> str:
  if parts[-1] != "kernel":
    return "plain"
  if ndim == 2:
    return "linear"
  if len(parts) >= 2 and parts[-2] in ("up", "resize0", "resize1"):  # MoGe / DPT upsamplers
    return "convT"
  return "conv"


def to_jax(a: np.ndarray, kind: str) -> np.ndarray:
  return {"linear": lambda x: x.T, "conv": lambda x: x.transpose(2, 3, 1, 0),
          "convT": lambda x: x.transpose(0, 2, 3, 1)}.get(kind, lambda x: x)(a)


def to_torch(a: np.ndarray, kind: str) -> np.ndarray:
  return {"linear": lambda x: x.T, "conv": lambda x: x.transpose(3, 2, 0, 1),
          "convT": lambda x: x.transpose(0, 3, 1, 2)}.get(kind, lambda x: x)(a)


def entries(model: nnx.Module, rules: Rules):
  """``(path, value, shape, official keys, kind, stacked)`` for every parameter of ``model``."""
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    parts = tuple(str(p) for p in path)
    value = var.get_value() if hasattr(var, "get_value") else var
    shape = tuple(value.shape)
    stacked = "layers" in parts  # LayerStack parameters
    key = official_key(parts, rules)
    if stacked and "{i}" not in key:
      raise AssertionError(f"no official name rule for stacked parameter {'.'.join(parts)}")
    kind = _kind(parts, len(shape) - (1 if stacked else 0))
    keys = [key.replace("{i}", str(i)) for i in range(shape[0])] if stacked else [key]
    yield path, value, shape, keys, kind, stacked


def load_state_dict(build_abstract: Callable[[], nnx.Module], state_dict: Mapping[str, Any],
                    rules: Rules, *, name: str,
                    buffers: Mapping[str, np.ndarray] | None = None,
                    strict_unexpected: bool = False) -> nnx.Module:
  """Fill the model ``build_abstract()`` (under ``nnx.eval_shape``) from an official state dict.

  Missing tensors or wrong shapes raise ``ValueError`` naming the keys; ``buffers`` (official
  key -> expected constant) are checked when present; unknown keys are listed in a warning
  (an error with ``strict_unexpected=True``). ``name`` is the model's name in messages."""
  sd = dict(state_dict)
  model_abs = nnx.eval_shape(build_abstract)
  graphdef, state = nnx.split(model_abs)
  pure = nnx.to_pure_dict(state)
  used, missing = set(), []
  for path, _, shape, keys, kind, stacked in entries(model_abs, rules):
    if any(k not in sd for k in keys):
      missing.extend(k for k in keys if k not in sd)
      continue
    used.update(keys)
    arrays = [to_jax(np.asarray(sd[k], np.float32), kind) for k in keys]
    value = np.stack(arrays) if stacked else arrays[0]
    if tuple(value.shape) != shape:
      raise ValueError(f"checkpoint tensor {keys[0]} has shape {tuple(np.shape(sd[keys[0]]))}, "
                       f"which does not fit this {name} configuration (expected {shape} in "
                       "geojax layout); is it for another configuration or model?")
    node = pure
    for p in path[:-1]:
      node = node[p]
    node[path[-1]] = jnp.asarray(value)
  if missing:
    more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
    raise ValueError(f"checkpoint does not match the {name} configuration: {len(missing)} "
                     f"tensors missing, e.g. {missing[:10]}{more}")
  for key, want in (buffers or {}).items():
    if key in sd:
      used.add(key)
      if not np.allclose(np.asarray(sd[key]).reshape(-1), want, atol=1e-6):
        raise ValueError(f"checkpoint buffer {key} is {np.asarray(sd[key]).reshape(-1)}, not "
                         f"the constants {want} geojax uses")
  unexpected = sorted(set(sd) - used)
  if unexpected:
    msg = f"checkpoint has {len(unexpected)} keys {name} does not use: {unexpected[:20]}"
    if strict_unexpected:
      raise ValueError(msg)
    warnings.warn(msg, stacklevel=3)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def iter_state_dict(model: nnx.Module, rules: Rules,
                    buffers: Mapping[str, np.ndarray] | None = None
                    ) -> Iterator[tuple[str, np.ndarray]]:
  """``(official key, float32 array)`` pairs, one tensor at a time, then the ``buffers``
  (written as ``(1, 3, 1, 1)``, the official image-normalisation layout)."""
  for _, value, _, keys, kind, stacked in entries(model, rules):
    value = np.asarray(value)
    for i, k in enumerate(keys):
      yield k, np.ascontiguousarray(to_torch(value[i] if stacked else value, kind))
  for key, v in (buffers or {}).items():
    yield key, np.asarray(v, np.float32).reshape(1, 3, 1, 1).copy()


def checkpoint_tensors(checkpoint: Any, name: str) -> tuple[dict[str, Any], dict | None]:
  """A whole official checkpoint (as ``torch.load(weights_only=True)`` gives it) ->
  ``(tensors, config)``: the weights under ``ema_model`` (preferred, as the official
  ``from_pretrained`` does), ``model`` or the mapping itself, and the constructor config stored
  under ``model_config`` / ``config`` (or ``None``)."""
  if not isinstance(checkpoint, dict):
    raise ValueError(f"a {name} checkpoint must be a mapping (a state dict, or a training "
                     "checkpoint with ema_model / model)")
  sd = checkpoint
  for key in ("ema_model", "model"):
    if isinstance(checkpoint.get(key), dict):
      sd = checkpoint[key]
      break
  tensors = {k: v for k, v in sd.items() if hasattr(v, "shape") and hasattr(v, "dtype")}
  if not tensors:
    raise ValueError(f"the {name} checkpoint holds no tensors")
  config = next((checkpoint[k] for k in ("model_config", "config")
                 if isinstance(checkpoint.get(k), dict)), None)
  return tensors, config


def _bad_safetensors(path: str, e: Exception) -> ValueError:
  return ValueError(f"{path}: not a readable safetensors file (corrupt, truncated or another "
                    f"format): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def load_file(path: str) -> dict[str, np.ndarray]:
  """All tensors of one ``.safetensors`` file as NumPy arrays; a corrupt or truncated file is a
  ``ValueError`` naming it."""
  from safetensors.numpy import load_file as _load
  try:
    return _load(path)
  except OSError as e:
    if not os.path.isfile(path):
      raise
    raise _bad_safetensors(path, e) from None
  except Exception as e:  # safetensors' SafetensorError (header JSON, sizes), numpy's ValueError
    raise _bad_safetensors(path, e) from None


def read_safetensors(path: str, family: str) -> tuple[dict[str, np.ndarray], dict | None]:
  """A ``.safetensors`` file, or a directory of them with an optional ``config.json``."""
  if os.path.isdir(path):
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
      raise ValueError(f"{path}: no .safetensors file (convert official .pt checkpoints with "
                       f"`geojax convert --family {family}`)")
    sd = {}
    for f in files:
      sd.update(load_file(os.path.join(path, f)))
    cfg_path = os.path.join(path, "config.json")
    config = None
    if os.path.exists(cfg_path):
      try:
        with open(cfg_path, encoding="utf-8") as fh:
          config = json.load(fh)
      except (OSError, ValueError) as e:
        raise ValueError(f"{cfg_path}: cannot parse JSON: {e}") from None
    return sd, config
  if os.path.isfile(path):
    if not path.endswith(".safetensors"):
      raise ValueError(f"{path}: only safetensors checkpoints are read (nothing is unpickled); "
                       f"convert it with `geojax convert --family {family} SRC.pt DST`")
    return load_file(path), None
  raise ValueError(f"{path}: no such {family} checkpoint file or directory")


def safetensors_keys(path: str) -> list[set[str]]:
  """The key sets of the safetensors file ``path`` or of those in directory ``path``."""
  from safetensors import safe_open
  path = os.fspath(path)
  files = ([os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
           if os.path.isdir(path) else [path] if path.endswith(".safetensors") else [])
  out = []
  for f in files:
    try:
      with safe_open(f, "np") as h:
        out.append(set(h.keys()))
    except Exception as e:  # SafetensorError: a broken header
      raise _bad_safetensors(f, e) from None
  return out
