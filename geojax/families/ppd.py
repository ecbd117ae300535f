"""The PPD / PPVD family (Pixel-Perfect Depth, pixel-space flow-matching depth): build, load, run.

- network: :class:`geojax.models.ppd_pipeline.PixelPerfectDepth` (a frozen semantic encoder
  and the DiT; presets ``ppd`` (DA-V2 semantics), ``ppd-moge`` (MoGe-2), ``ppvd`` (video, Pi3),
  geojax-only ``ppd-tiny`` / ``ppvd-tiny``);
- official weights: :mod:`geojax.convert.ppd` (``dit.*`` + ``sem_encoder.*`` in one
  safetensors file); the released DiT pickles and their encoders are combined once by
  ``geojax convert --family ppd ppd.pth DST --with depth_anything_v2_vitl.pth``;
- inference on images (:func:`predict`, image presets): each image resized to the official
  inference size (the area of 1024 x 768 at its aspect ratio, sides multiples of 16; box filter
  when shrinking, bicubic when enlarging), the Euler sampler (``--steps``, default 4) from
  ``--ensemble`` noise seeds (``--seed``; their mean), the result resized back (bilinear). The
  output is PPD's affine-normalised log-depth (``latent + 0.5``: 0 near, 1 far; not metric);
- ``--align-to WEIGHTS`` (any geojax model that predicts depth and cameras, e.g. DA3 or Pi3):
  that model's depth fixes the affine map in log space per image (least squares of
  ``log(1 + d)`` on its valid pixels, as the official point-cloud script places PPD depth with
  MoGe-2) and its cameras (or the given ones) lift the depth to a point cloud;
- video presets (PPVD) take the frames of a video (or a folder of frames of one size) as one
  sequence: 512 x 512 windows of 16 frames, keyframe replacement, one shared initial noise,
  least-squares alignment between windows (:func:`geojax.models.ppd.infer_video`).
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from geojax.models import ppd, ppd_pipeline
from geojax.models.registry import Family, PredictArg, config_overrides, register
from geojax.nn import resize
from geojax.predict.core import Prediction

AREA = 1024 * 768  # the official inference area


def build(config: dict[str, Any], rngs: nnx.Rngs) -> nnx.Module:
  return ppd_pipeline.PixelPerfectDepth.from_preset(config["preset"], rngs=rngs,
                                                    **config_overrides(config))


def load_official(path: str, config: dict[str, Any]) -> nnx.Module:
  """Converted official weights (``dit.*`` + ``sem_encoder.*``); the preset from
  ``config.json``, from ``config`` or from the tensors."""
  from geojax.convert import ppd as conv
  from geojax.convert.torch_layout import read_safetensors
  sd, ref = read_safetensors(path, "ppd")
  ref = dict(ref or {})
  if config.get("preset"):
    ref["model_name"] = config["preset"]
  return conv.pipeline_from_torch_state_dict(
      sd, conv.pipeline_config(ref, sd.keys(), **config_overrides(config)))


def identify_official(path: str) -> str | None:
  from geojax.convert import ppd as conv
  from geojax.convert.torch_layout import safetensors_keys
  try:
    keys = set().union(*safetensors_keys(path))
  except Exception:  # unreadable as safetensors: not ours
    return None
  found = conv.identify_pipeline(keys)
  cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else ""
  if found and os.path.isfile(cfg_path):  # a conversion names its preset (e.g. ppd-tiny)
    with open(cfg_path, encoding="utf-8") as f:
      name = json.load(f).get("model_name")
    if name in ppd_pipeline.PRESETS:
      return name
  return found


def convert_state_dict(checkpoint: Any, encoder: Any = None):
  """``geojax convert``: the DiT checkpoint (+ ``--with`` the encoder's) -> tensors, config."""
  from geojax.convert import ppd as conv
  return conv.pipeline_checkpoint(checkpoint, encoder)


def predicts(config: dict[str, Any]) -> tuple[str, ...]:
  return ("depth",)


def _resize_image(im: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """uint8 ``(H, W, 3)`` -> ``hw``: box filter when shrinking (cv2 INTER_AREA in the official
  script), bicubic when enlarging."""
  if im.shape[:2] == tuple(hw):
    return im
  shrink = hw[0] * hw[1] < im.shape[0] * im.shape[1]
  return np.asarray(Image.fromarray(im).resize((hw[1], hw[0]),
                                               Image.BOX if shrink else Image.BICUBIC))


@functools.lru_cache(maxsize=8)
def _image_sampler(steps: int):
  return nnx.jit(lambda m, x, n: ppd_pipeline.depth(m, x, n, steps=steps))


@functools.lru_cache(maxsize=2)
def _align_model(path: str):
  """The reference model of ``--align-to`` and its predictor (outputs at the input size)."""
  from geojax.models import registry
  from geojax.predict import weights
  model, _ = weights.load_model(path)
  fam = registry.family_of(model)
  if fam.name == "ppd":
    raise ValueError(f"--align-to {path}: a PPD model has no scale to align to; pass a model "
                     "that predicts depth and cameras (DA3, Pi3, DAGE)")
  return fam.get_predictor(model, dict(fam.eval_options))


def log_affine_fit(pred: np.ndarray, ref_depth: np.ndarray) -> tuple[float, float]:
  """Least-squares ``(a, b)`` with ``a * pred + b ~ log(1 + ref_depth)`` over pixels where
  ``ref_depth > 0`` and both are finite (the evaluation's log-space alignment)."""
  ok = np.isfinite(pred) & np.isfinite(ref_depth) & (ref_depth > 0)
  if ok.sum() < 2:
    raise ValueError("--align-to: the reference model gave fewer than 2 valid depth pixels")
  x = pred[ok].astype(np.float64)
  y = np.log1p(ref_depth[ok].astype(np.float64))
  a_mat = np.stack([x, np.ones_like(x)], -1)
  (a, b), *_ = np.linalg.lstsq(a_mat, y, rcond=None)
  return float(a), float(b)


def _check_options(steps, ensemble) -> None:
  if int(steps) < 1:
    raise ValueError(f"--steps must be >= 1; got {steps}")
  if int(ensemble) < 1:
    raise ValueError(f"--ensemble must be >= 1; got {ensemble}")


def predict(model: nnx.Module, images: list[np.ndarray], *, extrinsics: np.ndarray | None = None,
            intrinsics: np.ndarray | None = None, names: list[str] | None = None,
            mesh: jax.sharding.Mesh | None = None, steps: int = 4, seed: int = 0,
            ensemble: int = 1, align_to: str | None = None, area: int = AREA) -> Prediction:
  """PPD on each image, or PPVD on the frames as one video (module docstring). ``area``: pixels
  of the image model's inference size."""
  _check_options(steps, ensemble)
  if int(area) < ppd.GRID * ppd.GRID:
    raise ValueError(f"--area must be at least {ppd.GRID * ppd.GRID} pixels; got {area}")
  names = list(names) if names is not None else [f"view {i}" for i in range(len(images))]
  t0 = time.perf_counter()
  if model.video:
    rel, pixels = _predict_video(model, images, steps=int(steps), seed=int(seed),
                                 ensemble=int(ensemble))
  else:
    rel, pixels = _predict_images(model, images, steps=int(steps), seed=int(seed),
                                  ensemble=int(ensemble), area=int(area))
  seconds = time.perf_counter() - t0
  depth, ks, exts, warn = rel, None, None, []
  if align_to:
    depth, ks, exts = _align(rel, pixels, align_to, intrinsics, extrinsics)
  elif intrinsics is not None:
    warn.append("PPD depth is affine in log space; pass --align-to WEIGHTS (a model with "
                "depth and cameras) for a metric point cloud")
  pred = Prediction(depth=depth.astype(np.float32), depth_conf=None, extrinsics=exts,
                    intrinsics=ks, world_points=None, images=pixels, names=names,
                    input_hw=[tuple(im.shape[:2]) for im in images], seconds=seconds,
                    extras={"log_depth": rel.astype(np.float32)} if align_to else {})
  pred.warnings.extend(warn)
  return pred


def _predict_images(model, images, *, steps: int, seed: int, ensemble: int, area: int):
  sampler = _image_sampler(steps)
  out = []
  for i, im in enumerate(images):
    h, w = im.shape[:2]
    ph, pw = ppd.process_size(h, w, area)
    x = jnp.asarray(_resize_image(im, (ph, pw))[None].astype(np.float32) / 255.0)
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), i),
                              (ensemble, 1, ph, pw))
    d = sampler(model, x, noise)
    out.append(np.asarray(resize.resize_bilinear(d[..., None], (h, w)))[0, ..., 0])
  return np.stack(out), np.stack(images)


