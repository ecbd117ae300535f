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
import os
from typing import Any, Iterator, Mapping

import numpy as np
from flax import nnx

from geojax.convert import torch_layout as tl
from geojax.models import dage as dage_lib
from geojax.nn.layers import IMAGENET_MEAN, IMAGENET_STD

_BUFFERS = {"image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
            "hr_encoder.image_mean": IMAGENET_MEAN, "hr_encoder.image_std": IMAGENET_STD}

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


def from_torch_state_dict(state_dict: Mapping[str, np.ndarray],
                          config: dage_lib.DAGEConfig | str = "dage", *,
                          strict_unexpected: bool = False) -> dage_lib.DAGE:
  """Build a :class:`DAGE` from an official state dict (NumPy arrays, official key names).

  ``config``: a :class:`DAGEConfig` (e.g. from :func:`config_from_reference`) or a preset
  name. Missing tensors or wrong shapes raise ``ValueError``; unknown keys are listed in a
  warning (an error with ``strict_unexpected=True``).
  """
  cfg = dage_lib.get_config(config) if isinstance(config, str) else config
  return tl.load_state_dict(lambda: dage_lib.DAGE.from_config(cfg, rngs=nnx.Rngs(0)),
                            state_dict, _RULES, name="DAGE", buffers=_BUFFERS,
                            strict_unexpected=strict_unexpected)


def iter_torch_state_dict(model: dage_lib.DAGE) -> Iterator[tuple[str, np.ndarray]]:
  """``(official key, float32 array)`` pairs, one tensor at a time, buffers included."""
  return tl.iter_state_dict(model, _RULES, _BUFFERS)


def to_torch_state_dict(model: dage_lib.DAGE) -> dict[str, np.ndarray]:
  """geojax DAGE -> the official ``state_dict()`` (NumPy float32)."""
  return dict(iter_torch_state_dict(model))


def load_official(path: str | os.PathLike, config: dage_lib.DAGEConfig | None = None,
                  **overrides) -> dage_lib.DAGE:
  """Official DAGE weights from a ``.safetensors`` file or a directory (``config.json``, if
  present, gives the configuration through :func:`config_from_reference`; otherwise the
  released ``dage`` configuration)."""
  sd, ref = tl.read_safetensors(os.fspath(path), "dage")
  if config is None:
    config = config_from_reference(ref, **overrides) if ref else dage_lib.get_config(
        "dage", **overrides)
  elif overrides:
    config = dataclasses.replace(config, **overrides)
  return from_torch_state_dict(sd, config)


def is_official(path: str) -> bool:
  """Whether ``path`` (file or directory) holds official DAGE weights (by key names)."""
  want = {"register_token", "adapter.linear_out.weight", "hr_encoder.backbone.cls_token"}
  return any(want <= keys for keys in tl.safetensors_keys(path))
