"""Official Pi3 checkpoints <-> geojax :class:`~geojax.models.pi3.Pi3`.

Official layout: the ``state_dict()`` of ``pi3.models.pi3.Pi3`` (the ``model.safetensors`` of
``yyfz233/Pi3``; keys such as ``decoder.3.attn.q_norm.weight``, ``encoder.blocks.2.ls1.gamma``,
``conf_decoder.blocks.0.mlp.fc1.weight``, ``camera_head.res_conv.1.res_conv3.bias``), in a
``.safetensors`` file or a directory holding one. The ImageNet buffers ``image_mean`` /
``image_std`` are checked on reading and written back on export. Layout changes as in
:mod:`geojax.convert.torch_layout`.

The same key names are DAGE's LR stream: :func:`from_dage_state_dict` takes Pi3's parts out of a
DAGE checkpoint (the confidence branch, which DAGE lacks, must come from elsewhere), and
:func:`dage_init_state_dict` is the official merge recipe (MoGe-2 + Pi3 -> a DAGE init).
"""

from __future__ import annotations

import os
from typing import Iterator, Mapping

import numpy as np
from flax import nnx

from geojax.convert import torch_layout as tl
from geojax.models import pi3 as pi3_lib
from geojax.nn.layers import IMAGENET_MEAN, IMAGENET_STD