def _predict_video(model, frames, *, steps: int, seed: int, ensemble: int):
  shapes = {f.shape for f in frames}
  if len(shapes) != 1:
    raise ValueError(f"PPVD needs the frames of one video at one size; got sizes "
                     f"{sorted(s[:2] for s in shapes)}")
  size = model.dit.cfg.size
  x = np.stack(frames).astype(np.float32) / 255.0
  sem = nnx.jit(lambda m, w: m.semantics(w))
  sampler = nnx.jit(lambda m, w, s, n: ppd.sample(m, w, s, steps=steps, noise=n))
  runs = []
  for e in range(ensemble):
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), e),
                              (ppd.WINDOW, size, size))
    runs.append(ppd.infer_video(model.dit, x, lambda w: sem(model, jnp.asarray(w)),
                                steps=steps, noise=noise, sampler=sampler))
  return np.mean(runs, 0), np.stack(frames)


def _align(rel, pixels, path, intrinsics, extrinsics):
  """Depth from PPD's log-depth through the reference model's depth; cameras from it (or the
  given ones)."""
  ref = _align_model(path)(np.asarray(pixels))
  ab = [log_affine_fit(r, d) for r, d in zip(rel, ref["depth"])]
  depth = np.stack([np.maximum(np.expm1(a * r + b), 0.0) for (a, b), r in zip(ab, rel)])
  if intrinsics is not None:
    return depth, intrinsics, extrinsics
  if ref.get("intrinsics") is None or ref.get("extrinsics") is None:
    raise ValueError(f"--align-to {path}: that model predicts no cameras; pass one that does "
                     "(DA3, Pi3, DAGE) or give the cameras")
  return depth, np.asarray(ref["intrinsics"]), np.asarray(ref["extrinsics"])


