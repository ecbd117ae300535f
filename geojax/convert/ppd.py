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
from geojax.models import ppd_pipeline as pipe_lib
from geojax.models import ppd_semantics as sem_lib
from geojax.nn.layers import IMAGENET_MEAN, IMAGENET_STD

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


# --------------------------------------------------------------- the whole model (+ encoder)
#
# ``PixelPerfectDepth.state_dict()`` layout: ``dit.*`` (the DiT, above) and ``sem_encoder.*``
# (DA-V2: ``pretrained.*``; MoGe-2: ``encoder.*``, its neck and heads unused and dropped; Pi3:
# the whole Pi3 state dict). The released ``ppd.pth`` / ``ppd_moge.pth`` / ``ppvd.pth`` hold the
# DiT only; the encoder comes from its own release (``depth_anything_v2_vitl.pth``, MoGe-2's
# ``model.pt``, ``pi3.safetensors``) and ``geojax convert --family ppd DIT --with ENCODER``
# stores both in one file.

SEM = "sem_encoder."
_SEM_RULES = {
    "da2": [(r"^pretrained\.stacks\.0\.layers\.", "pretrained.blocks.{i}.")],
    "moge2": [(r"^encoder\.backbone\.stacks\.0\.layers\.", "encoder.backbone.blocks.{i}.")],
}
_MOGE_BUFFERS = {"encoder.image_mean": IMAGENET_MEAN, "encoder.image_std": IMAGENET_STD}


def semantics_kind(state_dict: Mapping[str, Any]) -> str | None:
  """Which encoder an (unprefixed) state dict holds: ``"da2"`` (DA-V2: ``pretrained.blocks``),
  ``"moge2"`` (``encoder.backbone.blocks`` + ``encoder.output_projections``), ``"pi3"``
  (``encoder.blocks`` + ``decoder.0``), or ``None``."""
  keys = set(state_dict)
  if any(k.startswith("pretrained.blocks.") for k in keys):
    return "da2"
  if any(k.startswith("encoder.output_projections.") for k in keys):
    return "moge2"
  if any(k.startswith("decoder.0.") for k in keys) and "register_token" in keys:
    return "pi3"
  return None


def semantics_from_torch_state_dict(state_dict: Mapping[str, np.ndarray],
                                    config: sem_lib.SemanticsConfig | str, *,
                                    strict_unexpected: bool = True) -> nnx.Module:
  """A semantic encoder (:mod:`geojax.models.ppd_semantics`) from its official state dict
  (``DepthAnythingV2`` / MoGe-2 / Pi3 keys; DA-V2's depth head and MoGe-2's neck and heads are
  ignored). Other unknown keys (e.g. a deeper encoder's blocks) raise ``ValueError``."""
  cfg = sem_lib.get_config(config) if isinstance(config, str) else config
  sd = dict(state_dict)
  if cfg.kind == "pi3":
    from geojax.convert import pi3 as pi3_conv
    inner = pi3_conv.from_torch_state_dict(sd, pi3_conv.pi3_lib.get_config(
        cfg.pi3_preset, attn_impl=cfg.attn_impl, scan=cfg.scan, remat=cfg.remat,
        dtype=cfg.dtype), strict_unexpected=strict_unexpected)
    module = nnx.eval_shape(lambda: sem_lib.build(cfg, rngs=nnx.Rngs(0)))
    module.model = inner
    return module
  keep = ("pretrained.",) if cfg.kind == "da2" else ("encoder.",)
  sd = {k: v for k, v in sd.items() if k.startswith(keep)}
  return tl.load_state_dict(lambda: sem_lib.build(cfg, rngs=nnx.Rngs(0)), sd,
                            _SEM_RULES[cfg.kind], name=f"{cfg.kind} semantic encoder",
                            buffers=_MOGE_BUFFERS if cfg.kind == "moge2" else None,
                            strict_unexpected=strict_unexpected)


