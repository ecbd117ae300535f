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
  ``--ensemble`` noise seeds (``--seed``, option ``noise_seed``; their mean), the result resized back (bilinear). The
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

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from geojax.models import ppd, ppd_pipeline
from geojax.models.registry import Demo, Family, PredictArg, config_overrides, register
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
  model, _ = weights.load_model(path, option="--align-to")
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
            mesh: jax.sharding.Mesh | None = None, steps: int = 4, noise_seed: int = 0,
            ensemble: int = 1, align_to: str | None = None, area: int = AREA) -> Prediction:
  """PPD on each image, or PPVD on the frames as one video (module docstring). ``area``: pixels
  of the image model's inference size."""
  _check_options(steps, ensemble)
  if align_to is not None and not os.path.exists(align_to):  # before any compilation
    raise ValueError(f"--align-to {align_to}: no such file or directory")
  if int(area) < ppd.GRID * ppd.GRID:
    raise ValueError(f"--area must be at least {ppd.GRID * ppd.GRID} pixels; got {area}")
  names = list(names) if names is not None else [f"view {i}" for i in range(len(images))]
  t0 = time.perf_counter()
  if model.video:
    rel, pixels = _predict_video(model, images, steps=int(steps), seed=int(noise_seed),
                                 ensemble=int(ensemble))
  else:
    rel, pixels = _predict_images(model, images, steps=int(steps), seed=int(noise_seed),
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


# ------------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class PPDTask:
  """PPD / PPVD training (``configs/ppd.py``; reference ``ppd.md`` section 3).

  A batch holds ``B`` samples of ``S`` views (uint8 images, metric depth, validity). Depth that
  is invalid, non-finite or not positive is masked, and the non-finite pixels are counted
  (``nonfinite_px``), so a bad sample never turns into a NaN step. The frozen encoder's
  semantics carry no gradient. Images (``video=False``, ``S = 1``): the official loss
  (:func:`geojax.losses.ppd.flow_matching_loss`) over the batch. Video (``video=True``):
  every sample is one window of ``S`` frames, with one timestep and one depth normalisation
  per window (geojax's recipe), averaged over the windows."""
  video: bool = False
  pretrain: bool = False
  grad_weight: float = 0.2
  loc: float = 0.0
  scale: float = 1.0
  family: str = "ppd"

  def loss_fn(self, model, batch: dict[str, Any], rng: jax.Array
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    from geojax.losses import ppd as L
    images = jnp.asarray(batch["images"], jnp.float32) / 255.0
    depth = jnp.asarray(batch["depth"], jnp.float32)
    finite = jnp.isfinite(depth)
    mask = jnp.asarray(batch["valid"], bool) & finite & (depth > 0)
    depth = jnp.where(mask, depth, 0.0)
    kw = dict(pretrain=self.pretrain, grad_weight=self.grad_weight, loc=self.loc,
              scale=self.scale)
    if self.video:
      outs = []
      for i in range(images.shape[0]):  # one window per sample: the video DiT's batch
        x = images[i]
        outs.append(L.flow_matching_loss(model.dit, x, model.semantics(x), depth[i], mask[i],
                                         key=jax.random.fold_in(rng, i), window=True, **kw))
      parts = {k: jnp.mean(jnp.stack([o[k] for o in outs])) for k in ("mse", "grad", "total")}
    else:
      x = images[:, 0]
      parts = L.flow_matching_loss(model.dit, x, model.semantics(x), depth[:, 0], mask[:, 0],
                                   key=rng, **kw)
    aux = {"mse": parts["mse"], "grad": parts["grad"],
           "nonfinite_px": jnp.sum(~finite).astype(jnp.float32),
           "valid_frac": jnp.mean(mask.astype(jnp.float32))}
    return parts["total"], aux


def make_task(config) -> PPDTask:
  """:class:`PPDTask` from ``config.model.preset`` and ``config.loss``; the pipeline must give
  single images (PPD) or windows of frames at the video DiT's size (PPVD)."""
  preset = config.model.preset
  cfg = ppd_pipeline.get_config(preset)
  pipe = config.data.pipeline
  buckets = [tuple(int(v) for v in b) for b in pipe.get("buckets", ())]
  if any(h % ppd.GRID or w % ppd.GRID for h, w in buckets):
    raise ValueError(f"PPD trains on sizes that are multiples of {ppd.GRID}; "
                     f"data.pipeline.buckets = {buckets}")
  lo, hi = int(pipe.get("min_views", 1)), int(pipe.get("max_views", 1))
  if cfg.video:
    size = cfg.dit.size
    if any(b != (size, size) for b in buckets):
      raise ValueError(f"PPVD trains on {size} x {size} windows: data.pipeline.buckets must be "
                       f"(({size}, {size}),); got {buckets}")
    if lo != hi or lo < cfg.dit.ref_frames:
      raise ValueError(f"PPVD trains on windows of a fixed number (>= {cfg.dit.ref_frames}) of "
                       f"frames: set data.pipeline.min_views = max_views (16 as released); got "
                       f"{lo}..{hi}")
  elif lo != 1 or hi != 1:
    raise ValueError("PPD trains on single images: set data.pipeline.min_views = max_views = 1")
  loss = dict(config.get("loss", {}))
  unknown = sorted(set(loss) - {"pretrain", "grad_weight", "loc", "scale"})
  if unknown:
    raise ValueError(f"config.loss has unknown fields {unknown}; expected pretrain, "
                     "grad_weight, loc, scale")
  return PPDTask(video=cfg.video, pretrain=bool(loss.get("pretrain", False)),
                 grad_weight=float(loss.get("grad_weight", 0.2)),
                 loc=float(loss.get("loc", 0.0)), scale=float(loss.get("scale", 1.0)))


def model_config(mconfig) -> dict[str, Any]:
  """The stored model config: the preset and runtime fields."""
  from geojax.train.trainer import DTYPES
  if mconfig.dtype not in DTYPES:
    raise ValueError(f"model.dtype must be one of {tuple(DTYPES)}; got {mconfig.dtype!r}")
  over = dict(attn_impl=mconfig.attn_impl, remat=mconfig.remat, scan=bool(mconfig.scan))
  if DTYPES[mconfig.dtype]:
    over["dtype"] = DTYPES[mconfig.dtype]
  return {"preset": mconfig.preset, "overrides": over}


def init_training_start(dit, seed: int = 0):
  """A copy of the DiT at the official training initialisation (reference ``ppd.md`` section
  1): xavier-uniform linears and patch embedding (as a linear) with zero biases, N(0, 0.02)
  timestep MLP weights, zero adaLN modulations and final linear; norms as built (the video
  DiT's position table is fixed)."""
  from geojax.convert import ppd as conv
  sd = conv.to_torch_state_dict(dit)
  rng = np.random.default_rng(seed)
  for k in sorted(sd):
    v = sd[k]
    if k == conv.POS_EMBED or not k.endswith(".weight") or v.ndim < 2:
      continue
    bias = k[:-len("weight")] + "bias"
    if "adaLN_modulation" in k or k.startswith("final_layer.linear."):
      new = np.zeros_like(v)
    elif k.startswith("t_embedder.mlp."):
      new = rng.normal(0.0, 0.02, v.shape)
    else:
      fan_out, fan_in = v.shape[0], int(np.prod(v.shape[1:]))
      a = math.sqrt(6.0 / (fan_in + fan_out))
      new = rng.uniform(-a, a, v.shape)
    sd[k] = new.astype(np.float32)
    if bias in sd:
      sd[bias] = np.zeros_like(sd[bias])
  return conv.from_torch_state_dict(sd, dit.cfg, strict_unexpected=True)


# PPD DiT parts that start PPVD (geojax's recipe): the proj_fusion MLP (wider input) and the
# temporal blocks are PPVD's own.
_FROM_PPD = ("x_embedder.", "t_embedder.", "blocks.", "final_layer.")


def _encoder_weights(path: str, cfg) -> nnx.Module:
  from geojax.convert import ppd as conv
  from geojax.convert.torch_layout import read_safetensors
  if not os.path.exists(path):
    raise FileNotFoundError(f"init.semantics {path}: no such file or directory")
  sd, _ = read_safetensors(path, "ppd")
  if any(k.startswith(conv.SEM) for k in sd):  # a converted whole model
    sd = {k[len(conv.SEM):]: v for k, v in sd.items() if k.startswith(conv.SEM)}
  kind = conv.semantics_kind(sd)
  if kind != cfg.kind:
    raise ValueError(f"init.semantics {path}: holds a {kind or 'unknown'} encoder; this preset "
                     f"is prompted by {cfg.kind!r}")
  try:
    return conv.semantics_from_torch_state_dict(sd, cfg)
  except ValueError as e:
    raise ValueError(f"init.semantics {path}: {e}") from None


def initialize(model: nnx.Module, init) -> nnx.Module | None:
  """The training start (``configs/ppd.py``): the DiT at the official initialisation
  (:func:`init_training_start`); for PPVD with ``init.ppd``, the spatial blocks, embedders and
  final layer copied from that PPD's DiT; the frozen encoder from ``init.semantics`` (required
  for the released presets). ``init.weights`` / ``init.checkpoint`` (fine-tuning a whole model)
  are left as they are and exclude both."""
  sem_path, ppd_path = init.get("semantics", ""), init.get("ppd", "")
  if init.get("weights") or init.get("checkpoint"):
    if sem_path or ppd_path:
      raise ValueError("init: init.semantics / init.ppd start a new model; they exclude "
                       "init.weights and init.checkpoint")
    return None
  cfg = model.cfg
  if not sem_path and not cfg.dit.semantics.endswith("-tiny"):
    raise ValueError(f"init.semantics is required: the {cfg.semantics.kind!r} encoder that "
                     "prompts this preset must hold its released weights (a converted PPD "
                     "directory, or the encoder converted with `geojax convert --family ppd "
                     "--tensors-only`)")
  if ppd_path and not cfg.video:
    raise ValueError("init.ppd starts a PPVD from a PPD; this preset is an image model")
  dit = init_training_start(model.dit)
  if ppd_path:
    dit = _from_ppd(dit, ppd_path)
  enc = _encoder_weights(sem_path, cfg.semantics) if sem_path else model.sem_encoder
  note = (f"encoder from {sem_path}" if sem_path else
          "the tiny encoder at its random initialisation (frozen)")
  print(f"PPD init: DiT at the official initialisation{' + PPD ' + ppd_path if ppd_path else ''}"
        f", {note}", flush=True)
  return ppd_pipeline.PixelPerfectDepth(dit, enc)


def _from_ppd(dit, path: str):
  """``dit`` (a PPVD) with :data:`_FROM_PPD` copied from the image DiT of PPD weights."""
  from geojax.convert import ppd as conv
  from geojax.predict import weights
  if not os.path.exists(path):
    raise FileNotFoundError(f"init.ppd {path}: no such file or directory")
  try:
    src, _ = weights.load_model(path)
  except ValueError as e:
    raise ValueError(f"init.ppd {path}: {e}") from None
  if not isinstance(src, ppd_pipeline.PixelPerfectDepth) or src.video:
    raise ValueError(f"init.ppd {path}: not PPD (image) weights")
  have = conv.to_torch_state_dict(src.dit)
  sd = conv.to_torch_state_dict(dit)
  copied = 0
  for k in sd:
    if k.startswith(_FROM_PPD):
      if k not in have or have[k].shape != sd[k].shape:
        raise ValueError(f"init.ppd {path}: its DiT does not fit this PPVD ({k}: "
                         f"{None if k not in have else have[k].shape} vs {sd[k].shape})")
      sd[k] = have[k]
      copied += 1
  print(f"PPVD init: {copied} tensors from PPD {path}", flush=True)
  return conv.from_torch_state_dict(sd, dit.cfg, strict_unexpected=True)


PREDICT_ARGS = (
    PredictArg(("--area",), dict(type=int, default=AREA,
                                 help="PPD: pixels of the inference size (official 786432 = "
                                      "1024 x 768; aspect ratio kept, sides multiples of 16)")),
    PredictArg(("--steps",), dict(type=int, default=4,
                                  help="PPD: Euler sampling steps (official 4)")),
    PredictArg(("--seed",), dict(type=int, default=0, dest="noise_seed",
                                 help="PPD: seed of the initial noise")),
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
    predict_args=PREDICT_ARGS, make_task=make_task, model_config=model_config,
    initialize=initialize, depth_align="log_affine", eval_options=dict(steps=4, noise_seed=0, ensemble=1, area=AREA),
    demo=Demo(config_arg="runlocal", rows=(
        ("depth AbsRel, log-space aligned (lower is better)", "abs_rel"),
        ("depth delta1 (higher is better)", "delta1"),
        ("edge-CD (A) (lower is better)", "edge_chamfer"),
        ("flying-pixel ratio at depth edges (lower)", "edge_flying_ratio")))))
