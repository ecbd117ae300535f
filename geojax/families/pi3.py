"""The Pi3 family (permutation-equivariant multi-view point maps and cameras): build, load, run.

- network: :mod:`geojax.models.pi3` (preset ``pi3`` = the released ``yyfz233/Pi3``; geojax-only
  ``pi3-tiny``);
- official weights: :mod:`geojax.convert.pi3` (the released ``model.safetensors``, a file or a
  directory); pickled ``.pt`` checkpoints go through ``geojax convert --family pi3`` once;
- inference (:func:`predict`): every frame resized, as the official loader does, to the size
  :func:`geojax.models.pi3.pixel_limit_size` gives the first frame (Lanczos, about
  ``--pixel-limit`` pixels, sides multiples of 14), then :func:`geojax.models.pi3.infer`: local
  and world point maps and depth in relative units, camera-to-world poses (returned as
  world-to-camera extrinsics), intrinsics from MoGe's focal solver, confidence
  ``sigmoid(conf)``. Pi3 takes no known cameras and has no metric scale.

Pi3 is also DAGE's stage-1 distillation teacher (``geojax.families.dage``).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from geojax.models import pi3
from geojax.models.registry import Family, PredictArg, config_overrides, register
from geojax.models.runner import compiled_call
from geojax.predict.core import point_map_prediction


def build(config: dict[str, Any], rngs: nnx.Rngs) -> nnx.Module:
  return pi3.Pi3.from_preset(config["preset"], rngs=rngs, **config_overrides(config))


def load_official(path: str, config: dict[str, Any]) -> nnx.Module:
  """Official-layout weights; the released ``pi3`` configuration unless ``config`` names
  another preset (e.g. ``geojax convert --preset pi3-tiny``)."""
  from geojax.convert.pi3 import load_official as load
  return load(path, pi3.get_config(config.get("preset") or "pi3", **config_overrides(config)))


def identify_official(path: str) -> str | None:
  from geojax.convert.pi3 import is_official
  try:
    return "pi3" if is_official(path) else None
  except Exception:  # unreadable as safetensors: not ours
    return None


def convert_state_dict(checkpoint: Any):
  """An official checkpoint (a state dict, or one under ``model`` / ``ema_model``) -> tensors."""
  from geojax.convert.torch_layout import checkpoint_tensors
  return checkpoint_tensors(checkpoint, "Pi3")[0]


def predicts(config: dict[str, Any]) -> tuple[str, ...]:
  return ("depth", "confidence", "cameras", "points", "local_points")


def predict(model: nnx.Module, images: list[np.ndarray], *, extrinsics: np.ndarray | None = None,
            intrinsics: np.ndarray | None = None, names: list[str] | None = None,
            mesh: jax.sharding.Mesh | None = None, pixel_limit: int = pi3.PIXEL_LIMIT,
            conf_threshold: float = 0.1):
  """Pi3 on the frames of one scene or video (module docstring). ``pixel_limit``: the pixel
  budget of the input size; ``conf_threshold``: ``sigmoid(conf)`` below it is low-confidence
  (used for the intrinsics fit)."""
  if extrinsics is not None:
    raise ValueError("Pi3 takes no known cameras (it predicts them); drop the poses")
  if int(pixel_limit) < 14 * 14:
    raise ValueError(f"--pixel-limit must be at least {14 * 14} (one 14x14 patch); got "
                     f"{pixel_limit}")
  names = list(names) if names is not None else [f"view {i}" for i in range(len(images))]
  th, tw = pi3.pixel_limit_size(*images[0].shape[:2], limit=int(pixel_limit))
  pixels = np.stack([im if im.shape[:2] == (th, tw) else
                     np.asarray(Image.fromarray(im).resize((tw, th), Image.LANCZOS))
                     for im in images])
  x = jnp.asarray(pixels[None].astype(np.float32) / 255.0)
  opts = (("conf_threshold", float(conf_threshold)),)
  exe = compiled_call(model, opts, (x,), fn=pi3.infer)
  t0 = time.perf_counter()
  out = jax.device_get(jax.block_until_ready(exe(x)))
  return point_map_prediction(out, pixels, names, [tuple(im.shape[:2]) for im in images],
                              seconds=time.perf_counter() - t0)


PREDICT_ARGS = (
    PredictArg(("--pixel-limit",), dict(type=int, default=pi3.PIXEL_LIMIT,
                                         help="Pi3: pixel budget of the input size (official "
                                              "255000)")),
)


FAMILY = register(Family(
    name="pi3", build=build, predict=predict, predicts=predicts, load_official=load_official,
    presets=pi3.PRESET_NAMES, model_types=(pi3.Pi3,), identify_official=identify_official,
    convert_state_dict=convert_state_dict, predict_args=PREDICT_ARGS,
    eval_options=dict(pixel_limit=pi3.PIXEL_LIMIT)))