def iter_semantics_state_dict(module: nnx.Module) -> Iterator[tuple[str, np.ndarray]]:
  kind = module.cfg.kind
  if kind == "pi3":
    from geojax.convert import pi3 as pi3_conv
    return pi3_conv.iter_torch_state_dict(module.model)
  return tl.iter_state_dict(module, _SEM_RULES[kind],
                            _MOGE_BUFFERS if kind == "moge2" else None)


def pipeline_config(reference: Mapping[str, Any] | None, sd_keys, **overrides
                    ) -> pipe_lib.PipelineConfig:
  """The whole model's config: ``model_name`` of a converted ``config.json`` (a preset), else
  the released preset the tensors fit (temporal blocks: ``ppvd``; a MoGe-2 encoder:
  ``ppd-moge``; else ``ppd``). ``semantics`` in ``config.json`` may set MoGe-2's ``taps`` and
  ``out`` (read from the checkpoint's ``model_config`` by ``geojax convert``)."""
  reference = dict(reference or {})
  name = reference.get("model_name") or identify_pipeline(sd_keys)
  if name not in pipe_lib.PRESETS:
    raise ValueError(f"PPD weights: unknown preset {name!r}; expected one of "
                     f"{pipe_lib.PRESET_NAMES}")
  cfg = pipe_lib.get_config(name, **overrides)
  sem = reference.get("semantics") or {}
  if sem:
    extra = {k: (tuple(v) if isinstance(v, list) else v) for k, v in sem.items()
             if k in ("taps", "out")}
    s = dataclasses.replace(cfg.semantics, **extra)
    cfg = pipe_lib.PipelineConfig(dataclasses.replace(cfg.dit, semantics_dim=s.out_dim), s)
  return cfg


def identify_pipeline(keys) -> str | None:
  """The released preset of a whole-model state dict's keys, or ``None`` if it is not one."""
  keys = set(keys)
  if "dit.x_embedder.proj.weight" not in keys:
    return None
  if any(k.startswith("dit.temporal_blocks.") for k in keys):
    return "ppvd"
  if any(k.startswith(SEM + "encoder.output_projections.") for k in keys):
    return "ppd-moge"
  return "ppd"


def pipeline_from_torch_state_dict(state_dict: Mapping[str, np.ndarray],
                                   config: pipe_lib.PipelineConfig | str = "ppd"
                                   ) -> pipe_lib.PixelPerfectDepth:
  """The whole model from ``dit.*`` + ``sem_encoder.*`` tensors (module comment above)."""
  cfg = pipe_lib.get_config(config) if isinstance(config, str) else config
  dit_sd = {k[4:]: v for k, v in state_dict.items() if k.startswith("dit.")}
  sem_sd = {k[len(SEM):]: v for k, v in state_dict.items() if k.startswith(SEM)}
  if not dit_sd:
    raise ValueError("PPD weights hold no dit.* tensors (the DiT); an encoder alone is "
                     "converted with --tensors-only (for init.semantics) or passed with --with "
                     "next to its DiT")
  if not sem_sd:
    raise ValueError("PPD weights hold no sem_encoder.* tensors: the released DiT checkpoints "
                     "do not include their frozen semantic encoder; convert with `geojax convert"
                     " --family ppd ppd.pth DST --with depth_anything_v2_vitl.pth` (ppd_moge.pth:"
                     " --with MoGe-2's model.pt; ppvd.pth: --with pi3.safetensors)")
  kind = semantics_kind(sem_sd)
  if kind != cfg.semantics.kind:
    raise ValueError(f"the sem_encoder.* tensors are a {kind or 'unknown'} encoder but preset "
                     f"needs {cfg.semantics.kind!r}")
  return pipe_lib.PixelPerfectDepth(from_torch_state_dict(dit_sd, cfg.dit,
                                                          strict_unexpected=True),
                                    semantics_from_torch_state_dict(sem_sd, cfg.semantics))


