"""Official Pixel-Perfect Depth checkpoints <-> geojax :class:`~geojax.models.ppd.PPD`.

Official layout: ``DiT.state_dict()`` (keys such as ``blocks.3.adaLN_modulation.1.weight``,
``proj_fusion.0.weight``, ``t_embedder.mlp.2.bias``, ``x_embedder.proj.weight``), also under a
``dit.`` / ``score_model.`` prefix as ``PixelPerfectDepth.state_dict()`` stores it (the frozen
``sem_encoder.*`` tensors there are ignored), in a ``.safetensors`` file or a directory holding
one; the released ``ppd.pth`` / ``ppd_moge.pth`` are pickles, converted once by
``geojax convert --family ppd``. Layout changes as in :mod:`geojax.convert.torch_layout`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Mapping

import numpy as np
from flax import nnx

from geojax.convert import torch_layout as tl
from geojax.models import ppd as ppd_lib

# geojax dotted path (leaf renamed to weight/bias) -> official key; "{i}" = stacked layer index.
_RULES = [
    (r"^(blocks|temporal_blocks)\.layers\.adaLN_modulation_1\.", r"\1.{i}.adaLN_modulation.1."),
    (r"^(blocks|temporal_blocks)\.layers\.", r"\1.{i}."),
    (r"^t_embedder\.mlp_(\d)\.", r"t_embedder.mlp.\1."),
    (r"^proj_fusion_(\d)\.", r"proj_fusion.\1."),
    (r"^final_layer\.adaLN_modulation_1\.", "final_layer.adaLN_modulation.1."),
]
# wrappers of the DiT in official checkpoints
PREFIXES = ("dit_video.", "dit.", "score_model.", "module.")
IGNORED = ("sem_encoder.",)  # the frozen semantic encoder inside PixelPerfectDepth
POS_EMBED = "pos_embed"  # the video DiT's frozen sin-cos table (recomputed, checked on load)
Config = ppd_lib.PPDConfig | ppd_lib.PPVDConfig
Model = ppd_lib.PPD | ppd_lib.PPVD


def _config(config: Config | str) -> Config:
  return ppd_lib.get_config(config) if isinstance(config, str) else config


def config_from_reference(reference: Mapping[str, Any], video: bool = False,
                          **overrides) -> Config:
  """The model config of a reference run from its parsed ``config.json`` (the layout of
  ``shared/fixtures/ppd/config.json``: ``image_dit`` / ``video_dit`` with the constructor
  ``kwargs`` and ``semantics_dim``; ``video=True`` reads ``video_dit`` and gives a
  :class:`~geojax.models.ppd.PPVDConfig`), or of a converted checkpoint (``model_name``: a
  preset). ``overrides``: runtime fields (``attn_impl``, ...)."""
  name = reference.get("model_name")
  if name:
    base = ppd_lib.get_config(str(name))
    video = isinstance(base, ppd_lib.PPVDConfig)
  else:
    base = ppd_lib.PPVDConfig() if video else ppd_lib.PPDConfig()
  sec = reference.get("video_dit" if video else "image_dit", {})
  kw = sec.get("kwargs", {})
  f: dict[str, Any] = {}
  names = [("dim", "hidden_size"), ("depth", "depth"), ("num_heads", "num_heads"),
           ("patch", "patch_size"), ("in_channels", "in_channels"),
           ("out_channels", "out_channels")] + ([("size", "input_size")] if video else [])
  for ours, theirs in names:
    if theirs in kw:
      f[ours] = int(kw[theirs])
  if "mlp_ratio" in kw:
    f["mlp_ratio"] = float(kw["mlp_ratio"])
  if "semantics_dim" in sec:
    f["semantics_dim"] = int(sec["semantics_dim"])
  f.update(overrides)
  return dataclasses.replace(base, **f)


def strip_prefix(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Wrapper keys (``dit.``, ``score_model.``) -> ``DiT`` keys; the semantic encoder's dropped."""
  out = {}
  for k, v in state_dict.items():
    if k.startswith(IGNORED):
      continue
    for p in PREFIXES:
      if k.startswith(p):
        k = k[len(p):]
        break
    out[k] = v
  return out


def _check_pos_embed(sd: dict[str, np.ndarray], cfg: Config) -> None:
  pe = sd.pop(POS_EMBED, None)
  if pe is None or not isinstance(cfg, ppd_lib.PPVDConfig):
    return
  want = ppd_lib.video_pos_embed(cfg)
  if tuple(np.shape(pe)) != want.shape or not np.allclose(pe, want, rtol=0, atol=1e-5):
    raise ValueError(f"{POS_EMBED}: expected the fixed sin-cos table {want.shape} of the video "
                     f"DiT; the checkpoint holds a different {tuple(np.shape(pe))} tensor")


def from_torch_state_dict(state_dict: Mapping[str, np.ndarray], config: Config | str = "ppd",
                          *, strict_unexpected: bool = False) -> Model:
  """Build a :class:`~geojax.models.ppd.PPD` (image config) or
  :class:`~geojax.models.ppd.PPVD` (video config) from an official ``DiT`` / ``DiT_Video``
  state dict. Missing tensors or wrong shapes raise ``ValueError``; unknown keys warn (or raise
  with ``strict_unexpected=True``). The video DiT's ``pos_embed`` must be the fixed table."""
  cfg = _config(config)
  sd = strip_prefix(state_dict)
  _check_pos_embed(sd, cfg)
  return tl.load_state_dict(lambda: ppd_lib.build(cfg, rngs=nnx.Rngs(0)), sd, _RULES,
                            name="PPVD" if isinstance(cfg, ppd_lib.PPVDConfig) else "PPD",
                            strict_unexpected=strict_unexpected)


def iter_torch_state_dict(model: Model) -> Iterator[tuple[str, np.ndarray]]:
  """``(official key, float32 array)`` pairs, one tensor at a time (with the video DiT's
  ``pos_embed`` table)."""
  yield from tl.iter_state_dict(model, _RULES)
  if isinstance(model, ppd_lib.PPVD):
    yield POS_EMBED, model.pos_embed()


def to_torch_state_dict(model: Model) -> dict[str, np.ndarray]:
  """geojax PPD / PPVD -> the official ``DiT`` / ``DiT_Video`` ``state_dict()`` (float32)."""
  return dict(iter_torch_state_dict(model))


def load_official(path: str | os.PathLike, config: Config | None = None,
                  **overrides) -> Model:
  """Official PPD / PPVD weights from a ``.safetensors`` file or a directory (``config.json``,
  if present, gives the configuration through :func:`config_from_reference`; otherwise the
  released ``ppvd`` configuration when the tensors hold temporal blocks, else ``ppd``)."""
  sd, ref = tl.read_safetensors(os.fspath(path), "ppd")
  if config is None:
    video = any(k.startswith("temporal_blocks.") for k in strip_prefix(sd))
    config = config_from_reference(ref, video=video, **overrides) if ref else (
        ppd_lib.get_config("ppvd" if video else "ppd", **overrides))
  elif overrides:
    config = dataclasses.replace(config, **overrides)
  return from_torch_state_dict(sd, config)