PREDICT_ARGS = (
    PredictArg(("--area",), dict(type=int, default=AREA,
                                 help="PPD: pixels of the inference size (official 786432 = "
                                      "1024 x 768; aspect ratio kept, sides multiples of 16)")),
    PredictArg(("--steps",), dict(type=int, default=4,
                                  help="PPD: Euler sampling steps (official 4)")),
    PredictArg(("--seed",), dict(type=int, default=0, help="PPD: seed of the initial noise")),
    PredictArg(("--ensemble",), dict(type=int, default=1,
                                     help="PPD: average the depth of N noise seeds")),
    PredictArg(("--align-to",), dict(default=None, metavar="WEIGHTS",
                                     help="PPD: a geojax model with depth and cameras (DA3, "
                                          "Pi3, DAGE) whose depth fixes PPD's log-depth scale "
                                          "and whose cameras place the point cloud")),
)


FAMILY = register(Family(
    name="ppd", build=build, predict=predict, predicts=predicts, load_official=load_official,
    presets=ppd_pipeline.PRESET_NAMES, model_types=(ppd_pipeline.PixelPerfectDepth,),
    identify_official=identify_official, convert_state_dict=convert_state_dict,
    predict_args=PREDICT_ARGS, eval_options=dict(steps=4, seed=0, ensemble=1, area=AREA)))
