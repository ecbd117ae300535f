"""Model families behind one interface for ``evaluate.py`` (and, later, training and inference).

A family knows how to build a model from a JSON-able config, load official weights, and run a
*predictor*: uint8 RGB views of one scene ``(S, H, W, 3)`` in, a dict of NumPy arrays at the input
resolution out. Standard output keys:

- ``depth`` ``(S, H, W)`` z-depth (relative scale unless ``metric``), ``depth_conf`` ``(S, H, W)``;
- ``extrinsics`` ``(S, 4, 4)`` world-to-camera and ``intrinsics`` ``(S, 3, 3)`` in pixels, for
  families that predict cameras;
- ``sky`` ``(S, H, W)`` where predicted.

``Family.predicts`` lists the kinds of output (``depth``, ``cameras``) so that the evaluator can
report every metric that applies and skip the others.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclasses.dataclass(frozen=True)
class Family:
  """How one model family is built, loaded and run.

  Attributes:
    name: registry key (``"da3"``).
    build: ``(config: dict, rngs) -> model``; ``config`` is the JSON stored in checkpoints.
    load_official: ``(path, config) -> model`` for official weights, or None.
    predictor: ``(model, options: dict) -> predict(images_uint8 (S, H, W, 3)) -> dict``.
    predicts: which output kinds the family produces for a given config.
  """
  name: str
  build: Callable[[dict[str, Any], nnx.Rngs], nnx.Module]
  load_official: Callable[[str, dict[str, Any]], nnx.Module] | None
  predictor: Callable[[nnx.Module, dict[str, Any]], Callable[[np.ndarray], dict[str, np.ndarray]]]
  predicts: Callable[[dict[str, Any]], tuple[str, ...]]


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
  FAMILIES[family.name] = family
  return family


def get_family(name: str) -> Family:
  if name not in FAMILIES:
    raise ValueError(f"unknown model family {name!r}; registered: {sorted(FAMILIES)}")
  return FAMILIES[name]


def load_checkpoint(path: str, *, family: str | None = None, into: nnx.Module | None = None,
                    what: str = "checkpoint", overrides: dict[str, Any] | None = None
                    ) -> tuple[nnx.Module, Family, dict[str, Any]]:
  """A geojax model checkpoint (:func:`geojax.io.checkpoint.save_model`) -> ``(model, family,
  config)``.

  ``family``, if given, must match the checkpoint's (``what`` names the option in the error).
  ``into`` restores into an existing model of the same structure (e.g. one created sharded);
  otherwise the model is rebuilt from the stored config, with runtime ``overrides`` (e.g.
  ``{"dtype": "bfloat16", "head_chunk": 8}``) merged into its ``overrides``.
  """
  from geojax.io import checkpoint
  info = checkpoint.read_model_info(path)
  if family is not None and info["family"] != family:
    raise ValueError(f"{what} {path} holds a {info['family']!r} model, not a {family!r} one")
  if overrides:
    info["config"] = {**info["config"],
                      "overrides": {**info["config"].get("overrides", {}), **overrides}}
  fam = get_family(info["family"])
  target = into if into is not None else nnx.eval_shape(
      lambda: fam.build(info["config"], nnx.Rngs(0)))
  return checkpoint.restore_state(path, target), fam, info["config"]


def _resize_rgb(images: np.ndarray, h: int, w: int) -> np.ndarray:
  if images.shape[1:3] == (h, w):
    return images
  return np.stack([np.asarray(Image.fromarray(im).resize((w, h), Image.BICUBIC)) for im in images])


def _resize_map(x: np.ndarray, h: int, w: int) -> np.ndarray:
  """Bilinear resize of ``(S, h', w')`` float maps to ``(S, h, w)``."""
  if x.shape[1:] == (h, w):
    return x
  return np.asarray(jax.image.resize(jnp.asarray(x), (x.shape[0], h, w), "linear"))


# ---------------------------------------------------------------------------------------------
# DA3


def _overrides(config: dict[str, Any]) -> dict[str, Any]:
  """Runtime overrides of a stored config; ``dtype`` is stored as a string (``"bfloat16"``)."""
  out = dict(config.get("overrides", {}))
  if isinstance(out.get("dtype"), str):
    out["dtype"] = jnp.dtype(out["dtype"])
  return out


def _da3_build(config: dict[str, Any], rngs: nnx.Rngs) -> nnx.Module:
  from geojax.models import da3
  return da3.DA3.from_preset(config["preset"], rngs=rngs, **_overrides(config))


def _da3_load(path: str, config: dict[str, Any]) -> nnx.Module:
  from geojax.convert.da3 import load_official
  return load_official(path, config.get("preset") or None, **_overrides(config))


def _da3_predicts(config: dict[str, Any]) -> tuple[str, ...]:
  from geojax.models import da3
  preset = config["preset"]
  if preset in da3.NESTED or da3.get_config(preset).cameras:
    return ("depth", "cameras")
  return ("depth",)


def _da3_predictor(model: nnx.Module, options: dict[str, Any]):
  """DA3 at ``process_res`` (long side, rounded to multiples of 14), outputs at input size."""
  from geojax.models.runner import jit_forward
  fwd = jit_forward(model, ref_view_strategy=options.get("ref_view_strategy", "saddle_balanced"),
                    use_ray_pose=bool(options.get("use_ray_pose", False)))
  process_res = int(options.get("process_res", 504))

  def predict(images: np.ndarray) -> dict[str, np.ndarray]:
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 (S, H, W, 3); got {images.dtype} {images.shape}")
    s, h, w = images.shape[:3]
    scale = process_res / max(h, w)
    ph, pw = (max(14, int(round(n * scale / 14)) * 14) for n in (h, w))
    x = _resize_rgb(images, ph, pw).astype(np.float32) / 255.0
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    out = jax.device_get(fwd(jnp.asarray(x[None])))
    res = {"depth": _resize_map(out["depth"][0], h, w),
           "depth_conf": _resize_map(out["depth_conf"][0], h, w)}
    if "sky" in out:
      res["sky"] = _resize_map(out["sky"][0], h, w)
    if "extrinsics" in out:
      ext = np.tile(np.eye(4, dtype=np.float32), (s, 1, 1))
      ext[:, :3] = out["extrinsics"][0]
      k = np.array(out["intrinsics"][0], np.float32)
      k[:, 0] *= w / pw
      k[:, 1] *= h / ph
      res.update(extrinsics=ext, intrinsics=k)
    return res

  return predict


register(Family("da3", _da3_build, _da3_load, _da3_predictor, _da3_predicts))
