"""Official URGT checkpoints <-> geojax :class:`~geojax.models.urgt.URGT`.

Official layout: the ``state_dict()`` of ``VGGT_Joint`` (keys such as
``aggregator.frame_blocks.3.attn.q_norm.weight``, ``aggregator.patch_embed.patch_embed_depth.proj
.weight``, ``depth_head.scratch.refinenet2.resConfUnit1.conv1.weight``), or of ``URGTModel``
(the same keys with a ``vggt.`` prefix, e.g. the released ``ckpt_best.pth`` under
``model_state_dict`` once converted by ``geojax convert --family urgt``), in a ``.safetensors``
file or a directory holding one. Layout changes as in :mod:`geojax.convert.torch_layout`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Mapping

import numpy as np
from flax import nnx

from geojax.convert import torch_layout as tl
from geojax.models import urgt as urgt_lib

_HEAD = r"^(depth_head|normal_head)\."
# geojax dotted path (leaf renamed to weight/bias) -> official key; "{i}" = stacked layer index.
_RULES = [
    (r"^patch_embed\.stacks\.0\.layers\.", "aggregator.patch_embed.blocks.{i}."),
    (r"^patch_embed\.", "aggregator.patch_embed."),
    (r"^patch_embed_(depth|normal)\.", r"aggregator.patch_embed.patch_embed_\1."),
    (r"^(camera_token|register_token)$", r"aggregator.\1"),
    (r"^(frame_blocks|global_blocks)\.layers\.", r"aggregator.\1.{i}."),
    (_HEAD + r"reassemble\.norm\.", r"\1.norm."),
    (_HEAD + r"reassemble\.projects\.", r"\1.projects."),
    (_HEAD + r"reassemble\.resize(\d)\.", r"\1.resize_layers.\2."),
    (_HEAD + r"reassemble\.layer_rn\.(\d)\.", lambda m: f"{m[1]}.scratch.layer{int(m[2]) + 1}_rn."),
    (_HEAD + r"fusion\.(refinenet\d)\.", r"\1.scratch.\2."),
    (_HEAD + r"output_conv1\.", r"\1.scratch.output_conv1."),
    (_HEAD + r"output_conv2\.conv0\.", r"\1.scratch.output_conv2.0."),
    (_HEAD + r"output_conv2\.conv2\.", r"\1.scratch.output_conv2.2."),
]
PREFIX = "vggt."  # URGTModel wraps VGGT_Joint


def _config(config: urgt_lib.URGTConfig | str) -> urgt_lib.URGTConfig:
  return urgt_lib.get_config(config) if isinstance(config, str) else config


def config_from_reference(reference: Mapping[str, Any], **overrides) -> urgt_lib.URGTConfig:
  """The :class:`~geojax.models.urgt.URGTConfig` of a reference run, from its parsed
  ``config.json`` (the layout of ``shared/fixtures/urgt/config.json``: ``vggt_joint_kwargs``,
  ``aggregator_overrides``, ``dino_patch_embed``, ``depth_head`` / ``normal_head``). Unset parts
  keep the released sizes, or those of the preset named by ``model_name`` (what
  ``geojax convert --preset`` records); ``overrides``: runtime fields (``attn_impl``, ...)."""
  f: dict[str, Any] = {}
  base = urgt_lib.URGTConfig()
  if reference.get("model_name"):
    base = urgt_lib.get_config(str(reference["model_name"]))
  vj = reference.get("vggt_joint_kwargs", {})
  if vj.get("patch_size", urgt_lib.PATCH) != urgt_lib.PATCH:
    raise ValueError(f"patch_size {vj['patch_size']}: URGT's DINOv2 uses 14")
  if "embed_dim" in vj:
    f["dim"] = int(vj["embed_dim"])
  if "img_size" in vj:
    f["img_size"] = int(vj["img_size"])
  agg = reference.get("aggregator_overrides", {})
  if agg:
    if tuple(agg.get("aa_order", ("frame", "global"))) != ("frame", "global") or int(
        agg.get("aa_block_size", 1)) != 1:
      raise ValueError("only the released aggregator order (frame, global; block size 1) is "
                       "supported")
    f.update(agg_depth=int(agg["depth"]), agg_heads=int(agg["num_heads"]))
  dino = reference.get("dino_patch_embed", {})
  if dino:
    f.update(enc_depth=int(dino["depth"]), enc_heads=int(dino["num_heads"]))
  heads = [reference[k] for k in ("depth_head", "normal_head") if k in reference]
  if heads:
    h = heads[0]
    if any(x.get("features") != h.get("features") or list(x.get("out_channels", [])) != list(
        h.get("out_channels", [])) for x in heads):
      raise ValueError("the depth and normal heads differ in width; geojax builds them alike")
    f.update(head_features=int(h["features"]), head_out_channels=tuple(h["out_channels"]),
             head_layers=tuple(h["intermediate_layer_idx"]))
  f.update(overrides)
  return dataclasses.replace(base, **f)


def strip_prefix(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """``URGTModel`` keys (``vggt.``-prefixed) -> ``VGGT_Joint`` keys; other keys unchanged."""
  return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in state_dict.items()}


def from_torch_state_dict(state_dict: Mapping[str, np.ndarray],
                          config: urgt_lib.URGTConfig | str = "urgt", *,
                          strict_unexpected: bool = False) -> urgt_lib.URGT:
  """Build a :class:`URGT` from an official state dict (``VGGT_Joint`` or ``URGTModel`` key
  names). Missing tensors or wrong shapes raise ``ValueError``; unknown keys warn (or raise with
  ``strict_unexpected=True``)."""
  cfg = _config(config)
  return tl.load_state_dict(lambda: urgt_lib.URGT.from_config(cfg, rngs=nnx.Rngs(0)),
                            strip_prefix(state_dict), _RULES, name="URGT",
                            strict_unexpected=strict_unexpected)


def iter_torch_state_dict(model: urgt_lib.URGT) -> Iterator[tuple[str, np.ndarray]]:
  """``(official VGGT_Joint key, float32 array)`` pairs, one tensor at a time."""
  return tl.iter_state_dict(model, _RULES)


def to_torch_state_dict(model: urgt_lib.URGT) -> dict[str, np.ndarray]:
  """geojax URGT -> the official ``VGGT_Joint.state_dict()`` (NumPy float32)."""
  return dict(iter_torch_state_dict(model))


def load_official(path: str | os.PathLike, config: urgt_lib.URGTConfig | None = None,
                  **overrides) -> urgt_lib.URGT:
  """Official URGT weights from a ``.safetensors`` file or a directory (``config.json``, if
  present, gives the configuration through :func:`config_from_reference`; otherwise the released
  ``urgt`` configuration)."""
  sd, ref = tl.read_safetensors(os.fspath(path), "urgt")
  if config is None:
    config = config_from_reference(ref, **overrides) if ref else urgt_lib.get_config(
        "urgt", **overrides)
  elif overrides:
    config = dataclasses.replace(config, **overrides)
  return from_torch_state_dict(sd, config)


def is_official(path: str) -> bool:
  """Whether ``path`` (file or directory) holds official URGT weights (by key names)."""
  want = {"aggregator.patch_embed.patch_embed_depth.proj.weight", "normal_head.norm.weight"}
  return any(want <= {k[len(PREFIX):] if k.startswith(PREFIX) else k for k in keys}
             for keys in tl.safetensors_keys(path))


# ------------------------------------------------------------------- VGGT-1B initialisation

VGGT_HEADS = ("camera_head.", "point_head.", "track_head.")  # VGGT heads URGT deletes
_PRIOR_EMBEDS = ("aggregator.patch_embed.patch_embed_depth.",
                 "aggregator.patch_embed.patch_embed_normal.")


def merge_vggt(model: urgt_lib.URGT, vggt: Mapping[str, np.ndarray]
               ) -> tuple[urgt_lib.URGT, list[str], list[str], list[str]]:
  """The paper's initialisation source: VGGT-1B's tensors (official ``VGGT.state_dict()`` key
  names, e.g. ``facebook/VGGT-1B``'s ``model.pt`` converted with
  ``geojax convert --family urgt --tensors-only``) copied into a URGT with ``model``'s
  configuration, as the official ``URGTModel`` loads ``vggt_1B.pt`` (non-strictly): the
  aggregator (DINOv2 patch embedding, camera / register tokens, frame and global blocks) and
  the depth head; VGGT's camera, point and track heads are dropped; the prior embeddings and the
  normal head keep ``model``'s values. Returns ``(new model, loaded keys, kept keys, dropped
  keys)``. A tensor of the wrong shape, a key URGT has no place for, a file without the
  aggregator or a URGT checkpoint (it holds prior embeddings: use ``init.weights``) raise
  ``ValueError``. Apply :func:`geojax.models.urgt.init_training_start` afterwards."""
  sd = strip_prefix(vggt)
  if not any(k.startswith("aggregator.frame_blocks.") for k in sd):
    raise ValueError("not a VGGT checkpoint: no aggregator.frame_blocks.* tensors (expected the "
                     "state dict of facebook/VGGT-1B's model.pt)")
  if any(k.startswith(_PRIOR_EMBEDS) for k in sd):
    raise ValueError("this checkpoint holds URGT prior embeddings (a URGT model, not VGGT): "
                     "load it with init.weights")
  current = dict(iter_torch_state_dict(model))
  dropped = sorted(k for k in sd if k.startswith(VGGT_HEADS))
  unknown = sorted(k for k in sd if k not in current and not k.startswith(VGGT_HEADS))
  if unknown:
    raise ValueError(f"{len(unknown)} VGGT tensors have no place in URGT: {unknown[:8]}")
  loaded = []
  for k, v in sd.items():
    if k in current:
      if tuple(np.shape(v)) != tuple(current[k].shape):
        raise ValueError(f"VGGT tensor {k} has shape {tuple(np.shape(v))}; this URGT "
                         f"({model.cfg.dim}-wide) expects {tuple(current[k].shape)}")
      current[k] = np.asarray(v, np.float32)
      loaded.append(k)
  kept = sorted(set(current) - set(loaded))
  return from_torch_state_dict(current, model.cfg), sorted(loaded), kept, dropped
