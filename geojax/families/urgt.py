"""The URGT family (high-resolution depth and normals refined from coarse priors): build, load,
run.

- network: :mod:`geojax.models.urgt` (preset ``urgt`` = the released ``VGGT_Joint``;
  geojax-only ``urgt-tiny``);
- official weights: :mod:`geojax.convert.urgt` (safetensors of ``VGGT_Joint`` or ``URGTModel``
  keys, a file or a directory); the released ``ckpt_best.pth`` / ``ckpt_promask_best.pth``
  (pickles with the weights under ``model_state_dict``) go through
  ``geojax convert --family urgt`` once;
- inference (:func:`predict`): each image on its own (URGT is a single-image model; the views of
  a folder are refined one after another). The priors (:func:`make_prior`) are computed at the
  input size, then image and priors are resized (bilinear) to the aligned size, a multiple of
  ``--patch-split`` per side, as the official ``tools/infer.py`` does, and
  :func:`geojax.models.urgt.refine` cuts, refines and stitches.

**Priors.** The released weights were trained on Depth-Anything-V2 relative depth (min-max
normalised disparity) and Metric3D-v2 normals. geojax runs neither; instead

- the depth prior comes from any geojax depth model (``--prior-weights``: DA3 mono / metric /
  any-view on one view, Pi3, DAGE): its depth ``d`` becomes disparity ``1 / d`` (0 where ``d`` is
  invalid, e.g. sky) and is min-max normalised over the image, as the official pipeline
  normalises DAv2's output; or from a user ``.npy`` (``--depth-prior``: a file for one image or
  a folder of ``<stem>.npy``), disparity-like by default (``--depth-prior-kind depth`` takes
  depth and inverts it), divided by its maximum as the official script does;
- the normal prior comes from a user ``.npy`` (``--normal-prior``, ``(H, W, 3)`` in [-1, 1], in
  the channel order of the normals the weights were trained with), or else is derived from the
  depth prior by a 5 x 5 least-squares plane fit (:func:`geojax.geometry.normals
  .normals_from_depth`) at a working resolution of at most 1024 pixels per side, with the prior
  model's intrinsics (a 60-degree field of view when it predicts none). These normals are in
  OpenCV camera axes facing the camera; that Metric3D-v2's are too is an assumption.

Priors are coarser than the official ones (and DA3 disparity is not DAv2 disparity), so the
official weights refine them less well than the paper's numbers suggest; the network and the
refinement are exact.

**Outputs.** The network refines in the prior's normalised-disparity space; geojax maps the
result back with the prior's own affine map (``v * (max - min) + min`` for model priors,
``v * max`` for user priors) and inverts it to depth, so that a zero offset reproduces the prior
depth (in the prior model's units). Pixels whose refined disparity is not positive get depth 0.
``Prediction.extras`` holds ``relative`` (the refined map in the network's space, what the
official script saves as ``*_depth_pred.npy``), ``prior_depth`` (the prior as depth) and
``prior_normals``; normals are re-normalised (the official script does the same after reversing
the channels). The cameras are the prior model's when it predicts them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geojax.geometry.normals import normals_from_depth
from geojax.models import urgt
from geojax.models.registry import (Demo, Family, PredictArg, config_overrides, register,
                                    resize_map)
from geojax.models.runner import compiled_call
from geojax.predict.core import Prediction, assumed_intrinsics

PRIOR_KINDS = ("disparity", "depth")
NORMAL_WORK_SIZE = 1024  # longest side at which normals are fitted to the depth prior
PRIOR_SIZE = 504  # training priors from a model: its input's longest side (DA3's default)
MIN_PATCH = urgt.PATCH  # smallest native patch side (pixels)


def build(config: dict[str, Any], rngs: nnx.Rngs) -> nnx.Module:
  return urgt.URGT.from_preset(config["preset"], rngs=rngs, **config_overrides(config))


def load_official(path: str, config: dict[str, Any]) -> nnx.Module:
  """Official-layout weights; ``config.json`` (or ``config["preset"]``, e.g. ``geojax convert
  --preset urgt-tiny``) gives the configuration, else the released ``urgt``."""
  from geojax.convert.urgt import load_official as load
  preset = config.get("preset")
  cfg = urgt.get_config(preset, **config_overrides(config)) if preset else None
  return load(path, cfg, **({} if preset else config_overrides(config)))


def identify_official(path: str) -> str | None:
  """The preset of official URGT weights at ``path`` (``config.json``'s sizes, or ``urgt``
  without one; ``""`` for sizes no preset has), or None for other weights."""
  import json

  from geojax.convert.urgt import config_from_reference, is_official
  try:
    if not is_official(path):
      return None
  except Exception:  # unreadable as safetensors: not ours
    return None
  cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else ""
  if not os.path.isfile(cfg_path):
    return "urgt"
  with open(cfg_path, encoding="utf-8") as f:
    cfg = config_from_reference(json.load(f))
  return next((name for name in urgt.PRESET_NAMES if urgt.get_config(name) == cfg), "")


def convert_state_dict(checkpoint: Any):
  """An official checkpoint -> tensors: the released files keep the ``URGTModel`` state dict
  (``vggt.``-prefixed keys) under ``model_state_dict``; a bare state dict works too."""
  from geojax.convert.torch_layout import checkpoint_tensors
  if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model_state_dict"), dict):
    checkpoint = checkpoint["model_state_dict"]
  return checkpoint_tensors(checkpoint, "URGT")[0]


def predicts(config: dict[str, Any]) -> tuple[str, ...]:
  return ("depth", "normals", "patches")


# ------------------------------------------------------------------------------------- priors


@dataclasses.dataclass
class Prior:
  """Coarse priors of one image at its input size, in the network's space.

  ``depth`` ``(H, W)``: normalised disparity (``disparity = depth * scale + shift``);
  ``normal`` ``(H, W, 3)`` unit normals; ``intrinsics`` ``(3, 3)`` / ``extrinsics`` ``(4, 4)``
  of the prior model, when it predicts cameras; ``source``: where the depth prior came from."""
  depth: np.ndarray
  normal: np.ndarray
  scale: float
  shift: float
  source: str
  intrinsics: np.ndarray | None = None
  extrinsics: np.ndarray | None = None

  def to_depth(self, v: np.ndarray) -> np.ndarray:
    """Network-space values -> z-depth (0 where the disparity is not positive)."""
    disp = np.asarray(v, np.float64) * self.scale + self.shift
    with np.errstate(divide="ignore"):
      return np.where(disp > 0, 1.0 / np.maximum(disp, 1e-300), 0.0).astype(np.float32)


def _finite(name: str, a: np.ndarray) -> np.ndarray:
  bad = ~np.isfinite(a)
  if bad.any():
    raise ValueError(f"{name}: {int(bad.sum())} non-finite values; priors must be finite")
  return a


def _fit_size(name: str, a: np.ndarray, hw: tuple[int, int], channels: int) -> np.ndarray:
  """A user prior at the image's size (or its aspect ratio: resized bilinearly, as the official
  script does)."""
  h, w = hw
  want = "(H, W)" if channels == 1 else "(H, W, 3)"
  if channels == 1 and a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if (channels == 1 and a.ndim != 2) or (channels == 3 and (a.ndim != 3 or a.shape[-1] != 3)):
    raise ValueError(f"{name}: expected an array {want} for a {w}x{h} image; got shape "
                     f"{a.shape}")
  ah, aw = a.shape[:2]
  if (ah, aw) != (h, w):
    if min(ah, aw) < 2 or abs(aw / ah - w / h) > 0.01 * (w / h):
      raise ValueError(f"{name}: a {aw}x{ah} prior does not fit the {w}x{h} image (expected "
                       f"{want} = ({h}, {w}) or the same aspect ratio)")
    a = resize_map(a.astype(np.float32)[None], h, w)[0]
  return _finite(name, a.astype(np.float32))


def _user_file(spec: str | None, name: str, what: str) -> str | None:
  """The ``.npy`` of view ``name``: ``spec`` itself or ``spec/<stem>.npy``."""
  if spec is None:
    return None
  if os.path.isdir(spec):
    stem = os.path.splitext(os.path.basename(name))[0]
    path = os.path.join(spec, stem + ".npy")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"--{what} {spec}: no {stem}.npy for view {name}")
    return path
  if not os.path.isfile(spec):
    raise FileNotFoundError(f"--{what} {spec}: no such file or directory")
  return spec


def _load_npy(path: str, what: str) -> np.ndarray:
  try:
    return np.load(path, allow_pickle=False)
  except Exception as e:  # many reader errors
    raise ValueError(f"--{what} {path}: not a readable .npy array ({type(e).__name__}: "
                     f"{' '.join(str(e).split())[:120]})") from None


@functools.lru_cache(maxsize=2)
def load_prior_model(path: str) -> tuple[nnx.Module, Any]:
  """A geojax depth model for the depth prior and its predictor (cached per path)."""
  from geojax.models import registry
  from geojax.predict import weights
  if not path:
    raise ValueError("--prior-weights is empty")
  model, _ = weights.load_model(path, option="--prior-weights")
  fam = registry.family_of(model)
  if fam.name == "urgt":
    raise ValueError(f"--prior-weights {path}: a URGT model gives no coarse depth; pass a depth "
                     "model (DA3, Pi3, DAGE)")
  opts = dict(fam.eval_options)
  return model, fam.get_predictor(model, opts)


def _normals_for(depth: np.ndarray, k: np.ndarray) -> np.ndarray:
  """Camera-frame normals fitted to ``depth`` ``(H, W)`` at a working resolution."""
  h, w = depth.shape
  f = min(1.0, NORMAL_WORK_SIZE / max(h, w))
  hh, ww = max(3, round(h * f)), max(3, round(w * f))
  d = depth if (hh, ww) == (h, w) else resize_map(np.where(depth > 0, depth, np.nan)[None],
                                                  hh, ww)[0]
  kk = np.array(k, np.float64)
  kk[0] *= ww / w
  kk[1] *= hh / h
  kk[0, 2] += 0.5 * ww / w - 0.5
  kk[1, 2] += 0.5 * hh / h - 0.5
  d = np.where(np.isfinite(d), d, 0.0).astype(np.float32)
  n, ok = normals_from_depth(jnp.asarray(d), jnp.asarray(kk, jnp.float32), window=5)
  n = np.where(np.asarray(ok)[..., None], np.asarray(n), np.array([0, 0, -1], np.float32))
  n = resize_map(n[None], h, w)[0]
  return (n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def make_prior(image: np.ndarray, name: str, *, prior_weights: str | None = None,
               depth_prior: str | None = None, normal_prior: str | None = None,
               depth_prior_kind: str = "disparity") -> Prior:
  """The coarse priors of one uint8 image ``(H, W, 3)`` (module docstring)."""
  h, w = image.shape[:2]
  if depth_prior_kind not in PRIOR_KINDS:
    raise ValueError(f"--depth-prior-kind must be one of {PRIOR_KINDS}; got "
                     f"{depth_prior_kind!r}")
  k = ext = None
  dfile = _user_file(depth_prior, name, "depth-prior")
  if dfile is not None:
    raw = _fit_size(dfile, _load_npy(dfile, "depth-prior"), (h, w), 1).astype(np.float64)
    if depth_prior_kind == "depth":
      with np.errstate(divide="ignore"):
        raw = np.where(raw > 0, 1.0 / np.maximum(raw, 1e-300), 0.0)
    top = float(raw.max())
    if top <= 0:
      raise ValueError(f"{dfile}: the depth prior has no positive value")
    scale, shift = top + 1e-8, 0.0  # the official user-prior normalisation, d / (max + 1e-8)
    source = dfile
  elif prior_weights:
    _, predictor = load_prior_model(prior_weights)
    out = predictor(image[None])
    d = np.asarray(out["depth"][0], np.float64)
    valid = np.isfinite(d) & (d > 0)
    if not valid.any():
      raise ValueError(f"--prior-weights {prior_weights}: the prior model gave no valid depth "
                       f"for {name}")
    raw = np.where(valid, 1.0 / np.where(valid, d, 1.0), 0.0)
    lo, hi = float(raw.min()), float(raw.max())
    scale, shift = hi - lo + 1e-8, lo  # the official (d - min) / (max - min + 1e-8)
    if "intrinsics" in out:
      k = np.asarray(out["intrinsics"][0], np.float32)
      ext = np.asarray(out["extrinsics"][0], np.float32)
    source = prior_weights
  else:
    raise ValueError("URGT refines a coarse depth prior: pass --prior-weights (a geojax depth "
                     "model, e.g. a DA3 checkpoint) or --depth-prior FILE.npy")
  depth = ((raw - shift) / scale).astype(np.float32)
  nfile = _user_file(normal_prior, name, "normal-prior")
  if nfile is not None:
    normal = _fit_size(nfile, _load_npy(nfile, "normal-prior"), (h, w), 3)
  else:
    zdepth = Prior(depth, np.zeros((h, w, 3), np.float32), scale, shift, source).to_depth(depth)
    normal = _normals_for(zdepth, k if k is not None else assumed_intrinsics(1, h, w)[0])
  normal = normal / (np.linalg.norm(normal, axis=-1, keepdims=True) + 1e-12)
  return Prior(depth, normal.astype(np.float32), scale, shift, source, k, ext)


# ---------------------------------------------------------------------------------- inference


def _refine_fn(model, image, depth, normal, *, patch_split, overlap, crop_size, rope_positions):
  out = urgt.refine(model, image, depth, normal, patch_split=patch_split, overlap=overlap,
                    crop_size=crop_size, rope_positions=rope_positions, return_patches=True)
  return {k: v for k, v in out.items() if k != "layout"}


def _options(patch_split, grid: bool, crop_size: int, rope_positions: str):
  split = tuple(int(v) for v in patch_split)
  if len(split) != 2 or min(split) < 1:
    raise ValueError(f"--patch-split takes two positive integers N_H N_W; got {patch_split}")
  if int(crop_size) < urgt.PATCH or int(crop_size) % urgt.PATCH:
    raise ValueError(f"--crop-size must be a positive multiple of {urgt.PATCH}; got {crop_size}")
  if rope_positions not in ("auto", "official", "true"):
    raise ValueError(f"--rope-positions must be auto, official or true; got {rope_positions!r}")
  return split, not grid, int(crop_size), rope_positions


def refine_image(model: urgt.URGT, image: np.ndarray, prior: Prior, name: str, *,
                 patch_split=(8, 8), grid: bool = False, crop_size: int = 518,
                 rope_positions: str = "auto") -> dict[str, Any]:
  """Refine one uint8 image ``(H, W, 3)`` with its priors at the aligned size; returns
  ``relative`` ``(h, w)``, ``normal`` ``(h, w, 3)``, the aligned ``pixels``, the priors at that
  size, ``patches`` (per-crop relative depth) with their ``boxes`` and ``seconds``."""
  split, overlap, p, rope = _options(patch_split, grid, crop_size, rope_positions)
  h0, w0 = image.shape[:2]
  h, w = urgt.aligned_size(h0, w0, split)
  if h // split[0] < MIN_PATCH or w // split[1] < MIN_PATCH:
    raise ValueError(f"{name}: a {w0}x{h0} image is too small for --patch-split {split[0]} "
                     f"{split[1]} (native patches of {w0 // split[1]}x{h0 // split[0]} pixels; "
                     f"at least {MIN_PATCH}x{MIN_PATCH} needed)")
  layout = urgt.crop_layout((h, w), split, overlap=overlap)
  if rope == "auto":  # the released weights' layout where it exists
    rope = "official" if layout.grid[0] == layout.grid[1] else "true"
  pix = resize_map(image[None].astype(np.float32), h, w)[0]
  dprior = resize_map(prior.depth[None], h, w)[0]
  nprior = resize_map(prior.normal[None], h, w)[0]
  nprior = nprior / (np.linalg.norm(nprior, axis=-1, keepdims=True) + 1e-12)
  args = (jnp.asarray(pix[None] / 255.0), jnp.asarray(dprior[None]), jnp.asarray(nprior[None]))
  static = (("crop_size", p), ("overlap", overlap), ("patch_split", split),
            ("rope_positions", rope))
  exe = compiled_call(model, static, args, fn=_refine_fn)
  t0 = time.perf_counter()
  out = jax.device_get(jax.block_until_ready(exe(*args)))
  seconds = time.perf_counter() - t0
  normal = np.asarray(out["normal"][0], np.float32)
  normal = normal / np.maximum(np.linalg.norm(normal, axis=-1, keepdims=True), 1e-12)
  pixels = np.clip(np.rint(pix), 0, 255).astype(np.uint8)
  return dict(relative=np.asarray(out["depth"][0], np.float32), normal=normal, pixels=pixels,
              prior_depth=dprior, prior_normal=nprior,
              patches=np.asarray(out["depth_patches"][0], np.float32), boxes=layout.boxes,
              seconds=seconds)


def _refine_views(model, images, names, *, extrinsics, mesh, patch_split, grid, crop_size,
                  rope_positions, prior_weights=None, depth_prior=None, normal_prior=None,
                  depth_prior_kind="disparity", priors=None):
  """Priors and refinement of every view (:func:`refine_image` rows with their ``prior``);
  ``priors``: ready :class:`Prior` objects, one per view (evaluation with GT-made priors)."""
  if extrinsics is not None:
    raise ValueError("URGT takes no cameras (it refines one image at a time); drop the poses")
  if mesh is not None:
    raise ValueError("--view-devices does not apply to URGT in geojax predict; split its crops "
                     "over devices from Python (geojax.models.urgt module docstring)")
  sizes = sorted({tuple(im.shape[:2]) for im in images})
  if len(sizes) > 1:
    raise ValueError(f"the images differ in size ({sizes}); URGT refines images one at a "
                     "time: pass them separately")
  for flag, spec in (("--depth-prior", depth_prior), ("--normal-prior", normal_prior)):
    if spec and os.path.isfile(spec) and len(images) > 1:
      raise ValueError(f"{flag} {spec} is one file for {len(images)} images; pass a folder of "
                       "<stem>.npy files")
  rows = []
  for i, (im, name) in enumerate(zip(images, names)):
    prior = priors[i] if priors is not None else make_prior(
        im, name, prior_weights=prior_weights, depth_prior=depth_prior,
        normal_prior=normal_prior, depth_prior_kind=depth_prior_kind)
    r = refine_image(model, im, prior, name, patch_split=patch_split, grid=grid,
                     crop_size=crop_size, rope_positions=rope_positions)
    r["prior"] = prior
    rows.append(r)
  return rows


def predict(model: nnx.Module, images: list[np.ndarray], *, extrinsics: np.ndarray | None = None,
            intrinsics: np.ndarray | None = None, names: list[str] | None = None,
            mesh: jax.sharding.Mesh | None = None, patch_split=(8, 8), grid: bool = False,
            crop_size: int = 518, rope_positions: str = "auto",
            prior_weights: str | None = None, depth_prior: str | None = None,
            normal_prior: str | None = None, depth_prior_kind: str = "disparity") -> Prediction:
  """URGT on each image of a scene (module docstring). All views must share one size (they are
  refined one by one; run photos of other sizes separately)."""
  names = list(names) if names is not None else [f"view {i}" for i in range(len(images))]
  rows = _refine_views(model, images, names, extrinsics=extrinsics, mesh=mesh,
                       patch_split=patch_split, grid=grid, crop_size=crop_size,
                       rope_positions=rope_positions, prior_weights=prior_weights,
                       depth_prior=depth_prior, normal_prior=normal_prior,
                       depth_prior_kind=depth_prior_kind)
  h, w = rows[0]["relative"].shape
  ks = exts = None
  if all(r["prior"].intrinsics is not None for r in rows):
    h0, w0 = images[0].shape[:2]
    ks = np.stack([r["prior"].intrinsics for r in rows]).astype(np.float32)
    ks[:, 0, :] *= w / w0  # geojax pixel centres: c -> (c + 0.5) * s - 0.5
    ks[:, 1, :] *= h / h0
    ks[:, 0, 2] += 0.5 * w / w0 - 0.5
    ks[:, 1, 2] += 0.5 * h / h0 - 0.5
    exts = np.stack([r["prior"].extrinsics for r in rows]).astype(np.float32)
  extras = {"relative": np.stack([r["relative"] for r in rows]),
            "prior_depth": np.stack([r["prior"].to_depth(r["prior_depth"]) for r in rows]),
            "prior_normals": np.stack([r["prior_normal"] for r in rows])}
  return Prediction(
      depth=np.stack([r["prior"].to_depth(r["relative"]) for r in rows]), depth_conf=None,
      extrinsics=exts, intrinsics=ks, world_points=None,
      images=np.stack([r["pixels"] for r in rows]), names=names,
      input_hw=[tuple(im.shape[:2]) for im in images],
      normals=np.stack([r["normal"] for r in rows]), seconds=sum(r["seconds"] for r in rows),
      extras=extras)


PRIOR_SOURCES = ("weights", "model", "degraded")  # "model" = "weights" (training's name)
_GT_PRIOR_OPTIONS = ("prior_source", "prior_factor", "prior_gamma", "prior_noise")


def eval_inputs(scene: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
  """With ``prior_source="degraded"``: the training prior of every view made from the scene's
  GT depth (:func:`geojax.losses.urgt.degraded_prior`, fixed key, normals fitted to it), as
  ``priors``; otherwise nothing (the prior comes from ``prior_weights``)."""
  source = options.get("prior_source", "weights")
  if source not in PRIOR_SOURCES:
    raise ValueError(f"prior_source must be one of {PRIOR_SOURCES}; got {source!r}")
  if source != "degraded":
    return {}
  from geojax.losses import urgt as L
  depth = jnp.asarray(scene["depth"], jnp.float32)
  valid = jnp.asarray(scene["valid"], bool) & (depth > 0)
  target, lo, hi = L.disparity_target(depth, valid)
  prior = L.degraded_prior(target, valid, jax.random.key(0),
                           factor=int(options.get("prior_factor", 8)),
                           gamma=float(options.get("prior_gamma", 0.7)),
                           noise=float(options.get("prior_noise", 0.05)))
  normal = L.prior_normals(prior, lo, hi, jnp.asarray(scene["intrinsics"], jnp.float32))
  prior, normal, lo, hi = (np.asarray(a) for a in (prior, normal, lo, hi))
  return {"priors": [Prior(prior[i], normal[i], float(hi[i] - lo[i] + L.EPS), float(lo[i]),
                           "degraded ground truth") for i in range(len(prior))]}


def predictor(model: nnx.Module, options: dict[str, Any]):
  """The evaluation view: per view, depth and normals at the input size, the per-crop depths
  and crop boxes (``patch_depth``, ``patch_boxes``, at the aligned size) for the seam metric,
  and the ``prior`` it refined (depth and normals), which the evaluator scores too."""
  opts = {k: v for k, v in options.items() if k not in _GT_PRIOR_OPTIONS}
  opts["patch_split"] = tuple(int(v) for v in opts.get("patch_split", (8, 8)))

  def run(images: np.ndarray, priors: list[Prior] | None = None, **extra) -> dict[str, Any]:
    if extra:
      raise ValueError(f"URGT takes no per-scene inputs {sorted(extra)}")
    h, w = images.shape[1:3]
    names = [f"view {i}" for i in range(len(images))]
    rows = _refine_views(model, list(images), names, extrinsics=None, mesh=None, priors=priors,
                         **opts)
    unit = lambda n: n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    depth = np.stack([r["prior"].to_depth(r["relative"]) for r in rows])
    prior_depth = np.stack([r["prior"].to_depth(r["prior_depth"]) for r in rows])
    return {"depth": resize_map(depth, h, w),
            "normals": unit(resize_map(np.stack([r["normal"] for r in rows]), h, w)),
            "patch_depth": [r["prior"].to_depth(r["patches"]) for r in rows],
            "patch_boxes": [r["boxes"] for r in rows],
            "prior": {"depth": resize_map(prior_depth, h, w),
                      "normals": unit(resize_map(np.stack([r["prior_normal"] for r in rows]),
                                                 h, w))}}
  return run


PREDICT_ARGS = (
    PredictArg(("--patch-split",), dict(type=int, nargs=2, default=(8, 8),
                                         metavar=("N_H", "N_W"),
                                         help="URGT: native patches per axis (official 8 8)")),
    PredictArg(("--grid",), dict(action="store_true",
                                  help="URGT: the plain patch grid instead of 30%% overlapping "
                                       "crops")),
    PredictArg(("--crop-size",), dict(type=int, default=518,
                                       help="URGT: side the crops are resized to (518)")),
    PredictArg(("--rope-positions",), dict(choices=("auto", "official", "true"), default="auto",
                                            help="URGT: RoPE layout of the crops (auto: the "
                                                 "released weights' square layout when the crop "
                                                 "grid is square, else true origins)")),
    PredictArg(("--prior-weights",), dict(default=None, metavar="WEIGHTS",
                                           help="URGT: a geojax depth model (e.g. a DA3 "
                                                "checkpoint) for the coarse depth prior")),
    PredictArg(("--depth-prior",), dict(default=None, metavar="NPY",
                                         help="URGT: coarse depth prior .npy (H, W) (a folder "
                                              "of <stem>.npy for several images)")),
    PredictArg(("--depth-prior-kind",), dict(choices=PRIOR_KINDS, default="disparity",
                                              help="URGT: what --depth-prior holds")),
    PredictArg(("--normal-prior",), dict(default=None, metavar="NPY",
                                          help="URGT: coarse normal prior .npy (H, W, 3) (a "
                                               "folder of <stem>.npy); default: fitted to the "
                                               "depth prior")),
)


# ---------------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class URGTTask:
  """URGT training with GridMix (``configs/urgt.py``; reference ``urgt.md`` §4.2-4.3, §8).

  A batch of the pipeline's ``family="urgt"`` samples is one view per sample holding an
  ``M x M`` block of the ``grid x grid`` patch lattice of a ``bucket``-sized training image (``M``
  the same for the whole batch, so it is static here: the block's height over the patch
  height). Inside the step: the GT becomes normalised disparity
  (:func:`geojax.losses.urgt.disparity_target`), the prior is made from it
  (:func:`~geojax.losses.urgt.degraded_prior` with ``prior`` keywords, a fresh key per step)
  with normals fitted to it, and :func:`geojax.models.urgt.refine` runs the block in grid mode
  (the ``M x M`` patches are the crops, resized to ``crop_size``) with true RoPE positions
  shifted by the block's lattice origin, so every crop sits where it lies in the full image.
  The loss is :func:`~geojax.losses.urgt.urgt_loss` against the target and pseudo-normals
  fitted to the GT depth (``normal_target="pseudo"``) or the dataset's normals (``"gt"``).

  With ``prior_source="model"`` the depth prior comes from a frozen geojax DA3 model instead,
  run inside the step on the block (resized, long side ``prior_size``, sides multiples of 14),
  its depth resized back, inverted to disparity and min-max normalised per image as the
  official pipeline normalises its DAv2 prior (:func:`model_prior`); its weights reach every
  step as an argument (``step_inputs``)."""
  crop_size: int
  bucket: tuple[int, int]
  grid: int = 4
  prior: tuple[tuple[str, Any], ...] = ()
  loss: tuple[tuple[str, Any], ...] = ()
  normal_target: str = "pseudo"
  prior_source: str = "degraded"
  prior_size: int = PRIOR_SIZE
  prior_graphdef: Any = dataclasses.field(default=None, compare=False, repr=False)
  prior_state: Any = dataclasses.field(default=None, compare=False, repr=False)
  family: str = "urgt"

  def step_inputs(self) -> dict[str, Any] | None:
    """The prior model's weights, handed to every step as an argument (``prior_source="model"``)."""
    return {"urgt_prior_model": self.prior_state} if self.prior_source == "model" else None

  def loss_fn(self, model, batch: dict[str, Any], rng: jax.Array
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    from geojax.losses import urgt as L
    x = jnp.asarray(batch["images"][:, 0], jnp.float32) / 255.0
    depth = jnp.asarray(batch["depth"][:, 0], jnp.float32)
    valid = jnp.asarray(batch["valid"][:, 0], bool) & jnp.isfinite(depth) & (depth > 0)
    k = jnp.asarray(batch["intrinsics"][:, 0], jnp.float32)
    h, w = depth.shape[1:]
    ph, pw = self.bucket[0] // self.grid, self.bucket[1] // self.grid
    n = h // ph
    if n * ph != h or n * pw != w or not 1 <= n <= self.grid:
      raise ValueError(f"a {h}x{w} GridMix block is no M x M block of {ph}x{pw} patches of the "
                       f"{self.bucket[0]}x{self.bucket[1]} training size (one bucket only)")
    target, lo, hi = L.disparity_target(depth, valid)
    if self.prior_source == "model":
      prior_model = nnx.merge(self.prior_graphdef,
                              jax.lax.stop_gradient(batch["urgt_prior_model"]))
      prior = jax.lax.stop_gradient(model_prior(prior_model, x, self.prior_size))
    else:
      prior = L.degraded_prior(target, valid, rng, **dict(self.prior))
    prior_n = L.prior_normals(prior, lo, hi, k)
    if self.normal_target == "gt":
      nt = jnp.asarray(batch["normals"][:, 0], jnp.float32)
      nv = valid & (jnp.linalg.norm(nt, axis=-1) > 0.5)
    else:
      nt, nv = L.pseudo_normals(depth, k, valid)
    t = self.crop_size // urgt.PATCH
    origin = jnp.asarray(batch["grid_origin"], jnp.float32) * t  # lattice cell -> tokens
    out = urgt.refine(model, x, prior, prior_n, patch_split=(n, n), overlap=False,
                      crop_size=self.crop_size, rope_positions="true", origin=origin)
    loss, parts = L.urgt_loss(out["depth"], out["normal"], target, valid, nt, nv,
                              **dict(self.loss))
    prior_mse = jnp.sum(jnp.where(valid, (prior - target) ** 2, 0.0)) / jnp.maximum(
        jnp.sum(valid), 1)
    return loss, {**parts, "prior_depth_mse": prior_mse}


def model_prior(prior_model: nnx.Module, images: jax.Array, size: int = PRIOR_SIZE
                ) -> jax.Array:
  """The normalised-disparity depth prior ``(B, H, W)`` of images ``(B, H, W, 3)`` in [0, 1]
  from a DA3 model (traceable): the images resized (bilinear, antialiased) to long side
  ``size`` with sides multiples of 14, ImageNet-normalised, one view each; the depth resized
  back, ``1 / depth`` where positive (0 elsewhere), min-max normalised per image
  (``(d - min) / (max - min + 1e-8)``, as :func:`make_prior` does at inference)."""
  from geojax.models.registry import IMAGENET_MEAN, IMAGENET_STD
  from geojax.nn import resize
  b, h, w, _ = images.shape
  scale = size / max(h, w)
  ph, pw = (max(urgt.PATCH, int(round(n * scale / urgt.PATCH)) * urgt.PATCH) for n in (h, w))
  x = jnp.clip(resize.resize_bilinear(images, (ph, pw), antialias=True), 0.0, 1.0)
  x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  d = prior_model(x[:, None])["depth"][:, 0].astype(jnp.float32)
  d = resize.resize_bilinear(d[..., None], (h, w))[..., 0]
  ok = jnp.isfinite(d) & (d > 0)
  disp = jnp.where(ok, 1.0 / jnp.where(ok, d, 1.0), 0.0)
  lo = jnp.min(disp, axis=(1, 2), keepdims=True)
  hi = jnp.max(disp, axis=(1, 2), keepdims=True)
  return (disp - lo) / (hi - lo + 1e-8)


def load_training_prior_model(pconfig, dtype: str | None = None) -> nnx.Module:
  """The frozen DA3 model of ``prior.source="model"`` from ``prior.weights`` (a geojax DA3
  checkpoint or converted official DA3 weights)."""
  from geojax.models import registry
  from geojax.predict import weights
  path = pconfig.get("weights", "")
  if not path:
    raise ValueError("prior.source='model' needs prior.weights: a geojax DA3 checkpoint or "
                     "official DA3 weights (e.g. DA3MONO-LARGE) for the training priors")
  try:
    model, _ = weights.load_model(path, overrides={"dtype": dtype} if dtype else None)
  except (ValueError, FileNotFoundError) as e:
    raise type(e)(str(e).replace("--weights", "prior.weights")) from None
  fam = registry.family_of(model)
  if fam.name != "da3":
    raise ValueError(f"prior.weights {path}: a {fam.name} model; training priors come from a "
                     "DA3 depth model (mono, metric or any-view on one view)")
  return model


def make_task(config) -> URGTTask:
  """:class:`URGTTask` from ``config.model.crop_size``, the single training bucket of
  ``config.data.pipeline``, ``config.prior`` (``source``: ``degraded`` or ``model``, with
  ``weights`` and ``size``) and ``config.loss``."""
  pipe = config.data.pipeline
  buckets = [tuple(int(v) for v in b) for b in pipe.get("buckets", ())]
  if len(buckets) != 1:
    raise ValueError(f"URGT trains at one size: data.pipeline.buckets must hold one (H, W); got "
                     f"{buckets}")
  if pipe.get("family") != "urgt":
    raise ValueError("URGT training needs data.pipeline.family='urgt' (GridMix)")
  if int(pipe.get("min_views", 1)) != 1 or int(pipe.get("max_views", 1)) != 1:
    raise ValueError("URGT trains on single images: set data.pipeline.min_views = max_views = 1")
  crop = int(config.model.get("crop_size", 518))
  if crop < urgt.PATCH or crop % urgt.PATCH:
    raise ValueError(f"model.crop_size must be a positive multiple of {urgt.PATCH}; got {crop}")
  prior = dict(config.get("prior", {}))
  source = prior.pop("source", "degraded")
  prior_weights = prior.pop("weights", "")
  prior_size = int(prior.pop("size", PRIOR_SIZE))
  extra: dict[str, Any] = {}
  if source == "model":
    if prior_size < urgt.PATCH:
      raise ValueError(f"prior.size must be at least {urgt.PATCH}; got {prior_size}")
    dtype = config.model.get("dtype")
    prior_model = load_training_prior_model(
        {"weights": prior_weights}, None if dtype in (None, "", "float32") else dtype)
    graphdef, state = nnx.split(prior_model)
    extra = dict(prior_source="model", prior_size=prior_size, prior_graphdef=graphdef,
                 prior_state=state)
    prior = {}
  elif source != "degraded":
    raise ValueError(f"prior.source must be 'degraded' (made from the GT) or 'model' (a DA3 "
                     f"model, prior.weights); got {source!r}")
  loss = dict(config.get("loss", {}))
  normal_target = loss.pop("normal_target", "pseudo")
  if normal_target not in ("pseudo", "gt"):
    raise ValueError(f"loss.normal_target must be 'pseudo' or 'gt'; got {normal_target!r}")
  return URGTTask(crop_size=crop, bucket=buckets[0], grid=int(pipe.get("gridmix_size", 4)),
                  prior=tuple(sorted(prior.items())), loss=tuple(sorted(loss.items())),
                  normal_target=normal_target, **extra)


def model_config(mconfig) -> dict[str, Any]:
  """The stored model config: the preset and runtime fields, ``head_chunk`` included."""
  from geojax.train.trainer import DTYPES
  if mconfig.dtype not in DTYPES:
    raise ValueError(f"model.dtype must be one of {tuple(DTYPES)}; got {mconfig.dtype!r}")
  over = dict(attn_impl=mconfig.attn_impl, remat=mconfig.remat, scan=bool(mconfig.scan),
              head_chunk=int(mconfig.get("head_chunk", 0)))
  if DTYPES[mconfig.dtype]:
    over["dtype"] = DTYPES[mconfig.dtype]
  return {"preset": mconfig.preset, "overrides": over}


def initialize(model: nnx.Module, init) -> nnx.Module | None:
  """The paper's training start. With ``init.vggt`` (VGGT-1B safetensors, converted once with
  ``geojax convert --family urgt --tensors-only model.pt DIR``): the aggregator and depth head
  from VGGT-1B (:func:`geojax.convert.urgt.merge_vggt`), returned as the new source. Then, and
  also when no init source is set, the prior embeddings and the heads' last convs start at
  N(0, 1e-4) with zero bias (:func:`geojax.models.urgt.init_training_start`). ``init.weights``
  / ``init.checkpoint`` (fine-tuning a URGT) are left as they are."""
  vggt_path = init.get("vggt", "")
  if vggt_path:
    if init.get("weights") or init.get("checkpoint"):
      raise ValueError("init: init.vggt starts training from VGGT-1B; it excludes init.weights "
                       "and init.checkpoint")
    from geojax.convert import urgt as urgt_conv
    from geojax.convert.torch_layout import read_safetensors
    if not os.path.exists(vggt_path):
      raise FileNotFoundError(f"init.vggt {vggt_path}: no such file or directory")
    try:
      src, loaded, kept, dropped = urgt_conv.merge_vggt(model, read_safetensors(vggt_path,
                                                                                "urgt")[0])
    except ValueError as e:
      raise ValueError(f"init.vggt {vggt_path}: {e}") from None
    urgt.init_training_start(src)
    print(f"URGT init: {len(loaded)} tensors from VGGT-1B, {len(kept)} kept at their "
          f"initialisation (prior embeddings, normal head), {len(dropped)} VGGT head tensors "
          "dropped", flush=True)
    return src
  if not init.get("weights") and not init.get("checkpoint"):
    urgt.init_training_start(model)
  return None


FAMILY = register(Family(
    name="urgt", build=build, predict=predict, predicts=predicts, load_official=load_official,
    presets=urgt.PRESET_NAMES, model_types=(urgt.URGT,), identify_official=identify_official,
    convert_state_dict=convert_state_dict, predict_args=PREDICT_ARGS, predictor=predictor,
    make_task=make_task, model_config=model_config, initialize=initialize,
    eval_inputs=eval_inputs,
    eval_options=dict(patch_split=(8, 8), grid=False, crop_size=518, rope_positions="auto",
                      prior_weights="", prior_source="weights", prior_factor=8,
                      prior_gamma=0.7, prior_noise=0.05),
    demo=Demo(config_arg="runlocal", rows=(
        ("depth AbsRel (lower is better)", "abs_rel"),
        ("normal mean angle, degrees (lower)", "normal_mean_deg")))))
