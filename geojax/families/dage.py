"""The DAGE family (dual-stream LR + HR geometry): build, load, run.

- network: :mod:`geojax.models.dage` (presets ``dage``, geojax-only ``dage-tiny``);
- official weights: :mod:`geojax.convert.dage` (the official ``state_dict`` in safetensors, a
  file or a directory with an optional ``config.json``); pickled ``.pt`` checkpoints go through
  ``geojax convert --family dage`` once;
- inference (:func:`predict`): the frames of one video or scene at their own resolution
  (frames of other sizes are resized to the first one's, with a warning) through
  :func:`geojax.models.dage.infer`: local and world point maps and depth in the network's
  relative units with the predicted ``metric_scale`` (metres per unit), camera-to-world poses
  (returned as world-to-camera extrinsics, as every geojax prediction), intrinsics from MoGe's
  focal solver, confidence ``sigmoid(conf)``. DAGE takes no known cameras.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from geojax.geometry import camera
from geojax.models import dage
from geojax.models.registry import Demo, Family, PredictArg, config_overrides, register
from geojax.predict.core import Prediction


def build(config: dict[str, Any], rngs: nnx.Rngs) -> nnx.Module:
  return dage.DAGE.from_preset(config["preset"], rngs=rngs, **config_overrides(config))


def load_official(path: str, config: dict[str, Any]) -> nnx.Module:
  from geojax.convert.dage import load_official as load
  return load(path, **config_overrides(config))


def identify_official(path: str) -> str | None:
  from geojax.convert.dage import is_official
  try:
    return "dage" if is_official(path) else None
  except Exception:  # unreadable as safetensors: not ours
    return None


def convert_state_dict(checkpoint: Any):
  """An official checkpoint -> ``(tensors, config)``: the weights from ``ema_model``, ``model``
  or the file itself (EMA preferred, as ``DAGE.from_pretrained`` does), and the constructor
  config it stores (``model_config`` / ``config``), which ``config.json`` keeps so that the
  adapter depth and RoPE flags of the run are known when loading."""
  if not isinstance(checkpoint, dict):
    raise ValueError("a DAGE checkpoint must be a mapping (a state dict or a training "
                     "checkpoint with ema_model / model)")
  sd = checkpoint
  for key in ("ema_model", "model"):
    if isinstance(checkpoint.get(key), dict):
      sd = checkpoint[key]
      break
  tensors = {k: v for k, v in sd.items() if hasattr(v, "shape") and hasattr(v, "dtype")}
  if not tensors:
    raise ValueError("the DAGE checkpoint holds no tensors")
  config = next((checkpoint[k] for k in ("model_config", "config")
                 if isinstance(checkpoint.get(k), dict)), None)
  return tensors, config


def predicts(config: dict[str, Any]) -> tuple[str, ...]:
  return ("depth", "confidence", "cameras", "points", "local_points", "metric_scale")


def _same_size(images: list[np.ndarray], names: list[str]) -> np.ndarray:
  h, w = images[0].shape[:2]
  odd = [(n, im.shape[1], im.shape[0]) for n, im in zip(names, images) if im.shape[:2] != (h, w)]
  if odd:
    detail = ", ".join(f"{n}: {a}x{b}" for n, a, b in odd)
    warnings.warn(f"the frames differ in size ({detail}); they are resized to the first "
                  f"frame's {w}x{h}", stacklevel=3)
    images = [im if im.shape[:2] == (h, w) else
              np.asarray(Image.fromarray(im).resize((w, h), Image.BICUBIC)) for im in images]
  return np.stack(images)


_COMPILED: "weakref.WeakKeyDictionary[nnx.Module, dict]" = weakref.WeakKeyDictionary()


def predict(model: nnx.Module, images: list[np.ndarray], *, extrinsics: np.ndarray | None = None,
            intrinsics: np.ndarray | None = None, names: list[str] | None = None,
            mesh: jax.sharding.Mesh | None = None, lr_max_size: int = 252,
            hr_num_tokens: int = dage.HR_NUM_TOKENS, chunk: int = 0,
            conf_threshold: float = 0.2) -> Prediction:
  """DAGE on the frames of one scene or video (see the module docstring).

  ``lr_max_size``: longest side of the LR stream (the official inference script's 252);
  ``hr_num_tokens``: HR token budget (3600); ``chunk``: frames per HR chunk (0 = all at once);
  ``conf_threshold``: ``sigmoid(conf)`` below it is marked low-confidence.
  """
  if extrinsics is not None:
    raise ValueError("DAGE takes no known cameras (it predicts them); drop the poses")
  names = list(names) if names is not None else [f"view {i}" for i in range(len(images))]
  for flag, v in (("--lr-max-size", lr_max_size), ("--hr-num-tokens", hr_num_tokens)):
    if int(v) < 14 and flag == "--lr-max-size" or int(v) < 1:
      raise ValueError(f"{flag} must be positive (>= 14 for --lr-max-size); got {v}")
  if int(chunk) < 0:
    raise ValueError(f"--chunk must be >= 0 (0 = all frames at once); got {chunk}")
  pixels = _same_size(images, names)
  x = jnp.asarray(pixels[None].astype(np.float32) / 255.0)
  opts = dict(lr_max_size=int(lr_max_size), hr_num_tokens=int(hr_num_tokens),
              chunk=int(chunk) or None, conf_threshold=float(conf_threshold), metric=False)
  per_model = _COMPILED.setdefault(model, {})
  key = (tuple(sorted(opts.items())), x.shape)
  if key not in per_model:
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, v: dage.infer(nnx.merge(graphdef, st), v, **opts))
    per_model[key] = (fn.lower(state, x).compile(), state)
  exe, state = per_model[key]
  t0 = time.perf_counter()
  out = jax.device_get(jax.block_until_ready(exe(state, x)))
  seconds = time.perf_counter() - t0
  s, h, w = pixels.shape[:3]
  c2w = np.asarray(out["camera_poses"][0], np.float32)
  w2c = np.asarray(camera.rigid_inverse(jnp.asarray(c2w)), np.float32)
  kn = np.asarray(out["intrinsics"][0], np.float32)
  k = np.zeros((s, 3, 3), np.float32)
  k[:, 0, 0], k[:, 1, 1] = kn[:, 0, 0] * w, kn[:, 1, 1] * h
  # normalised principal point 0.5 = the image centre; geojax pixels have integer centres
  k[:, 0, 2], k[:, 1, 2], k[:, 2, 2] = kn[:, 0, 2] * w - 0.5, kn[:, 1, 2] * h - 0.5, 1.0
  local = np.asarray(out["local_points"][0], np.float32)
  return Prediction(
      depth=local[..., 2], depth_conf=np.asarray(jax.nn.sigmoid(out["conf"][0]), np.float32),
      extrinsics=w2c, intrinsics=k, world_points=np.asarray(out["global_points"][0], np.float32),
      images=pixels, names=names, input_hw=[tuple(im.shape[:2]) for im in images],
      local_points=local,
      metric_scale=float(np.asarray(out["metric_scale"]).reshape(-1)[0]), seconds=seconds)


PREDICT_ARGS = (
    PredictArg(("--lr-max-size",), dict(type=int, default=252,
                                         help="longest side of DAGE's low-resolution stream")),
    PredictArg(("--hr-num-tokens",), dict(type=int, default=dage.HR_NUM_TOKENS,
                                           help="DAGE's high-resolution token budget")),
    PredictArg(("--chunk",), dict(type=int, default=0,
                                  help="DAGE: frames per high-resolution chunk (0 = all)")),
)


# ---------------------------------------------------------------------------------- training

STAGES = (2, 3)


@dataclasses.dataclass(frozen=True)
class DAGETask:
  """DAGE training (official recipe, ``../shared/reference/dage.md`` §9-10).

  - ``stage=2``: :func:`geojax.losses.dage.pi3_loss` (scale-aligned local points, normals, edge,
    relative cameras, metric scale) on every sample; synthetic scenes count as synthetic-depth
    and metric data.
  - ``stage=3``: :func:`geojax.losses.dage.conf_loss` (confidence BCE; sky = the batch's
    ``sky`` mask when it has one).
  Stage 1 (distillation from a Pi3 teacher) needs the Pi3 model, which geojax does not build
  yet. Images: uint8 ``(B, N, H, W, 3)``; the LR stream runs at ``lr_max_size``, the HR stream
  with ``hr_num_tokens`` tokens.
  """
  stage: int = 2
  lr_max_size: int = dage.LR_MAX_SIZE
  hr_num_tokens: int = dage.HR_NUM_TOKENS
  loss: tuple[tuple[str, Any], ...] = ()
  family: str = "dage"

  def loss_fn(self, model, batch: dict[str, Any], rng: jax.Array
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    from geojax.losses import dage as dage_loss
    del rng
    x = jnp.asarray(batch["images"], jnp.float32) / 255.0
    pred = model(x, lr_max_size=self.lr_max_size, hr_num_tokens=self.hr_num_tokens)
    gt = dage_loss.gt_from_pipeline(batch)
    b = x.shape[0]
    gt.setdefault("is_synthetic", jnp.ones((b,), bool))
    gt.setdefault("is_metric_scale", jnp.ones((b,), bool))
    kw = dict(self.loss)
    if self.stage == 3:
      total, aux = dage_loss.conf_loss(pred, gt, sky_mask=batch.get("sky"), **kw)
    else:
      total, aux = dage_loss.pi3_loss(pred, gt, **kw)
    return total, {k: v for k, v in aux.items() if jnp.ndim(v) == 0}


def make_task(config) -> DAGETask:
  """:class:`DAGETask` from ``config.stage``, ``config.model.lr_max_size`` /
  ``hr_num_tokens`` and ``config.loss`` (keyword arguments of the stage's loss)."""
  stage = int(config.get("stage", 2))
  if stage not in STAGES:
    raise ValueError(f"config.stage={stage}: geojax trains DAGE stages {STAGES} (stage 1 "
                     "distils from a Pi3 teacher, which is not built yet)")
  m = config.model
  return DAGETask(stage=stage, lr_max_size=int(m.get("lr_max_size", dage.LR_MAX_SIZE)),
                  hr_num_tokens=int(m.get("hr_num_tokens", dage.HR_NUM_TOKENS)),
                  loss=tuple(sorted(dict(config.get("loss", {})).items())))


FAMILY = register(Family(
    name="dage", build=build, predict=predict, predicts=predicts, load_official=load_official,
    presets=dage.PRESET_NAMES, model_types=(dage.DAGE,), identify_official=identify_official,
    convert_state_dict=convert_state_dict, predict_args=PREDICT_ARGS, make_task=make_task,
    eval_options=dict(lr_max_size=252, hr_num_tokens=dage.HR_NUM_TOKENS, chunk=0),
    demo=Demo(config_arg="runlocal", rows=(
        ("depth AbsRel (lower is better)", "abs_rel"),
        ("depth delta1 (higher is better)", "delta1"),
        ("pose AUC@30 (higher is better)", "auc30")))))
