"""Official DA3 checkpoints <-> geojax :class:`~geojax.models.da3.DA3`.

Official layout: a directory with ``config.json`` and ``model.safetensors`` whose keys start
with ``model.`` (nested checkpoints: ``model.da3.`` and ``model.da3_metric.``). Converted
faithfully, with these layout changes:

* Linear ``(out, in)`` -> ``(in, out)``; Conv ``OIHW`` -> ``HWIO``; the stride = kernel
  transposed convs ``(in, out, k, k)`` -> ``(in, k, k, out)``;
* per-block tensors are stacked into one array per layer group (blocks without / with
  QK-norm), the layout :class:`~geojax.nn.stack.LayerStack` scans over;
* the DualDPT ray-head LayerNorm that the official module ties across four pyramid levels is
  stored once (``head.aux_norm``); reading accepts any of the four copies, writing emits all four
  as ``state_dict()`` does.

Only safetensors is read or written; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geojax.models import da3 as da3_lib

_PREFIX = "model."


def _torch_leaf(name: str, is_norm: bool) -> str:
  if name == "kernel":
    return "weight"
  if name == "scale":
    return "weight"
  return name


def _rename(parts: list[str], cfg: da3_lib.DA3Config) -> tuple[str, str] | list[tuple[str, str]]:
  """geojax path (without stack index) -> torch key; '{i}' marks a stacked layer index."""
  p = ".".join(parts)
  subs = [
      (r"^backbone\.camera_token$", "backbone.pretrained.camera_token"),
      (r"^backbone\.vit\.(cls_token|pos_embed)$", r"backbone.pretrained.\1"),
      (r"^backbone\.vit\.norm\.", "backbone.pretrained.norm."),
      (r"^backbone\.vit\.patch_embed\.proj\.", "backbone.pretrained.patch_embed.proj."),
      (r"^backbone\.vit\.stacks\.(\d+)\.layers\.", r"backbone.pretrained.blocks.{i\1}."),
      (r"^cam_enc\.trunk\.layers\.", "cam_enc.trunk.{i}."),
      (r"^cam_dec\.backbone\.1\.", "cam_dec.backbone.2."),
      (r"^cam_dec\.fc_fov\.", "cam_dec.fc_fov.0."),
      (r"^(head|gs_head)\.reassemble\.norm\.", r"\1.norm."),
      (r"^(head|gs_head)\.reassemble\.projects\.", r"\1.projects."),
      (r"^(head|gs_head)\.reassemble\.resize(\d)\.", r"\1.resize_layers.\2."),
      (r"^(head|gs_head)\.reassemble\.layer_rn\.(\d)\.", lambda m: f"{m[1]}.scratch.layer{int(m[2]) + 1}_rn."),
      (r"^(head|gs_head)\.fusion\.(refinenet\d)\.", r"\1.scratch.\2."),
      (r"^(head|gs_head)\.fusion_aux\.(refinenet\d)\.", r"\1.scratch.\2_aux."),
      (r"^(head|gs_head)\.(output_conv1|output_conv1_aux)\.", r"\1.scratch.\2."),
      (r"^(head|gs_head)\.(output_conv2|sky_output_conv2)\.conv0\.", r"\1.scratch.\2.0."),
      (r"^(head|gs_head)\.(output_conv2|sky_output_conv2)\.conv2\.", r"\1.scratch.\2.2."),
      (r"^head\.output_conv2_aux\.(\d)\.conv0\.", r"head.scratch.output_conv2_aux.\1.0."),
      (r"^head\.output_conv2_aux\.(\d)\.conv2\.", r"head.scratch.output_conv2_aux.\1.5."),
      (r"^gs_head\.images_merger\.(\d)\.", lambda m: f"gs_head.images_merger.{2 * int(m[1])}."),
  ]
  if p.startswith("head.aux_norm."):
    leaf = _torch_leaf(parts[-1], True)
    return [(f"head.scratch.output_conv2_aux.{lv}.2.{leaf}", "") for lv in range(4)]
  for pat, rep in subs:
    if re.match(pat, p):
      p = re.sub(pat, rep, p, count=1)
      break
  head, _, leaf = p.rpartition(".")
  if leaf in ("kernel", "scale"):
    p = f"{head}.weight"
  return p


def _kind(path: tuple[str, ...], ndim_unstacked: int) -> str:
  leaf = path[-1]
  if leaf != "kernel":
    return "plain"
  if ndim_unstacked == 2:
    return "linear"
  if path[-2] in ("resize0", "resize1"):
    return "convT"
  return "conv"


def _to_jax_layout(a: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return a.T
  if kind == "conv":
    return a.transpose(2, 3, 1, 0)
  if kind == "convT":
    return a.transpose(0, 2, 3, 1)
  return a


def _to_torch_layout(a: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return a.T
  if kind == "conv":
    return a.transpose(3, 2, 0, 1)
  if kind == "convT":
    return a.transpose(0, 3, 1, 2)
  return a


def _entries(model_abs: nnx.Module, cfg: da3_lib.DA3Config):
  """Yield ``(path, var, torch_keys_per_layer, kind, stacked_starts)`` for every parameter."""
  for path, var in nnx.to_flat_state(nnx.state(model_abs, nnx.Param)):
    parts = [str(p) for p in path]
    shape = var.shape if hasattr(var, "shape") else var.get_value().shape
    stacked = ".layers." in ".".join(parts)
    nd = len(shape) - (1 if stacked else 0)
    kind = _kind(tuple(parts), nd)
    key = _rename(parts, cfg)
    if isinstance(key, list):
      keys = [[k for k, _ in key]]  # one tensor, several tied torch keys
    elif stacked:
      m = re.search(r"\{i(\d*)\}", key)
      group = int(m[1]) if m[1] else 0
      start = 0
      if parts[0] == "backbone":
        start = sum(g for g, _ in _groups(cfg)[:group])
      keys = [[key.replace(m[0], str(start + l))] for l in range(shape[0])]
    else:
      keys = [[key]]
    yield path, var, shape, keys, kind, stacked


def _groups(cfg):
  d, a = cfg.depth, cfg.alt_start
  return ((a, False), (d - a, True)) if a > 0 else ((d, False),)


def _submodels(preset: str):
  if preset in da3_lib.NESTED:
    any_name, met_name = da3_lib.NESTED[preset]
    return [("da3.", da3_lib.get_config(any_name)), ("da3_metric.", da3_lib.get_config(met_name))]
  return [("", da3_lib.get_config(preset))]


def _abstract(preset: str, **overrides):
  return nnx.eval_shape(lambda: da3_lib.DA3.from_preset(preset, rngs=nnx.Rngs(0), **overrides))


def _strip(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  if any(k.startswith(_PREFIX) for k in state_dict):
    return {k[len(_PREFIX):] if k.startswith(_PREFIX) else k: v for k, v in state_dict.items()}
  return dict(state_dict)


def from_torch_state_dict(state_dict: Mapping[str, np.ndarray], preset: str, *,
                          strict_unexpected: bool = False, **overrides):
  """Build a DA3 model (``preset``) from an official state dict of NumPy arrays.

  Keys may carry the ``model.`` prefix. Missing keys or wrong shapes raise ``ValueError``;
  unknown extra keys are listed in a warning (an error with ``strict_unexpected=True``).
  ``overrides`` are runtime config fields (``attn_impl``, ``remat``, ``scan``, ``dtype``).
  """
  if preset not in da3_lib.PRESET_NAMES:
    raise ValueError(f"unknown DA3 preset {preset!r}; expected one of {da3_lib.PRESET_NAMES}")
  sd = _strip(state_dict)
  model_abs = _abstract(preset, **overrides)
  graphdef, state = nnx.split(model_abs)
  pure = nnx.to_pure_dict(state)
  used, missing = set(), []
  for prefix, cfg in _submodels(preset):
    sub = model_abs if not prefix else getattr(model_abs, prefix[:-1])
    for path, _, shape, keys, kind, stacked in _entries(sub, cfg):
      arrays = []
      for alternatives in keys:
        found = [prefix + k for k in alternatives if prefix + k in sd]
        if not found:
          missing.append(prefix + alternatives[0])
          continue
        used.update(prefix + k for k in alternatives if prefix + k in sd)
        arrays.append(_to_jax_layout(np.asarray(sd[found[0]]), kind))
      if len(arrays) != len(keys):
        continue
      value = np.stack(arrays) if stacked else arrays[0]
      if tuple(value.shape) != tuple(shape):
        raise ValueError(f"checkpoint tensor {prefix + keys[0][0]} has shape "
                         f"{tuple(np.asarray(sd[prefix + keys[0][0]]).shape)}, which does not "
                         f"fit preset {preset!r} (expected {tuple(shape)} in geojax layout "
                         f"{value.shape}); is this checkpoint for another preset?")
      node = pure
      full = ((prefix[:-1],) if prefix else ()) + tuple(path)
      for p in full[:-1]:
        node = node[p]
      node[full[-1]] = jnp.asarray(value, dtype=jnp.float32)
  if missing:
    more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
    raise ValueError(f"checkpoint does not match preset {preset!r}: {len(missing)} tensors "
                     f"missing, e.g. {missing[:10]}{more}")
  unexpected = sorted(set(sd) - used)
  if unexpected:
    msg = f"checkpoint has {len(unexpected)} keys that {preset!r} does not use: {unexpected[:20]}"
    if strict_unexpected:
      raise ValueError(msg)
    warnings.warn(msg, stacklevel=2)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def iter_torch_state_dict(model):
  """``(key, array)`` pairs of :func:`to_torch_state_dict`, one parameter at a time (a tensor
  stored under several official names comes once per name, as the same array), so that a
  giant model can be exported or checked without a second copy of all its weights."""
  subs = ([("da3.", model.da3), ("da3_metric.", model.da3_metric)]
          if isinstance(model, da3_lib.NestedDA3) else [("", model)])
  for prefix, sub in subs:
    for path, var, shape, keys, kind, stacked in _entries(sub, sub.cfg):
      value = np.asarray(var.get_value() if hasattr(var, "get_value") else var)
      for l, alternatives in enumerate(keys):
        a = value[l] if stacked else value
        a = np.ascontiguousarray(_to_torch_layout(a, kind))
        for k in alternatives:
          yield prefix + k, a


def to_torch_state_dict(model) -> dict[str, np.ndarray]:
  """geojax DA3/NestedDA3 -> official ``state_dict()`` layout (NumPy float32, no prefix)."""
  return dict(iter_torch_state_dict(model))


def infer_preset(state_dict: Mapping[str, np.ndarray], config: Mapping | None = None) -> str:
  """Preset name from a checkpoint's ``config.json`` (if it names one) or its tensor shapes."""
  if config:
    text = json.dumps(config).lower()
    for name in sorted(da3_lib.PRESET_NAMES, key=len, reverse=True):
      if name in text or name.replace("da3", "da3-").replace("--", "-") in text:
        return name
  sd = _strip(state_dict)
  if any(k.startswith("da3_metric.") for k in sd):
    return "da3nested-giant-large"
  cls = sd.get("backbone.pretrained.cls_token")
  if cls is None:
    raise ValueError("not a DA3 checkpoint: no backbone.pretrained.cls_token tensor")
  dim = int(np.shape(cls)[-1])
  if "backbone.pretrained.camera_token" not in sd:
    return "da3metric-large"  # metric and mono share one architecture
  by_dim = {384: "da3-small", 768: "da3-base", 1024: "da3-large", 1536: "da3-giant"}
  if dim not in by_dim:
    raise ValueError(f"no DA3 preset has embedding width {dim}")
  return by_dim[dim]


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from geojax.convert.torch_layout import load_file
  return load_file(path)


