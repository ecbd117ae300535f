"""Official DAGE checkpoints <-> geojax :class:`~geojax.models.dage.DAGE`.

Official layout: the ``state_dict()`` of ``dage.models.dage.DAGE`` (keys such as
``decoder.3.attn.q_norm.weight``, ``hr_encoder.backbone.blocks.2.ls1.gamma``,
``adapter.blocks.0.cross_attn.k_proj.weight``, ``hr_neck.resamplers.0.0.weight``), in a
``.safetensors`` file or a directory holding one (with an optional ``config.json``: the
constructor config, or a reference run's description as in the parity fixture). Layout changes:
Linear ``(out, in)`` -> ``(in, out)``; Conv ``OIHW`` -> ``HWIO``; the stride-2 transposed convs
``(in, out, 2, 2)`` -> ``(in, 2, 2, out)``; per-block tensors stacked along a layer axis for
the scanned stacks. The four ImageNet buffers (``image_mean``/``image_std``, twice) are
checked on reading and written back on export.

Only safetensors is read; official ``.pt`` pickles go through ``geojax convert --family dage``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from typing import Any, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from geojax.models import dage as dage_lib
from geojax.nn.layers import IMAGENET_MEAN, IMAGENET_STD

_BUFFERS = ("image_mean", "image_std", "hr_encoder.image_mean", "hr_encoder.image_std")

# geojax dotted path (leaf renamed to weight/bias) -> official key; "{i}" = stacked layer index.
_RULES = [
    (r"^(encoder|hr_encoder\.backbone)\.stacks\.0\.layers\.", r"\1.blocks.{i}."),
    (r"^decoder\.blocks\.layers\.", "decoder.{i}."),
    (r"^(point_decoder|camera_decoder|adapter)\.blocks\.layers\.", r"\1.blocks.{i}."),
    (r"^camera_head\.more_mlps\.(\d+)\.", lambda m: f"camera_head.more_mlps.{2 * int(m[1])}."),
    (r"^token_splitter\.proj\.(\d+)\.", lambda m: f"token_splitter.proj.{2 * int(m[1])}."),
    (r"^hr_scale_head\.linears\.(\d+)\.", lambda m: f"hr_scale_head.{2 * int(m[1])}."),
    (r"^(hr_\w+)\.res_blocks\.(\d+)\.(\d+)\.conv1\.conv\.", r"\1.res_blocks.\2.\3.layers.2."),
    (r"^(hr_\w+)\.res_blocks\.(\d+)\.(\d+)\.conv2\.conv\.", r"\1.res_blocks.\2.\3.layers.5."),
    (r"^(hr_\w+)\.resamplers\.(\d+)\.up\.", r"\1.resamplers.\2.0."),
    (r"^(hr_\w+)\.resamplers\.(\d+)\.conv\.conv\.", r"\1.resamplers.\2.1."),
]


def _official_key(parts: tuple[str, ...]) -> str:
  p = ".".join(parts[:-1] + (("weight",) if parts[-1] in ("kernel", "scale") else parts[-1:]))
  for pat, rep in _RULES:
    if re.match(pat, p):
      return re.sub(pat, rep, p, count=1)
  return p


def _kind(parts: tuple[str, ...], ndim: int) -> str:
  if parts[-1] != "kernel":
    return "plain"
  if ndim == 2:
    return "linear"
  if len(parts) >= 2 and parts[-2] == "up":
    return "convT"
  return "conv"


def _to_jax(a: np.ndarray, kind: str) -> np.ndarray:
  return {"linear": lambda x: x.T, "conv": lambda x: x.transpose(2, 3, 1, 0),
          "convT": lambda x: x.transpose(0, 2, 3, 1)}.get(kind, lambda x: x)(a)


def _to_torch(a: np.ndarray, kind: str) -> np.ndarray:
  return {"linear": lambda x: x.T, "conv": lambda x: x.transpose(3, 2, 0, 1),
          "convT": lambda x: x.transpose(0, 3, 1, 2)}.get(kind, lambda x: x)(a)


def _entries(model: nnx.Module):
  """``(path, value_or_shape, keys, kind, stacked)`` for every parameter of ``model``."""
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    parts = tuple(str(p) for p in path)
    value = var.get_value() if hasattr(var, "get_value") else var
    shape = tuple(value.shape)
    stacked = "layers" in parts  # LayerStack parameters
    key = _official_key(parts)
    if stacked and "{i}" not in key:
      raise AssertionError(f"no official name rule for stacked parameter {'.'.join(parts)}")
    kind = _kind(parts, len(shape) - (1 if stacked else 0))
    keys = [key.replace("{i}", str(i)) for i in range(shape[0])] if stacked else [key]
    yield path, value, shape, keys, kind, stacked


def config_from_reference(reference: Mapping[str, Any], **overrides) -> dage_lib.DAGEConfig:
  """The :class:`~geojax.models.dage.DAGEConfig` of a reference run, from its parsed
  ``config.json`` (the layout of ``shared/fixtures/dage/config.json``: ``constructor_kwargs``
  and, for reduced sizes, ``hardcoded_overrides_applied_by_driver``); a plain official
  constructor config (the ``model_config`` of a checkpoint) works too. Unset parts keep the
  released sizes. ``overrides``: runtime fields (``attn_impl``, ``scan``, ...)."""
  kw = dict(reference.get("constructor_kwargs", reference))
  hard = reference.get("hardcoded_overrides_applied_by_driver", {})
  f: dict[str, Any] = {}
  enc = hard.get("lr_encoder_arch")
  if enc:
    f.update(lr_dim=enc["embed_dim"], lr_depth=enc["depth"], lr_heads=enc["num_heads"])
  dec = hard.get("decoder")
  if dec:
    f.update(dec_dim=dec["dim"], dec_depth=dec["depth"], dec_heads=dec["num_heads"])
  if "num_decoder_register_tokens" in hard:
    f["num_registers"] = hard["num_decoder_register_tokens"]
  for name, pre in (("camera_decoder", "cam"), ("point_decoder", "point")):
    d = hard.get(name)
    if d:
      f.update({f"{pre}_dim": d["dec_embed_dim"], f"{pre}_depth": d["depth"],
                f"{pre}_heads": d["dec_num_heads"], f"{pre}_out": d["out_dim"]})
  hb = hard.get("hr_backbone_arch")
  if hb:
    f.update(hr_dim=hb["embed_dim"], hr_depth=hb["depth"], hr_heads=hb["num_heads"])
  cls = hard.get("cls_decoder")
  if cls:
    f.update(cls_dim=cls["dec_embed_dim"], cls_depth=cls["depth"], cls_heads=cls["dec_num_heads"])
  if "token_splitter" in hard:
    f["token_splitter"] = True
  he = kw.get("hr_encoder") or {}
  if "intermediate_layers" in he:
    f["hr_taps"] = tuple(he["intermediate_layers"])
  if "dim_out" in he:
    f["hr_out"] = he["dim_out"]
  neck = kw.get("hr_neck") or {}
  if neck:
    f.update(neck_widths=tuple(neck["dim_res_blocks"]),
             neck_res_blocks=tuple(neck["num_res_blocks"]), resamplers=tuple(neck["resamplers"]))
    for norm in ("res_block_in_norm", "res_block_hidden_norm"):
      if neck.get(norm, "none") != "none":
        raise ValueError(f"hr_neck.{norm}={neck[norm]!r}: only MoGe-2's norm-free ConvStack "
                         "is supported")
  ph = kw.get("hr_points_head") or {}
  if ph:
    f["head_res_blocks"] = tuple(ph["num_res_blocks"])
  sh = kw.get("hr_scale_head") or {}
  if sh:
    f["scale_hidden"] = tuple(sh["dims"][1:-1])
  if kw.get("remap_output", "exp") != "exp":
    raise ValueError(f"remap_output={kw['remap_output']!r}: only the shipped 'exp' is supported")
  ad = kw.get("adapter")
  if ad is None:  # the constructor's fallback: depth 5, no RoPE
    f.update(adapter_depth=5, adapter_rope=False, adapter_rope_interp=False)
  else:
    if ad.get("model_name", "ContextTransformerDecoder") != "ContextTransformerDecoder":
      raise ValueError(f"adapter {ad['model_name']!r} is an ablation class geojax does not build")
    if ad.get("use_pe") or ad.get("use_cls_token") or ad.get("norm_input"):
      raise ValueError("adapter use_pe / use_cls_token / norm_input are ablations geojax does "
                       "not build")
    if not ad.get("cross_first", False):
      raise ValueError("only the shipped cross-first adapter is supported")
    f.update(adapter_dim=ad["dec_embed_dim"], adapter_depth=ad["depth"],
             adapter_heads=ad["dec_num_heads"], adapter_rope=bool(ad.get("use_rope", False)),
             adapter_rope_interp=bool(ad.get("use_rope_interpolated", False)))
  f.update(overrides)
  return dataclasses.replace(dage_lib.DAGEConfig(), **f)


def _abstract(cfg: dage_lib.DAGEConfig):
  return nnx.eval_shape(lambda: dage_lib.DAGE.from_config(cfg, rngs=nnx.Rngs(0)))


def from_torch_state_dict(state_dict: Mapping[str, np.ndarray],
                          config: dage_lib.DAGEConfig | str = "dage", *,
                          strict_unexpected: bool = False) -> dage_lib.DAGE:
  """Build a :class:`DAGE` from an official state dict (NumPy arrays, official key names).

  ``config``: a :class:`DAGEConfig` (e.g. from :func:`config_from_reference`) or a preset
  name. Missing tensors or wrong shapes raise ``ValueError``; unknown keys are listed in a
  warning (an error with ``strict_unexpected=True``).
  """
  cfg = dage_lib.get_config(config) if isinstance(config, str) else config
  sd = dict(state_dict)
  model_abs = _abstract(cfg)
  graphdef, state = nnx.split(model_abs)
  pure = nnx.to_pure_dict(state)
  used, missing = set(), []
  for path, _, shape, keys, kind, stacked in _entries(model_abs):
    if any(k not in sd for k in keys):
      missing.extend(k for k in keys if k not in sd)
      continue
    used.update(keys)
    arrays = [_to_jax(np.asarray(sd[k], np.float32), kind) for k in keys]
    value = np.stack(arrays) if stacked else arrays[0]
    if tuple(value.shape) != shape:
      raise ValueError(f"checkpoint tensor {keys[0]} has shape {tuple(np.shape(sd[keys[0]]))}, "
                       f"which does not fit this DAGE configuration (expected {shape} in "
                       "geojax layout); is it for another configuration or model?")
    node = pure
    for p in path[:-1]:
      node = node[p]
    node[path[-1]] = jnp.asarray(value)
  if missing:
    more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
    raise ValueError(f"checkpoint does not match the DAGE configuration: {len(missing)} tensors "
                     f"missing, e.g. {missing[:10]}{more}")
  for name, want in zip(_BUFFERS, (IMAGENET_MEAN, IMAGENET_STD) * 2):
    if name in sd:
      used.add(name)
      if not np.allclose(np.asarray(sd[name]).reshape(-1), want, atol=1e-6):
        raise ValueError(f"checkpoint buffer {name} is {np.asarray(sd[name]).reshape(-1)}, not "
                         f"the ImageNet constants {want} geojax uses")
  unexpected = sorted(set(sd) - used)
  if unexpected:
    msg = f"checkpoint has {len(unexpected)} keys DAGE does not use: {unexpected[:20]}"
    if strict_unexpected:
      raise ValueError(msg)
    warnings.warn(msg, stacklevel=2)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def iter_torch_state_dict(model: dage_lib.DAGE) -> Iterator[tuple[str, np.ndarray]]:
  """``(official key, float32 array)`` pairs, one tensor at a time, buffers included."""
  for _, value, _, keys, kind, stacked in _entries(model):
    value = np.asarray(value)
    for i, k in enumerate(keys):
      yield k, np.ascontiguousarray(_to_torch(value[i] if stacked else value, kind))
  for name, v in zip(_BUFFERS, (IMAGENET_MEAN, IMAGENET_STD) * 2):
    yield name, v.reshape(1, 3, 1, 1).copy()


def to_torch_state_dict(model: dage_lib.DAGE) -> dict[str, np.ndarray]:
  """geojax DAGE -> the official ``state_dict()`` (NumPy float32)."""
  return dict(iter_torch_state_dict(model))


def _read_dir(path: str) -> tuple[dict[str, np.ndarray], dict | None]:
  from safetensors.numpy import load_file
  if os.path.isdir(path):
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
      raise ValueError(f"{path}: no .safetensors file (convert official .pt checkpoints with "
                       "`geojax convert --family dage`)")
    sd = {}
    for f in files:
      sd.update(load_file(os.path.join(path, f)))
    cfg_path = os.path.join(path, "config.json")
    config = json.load(open(cfg_path)) if os.path.exists(cfg_path) else None
    return sd, config
  if os.path.isfile(path):
    if not path.endswith(".safetensors"):
      raise ValueError(f"{path}: only safetensors checkpoints are read (nothing is unpickled); "
                       "convert it with `geojax convert --family dage SRC.pt DST`")
    return load_file(path), None
  raise ValueError(f"{path}: no such DAGE checkpoint file or directory")


def load_official(path: str | os.PathLike, config: dage_lib.DAGEConfig | None = None,
                  **overrides) -> dage_lib.DAGE:
  """Official DAGE weights from a ``.safetensors`` file or a directory (``config.json``, if
  present, gives the configuration through :func:`config_from_reference`; otherwise the
  released ``dage`` configuration)."""
  sd, ref = _read_dir(os.fspath(path))
  if config is None:
    config = config_from_reference(ref, **overrides) if ref else dage_lib.get_config(
        "dage", **overrides)
  elif overrides:
    config = dataclasses.replace(config, **overrides)
  return from_torch_state_dict(sd, config)


def is_official(path: str) -> bool:
  """Whether ``path`` (file or directory) holds official DAGE weights (by key names)."""
  from safetensors import safe_open
  path = os.fspath(path)
  files = ([os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
           if os.path.isdir(path) else [path] if path.endswith(".safetensors") else [])
  for f in files:
    with safe_open(f, "np") as h:
      keys = set(h.keys())
    if {"register_token", "adapter.linear_out.weight", "hr_encoder.backbone.cls_token"} <= keys:
      return True
  return False