def iter_pipeline_state_dict(model: pipe_lib.PixelPerfectDepth
                             ) -> Iterator[tuple[str, np.ndarray]]:
  for k, v in iter_torch_state_dict(model.dit):
    yield "dit." + k, v
  for k, v in iter_semantics_state_dict(model.sem_encoder):
    yield SEM + k, v


def pipeline_to_torch_state_dict(model: pipe_lib.PixelPerfectDepth) -> dict[str, np.ndarray]:
  """geojax whole model -> the official ``PixelPerfectDepth.state_dict()`` layout (float32)."""
  return dict(iter_pipeline_state_dict(model))


def load_pipeline(path: str | os.PathLike, config: pipe_lib.PipelineConfig | None = None,
                  **overrides) -> pipe_lib.PixelPerfectDepth:
  """The whole model from a converted ``.safetensors`` file or directory (module comment)."""
  sd, ref = tl.read_safetensors(os.fspath(path), "ppd")
  if config is None:
    config = pipeline_config(ref, sd.keys(), **overrides)
  return pipeline_from_torch_state_dict(sd, config)


def _moge_semantics(model_config: Mapping[str, Any] | None, sem: Mapping[str, Any]
                    ) -> dict[str, Any]:
  """``{"semantics": {"taps", "out"}}`` from MoGe-2's ``model_config`` (else ``{}``): its
  ``intermediate_layers`` (a list, or ``n``: the last ``n`` blocks) and ``dim_out``."""
  enc = (model_config or {}).get("encoder") or {}
  if "intermediate_layers" not in enc and "dim_out" not in enc:
    return {}
  taps = enc.get("intermediate_layers", 4)
  blocks = [int(k.split(".")[3]) for k in sem if k.startswith("encoder.backbone.blocks.")]
  depth = 1 + max(blocks, default=-1)
  taps = list(range(depth - taps, depth)) if isinstance(taps, int) else [int(t) for t in taps]
  return {"semantics": {"taps": taps, "out": int(enc.get("dim_out", 1024))}}


def pipeline_checkpoint(dit: Mapping[str, Any], encoder: Any = None
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
  """``geojax convert``'s hook: an official DiT checkpoint (``ppd.pth``: the DiT's tensors,
  possibly under ``dit.``, or a whole ``PixelPerfectDepth`` state dict) and, unless it holds
  one, the encoder's official checkpoint -> ``(dit.* + sem_encoder.* tensors, config)``."""
  tensors, model_config = tl.checkpoint_tensors(dit, "PPD")
  if encoder is None and "x_embedder.proj.weight" not in strip_prefix(tensors):
    kind = semantics_kind(tensors)
    if kind is not None:  # an encoder alone (``--tensors-only``, for init.semantics)
      keep = {"da2": ("pretrained.",), "moge2": ("encoder.",)}.get(kind)
      return ({k: v for k, v in tensors.items() if keep is None or k.startswith(keep)},
              {"semantics_kind": kind, **_moge_semantics(model_config, tensors)})
  out = {"dit." + k: v for k, v in strip_prefix(tensors).items()}
  sem = {k[len(SEM):]: v for k, v in tensors.items() if k.startswith(SEM)}
  config: dict[str, Any] = {}
  if encoder is not None:
    if sem:
      raise ValueError("the DiT checkpoint already holds its sem_encoder.*; drop --with")
    sem, model_config = tl.checkpoint_tensors(encoder, "semantic encoder")
    config.update(_moge_semantics(model_config, sem))
  kind = semantics_kind(sem)
  if kind is None:
    raise ValueError("no semantic encoder: the released DiT checkpoints hold the DiT only; pass "
                     "the encoder's checkpoint with --with (ppd.pth: depth_anything_v2_vitl.pth; "
                     "ppd_moge.pth: MoGe-2's model.pt; ppvd.pth: pi3.safetensors)")
  keep = {"da2": ("pretrained.",), "moge2": ("encoder.",)}.get(kind)
  out.update({SEM + k: v for k, v in sem.items() if keep is None or k.startswith(keep)})
  preset = identify_pipeline(out)
  config["model_name"] = preset
  return out, config