def load_official(path: str | os.PathLike, preset: str | None = None, **overrides):
  """Load an official checkpoint: a directory (``model.safetensors`` [+ ``config.json``]) or a
  ``.safetensors`` file. ``preset=None`` infers it from ``config.json`` or the tensor shapes."""
  path = os.fspath(path)
  config = None
  if os.path.isdir(path):
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
      raise ValueError(f"{path}: no .safetensors file found (expected model.safetensors)")
    cfg_path = os.path.join(path, "config.json")
    if os.path.exists(cfg_path):
      with open(cfg_path) as f:
        config = json.load(f)
    sd = {}
    for f in files:
      sd.update(_read_safetensors(os.path.join(path, f)))
  elif os.path.isfile(path):
    if not path.endswith(".safetensors"):
      raise ValueError(f"{path}: only safetensors checkpoints are read (no pickle); convert "
                       f".pth/.bin files with the official tools first")
    sd = _read_safetensors(path)
  else:
    raise ValueError(f"{path}: no such checkpoint file or directory")
  preset = preset or infer_preset(sd, config)
  return from_torch_state_dict(sd, preset, **overrides)


def save_official(model, path: str | os.PathLike, *, overwrite: bool = False) -> None:
  """Write ``model`` as an official-layout ``model.safetensors`` (keys prefixed ``model.``).

  The tied ray-head LayerNorm is written once (as ``...output_conv2_aux.0.2``), like the
  released checkpoints. Refuses to replace an existing file unless ``overwrite=True``.
  """
  from safetensors.numpy import save_file
  path = os.fspath(path)
  if os.path.isdir(path) or not path.endswith(".safetensors"):
    os.makedirs(path, exist_ok=True)
    path = os.path.join(path, "model.safetensors")
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  sd = to_torch_state_dict(model)
  sd = {k: v for k, v in sd.items()
        if not re.search(r"output_conv2_aux\.[123]\.2\.", k)}
  tmp = path + ".tmp"
  save_file({_PREFIX + k: v for k, v in sd.items()}, tmp)
  os.replace(tmp, path)