_BUFFERS = {"image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}

# geojax dotted path (leaf renamed to weight/bias) -> official key; "{i}" = stacked layer index.
_RULES = [
    (r"^encoder\.stacks\.0\.layers\.", "encoder.blocks.{i}."),
    (r"^decoder\.blocks\.layers\.", "decoder.{i}."),
    (r"^(point_decoder|conf_decoder|camera_decoder)\.blocks\.layers\.", r"\1.blocks.{i}."),
    (r"^camera_head\.more_mlps\.(\d+)\.", lambda m: f"camera_head.more_mlps.{2 * int(m[1])}."),
]


def _config(config: pi3_lib.Pi3Config | str) -> pi3_lib.Pi3Config:
  return pi3_lib.get_config(config) if isinstance(config, str) else config


def from_torch_state_dict(state_dict: Mapping[str, np.ndarray],
                          config: pi3_lib.Pi3Config | str = "pi3", *,
                          strict_unexpected: bool = False) -> pi3_lib.Pi3:
  """Build a :class:`Pi3` from an official state dict (NumPy arrays, official key names).
  Missing tensors or wrong shapes raise ``ValueError``; unknown keys warn (or raise with
  ``strict_unexpected=True``)."""
  cfg = _config(config)
  return tl.load_state_dict(lambda: pi3_lib.Pi3.from_config(cfg, rngs=nnx.Rngs(0)), state_dict,
                            _RULES, name="Pi3", buffers=_BUFFERS,
                            strict_unexpected=strict_unexpected)


def iter_torch_state_dict(model: pi3_lib.Pi3) -> Iterator[tuple[str, np.ndarray]]:
  """``(official key, float32 array)`` pairs, one tensor at a time, buffers included."""
  return tl.iter_state_dict(model, _RULES, _BUFFERS)


def to_torch_state_dict(model: pi3_lib.Pi3) -> dict[str, np.ndarray]:
  """geojax Pi3 -> the official ``state_dict()`` (NumPy float32)."""
  return dict(iter_torch_state_dict(model))


def official_keys(config: pi3_lib.Pi3Config | str = "pi3") -> list[str]:
  """Every official parameter key of a Pi3 configuration (no buffers)."""
  cfg = _config(config)
  abstract = nnx.eval_shape(lambda: pi3_lib.Pi3.from_config(cfg, rngs=nnx.Rngs(0)))
  return [k for *_, keys, _, _ in tl.entries(abstract, _RULES) for k in keys]


def load_official(path: str | os.PathLike, config: pi3_lib.Pi3Config | None = None,
                  **overrides) -> pi3_lib.Pi3:
  """Official Pi3 weights from a ``.safetensors`` file or a directory (the released ``pi3``
  configuration unless ``config`` is given; ``overrides``: runtime fields such as
  ``attn_impl``)."""
  sd, _ = tl.read_safetensors(os.fspath(path), "pi3")
  cfg = pi3_lib.get_config("pi3", **overrides) if config is None else config
  return from_torch_state_dict(sd, cfg)


def is_official(path: str) -> bool:
  """Whether ``path`` (file or directory) holds official Pi3 weights (by key names)."""
  want = {"register_token", "conf_decoder.linear_out.weight", "conf_head.proj.weight",
          "encoder.cls_token"}
  return any(want <= keys for keys in tl.safetensors_keys(path))


# ------------------------------------------------------------------------- DAGE <-> Pi3 keys

# Pi3 keys that DAGE's LR stream holds under the same names.
_SHARED_PREFIXES = ("encoder.", "register_token", "decoder.", "point_decoder.", "point_head.",
                    "camera_decoder.", "camera_head.")
# MoGe-2 module -> DAGE module in the official merge (``scripts/merge_checkpoints.py``).
_MOGE_TO_DAGE = (("encoder.", "hr_encoder."), ("neck.", "hr_neck."),
                 ("points_head.", "hr_points_head."), ("mask_head.", "hr_mask_head."),
                 ("scale_head.", "hr_scale_head."))


def dage_init_state_dict(moge2: Mapping[str, np.ndarray], pi3: Mapping[str, np.ndarray]
                         ) -> dict[str, np.ndarray]:
  """The official DAGE initialisation: MoGe-2's encoder, neck and heads renamed to DAGE's HR
  stream (``encoder.`` -> ``hr_encoder.``, ``neck.`` -> ``hr_neck.``, ``points_head.``,
  ``mask_head.``, ``scale_head.`` -> ``hr_*``) plus Pi3's LR encoder, registers, decoder,
  point and camera branches under their own names (Pi3's confidence branch is dropped). The
  adapter, cls decoder and token splitter are not in either checkpoint: load the result with
  ``geojax.convert.dage`` into a freshly initialised model (``strict=False`` semantics:
  :func:`merge_into_dage`)."""
  out = {}
  for k, v in moge2.items():
    for a, b in _MOGE_TO_DAGE:
      if k.startswith(a):
        out[b + k[len(a):]] = v
        break
  for k, v in pi3.items():
    if k.startswith(_SHARED_PREFIXES):
      out[k] = v
  if not any(k.startswith("hr_encoder.") for k in out):
    raise ValueError("the MoGe-2 checkpoint has no encoder.* tensors; is it a MoGe-2 model?")
  if not any(k.startswith("decoder.") for k in out):
    raise ValueError("the Pi3 checkpoint has no decoder.* tensors; is it a Pi3 model?")
  return out


def merge_into_dage(model, merged: Mapping[str, np.ndarray]):
  """Copy the tensors of ``merged`` (official DAGE key names, e.g. from
  :func:`dage_init_state_dict`) into ``model`` (a geojax DAGE), keeping the model's own values
  for every parameter the checkpoints do not hold. Returns ``(model, loaded keys, kept
  keys)``; a tensor of the wrong shape raises ``ValueError``."""
  from geojax.convert import dage as dage_conv
  current = dict(dage_conv.iter_torch_state_dict(model))
  loaded, kept = [], []
  for k in current:
    if k in merged:
      if tuple(np.shape(merged[k])) != tuple(current[k].shape):
        raise ValueError(f"merged tensor {k} has shape {tuple(np.shape(merged[k]))}; this DAGE "
                         f"expects {tuple(current[k].shape)}")
      current[k] = np.asarray(merged[k], np.float32)
      loaded.append(k)
    else:
      kept.append(k)
  unknown = sorted(set(merged) - set(current))
  if unknown:
    raise ValueError(f"{len(unknown)} merged tensors have no place in DAGE: {unknown[:10]}")
  return dage_conv.from_torch_state_dict(current, model.cfg), loaded, kept
