"""The DA3 family (Depth Anything 3): how geojax builds, loads, runs, trains and demonstrates it.

- network: :mod:`geojax.models.da3` (presets ``da3-tiny`` ... ``da3nested-giant-large``);
- official weights: :mod:`geojax.convert.da3` (hub layout: ``model.safetensors`` +
  ``config.json``);
- inference (:func:`predict`): the views are prepared as the official API does
  (:mod:`geojax.predict.preprocess`); every output is at that processed resolution. Known
  cameras condition the camera token, and then, as the official API does by default, the outputs
  are expressed in the given frame: the returned cameras are the given ones (intrinsics rescaled
  to the processed size) and depth is divided by the scale of the Sim(3) that maps the given
  camera centres onto the predicted ones (Umeyama; RANSAC from 10 views on);
- training: :class:`DA3Task` with the objective of :mod:`geojax.losses.da3`;
  ``configs/da3.py`` is the training config, ``make demo`` / ``make demo-da3`` the demo.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from geojax.geometry import camera
from geojax.losses import da3 as da3_loss
from geojax.models import da3
from geojax.models.registry import (IMAGENET_MEAN, IMAGENET_STD, Demo, Family, PredictArg,
                                    config_overrides, register, resize_map)
from geojax.models.runner import compiled_call, jit_forward
from geojax.predict import preprocess as pp
from geojax.predict.core import Prediction, homogeneous
from geojax.train.tasks import STEP_KEY, normalize_images

RANSAC_MIN_VIEWS = 10  # the official API switches to RANSAC pose alignment from this many views


# ----------------------------------------------------------------------------- build and load


def build(config: dict[str, Any], rngs: nnx.Rngs) -> nnx.Module:
  return da3.DA3.from_preset(config["preset"], rngs=rngs, **config_overrides(config))


def load_official(path: str, config: dict[str, Any]) -> nnx.Module:
  from geojax.convert.da3 import load_official as load
  return load(path, config.get("preset") or None, **config_overrides(config))


def identify_official(path: str) -> str | None:
  """``"<preset>"`` when ``path`` holds official DA3 weights (``""``: DA3, preset inferred from
  the tensor shapes when loading), None when it holds another family's."""
  files = ([os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
           if os.path.isdir(path) else [path])
  cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else None
  if cfg_path and os.path.isfile(cfg_path):
    try:
      with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"{cfg_path}: cannot parse JSON: {e}") from e
    name = cfg.get("model_name") if isinstance(cfg, dict) else None
    if isinstance(name, str) and name in da3.PRESET_NAMES:
      return name
  from safetensors import safe_open
  for f in files:
    try:
      with safe_open(f, "numpy") as st:
        keys = list(st.keys())
    except Exception:  # not a safetensors file: not ours
      continue
    if any(k.split("model.", 1)[-1].startswith(("backbone.pretrained.", "da3_metric."))
           for k in keys):
      return ""
  return None


def predicts(config: dict[str, Any]) -> tuple[str, ...]:
  preset = config.get("preset")
  if preset in da3.NESTED or (preset in da3.PRESETS and da3.get_config(preset).cameras):
    return ("depth", "confidence", "cameras", "points")
  return ("depth", "confidence", "points", "sky")


# --------------------------------------------------------------------------------- inference


def _shift_principal_point(k: np.ndarray, d: float) -> np.ndarray:
  """Move principal points by ``d`` pixels. DA3 works with pixel corners at integers (its
  principal points are ``(W/2, H/2)``), geojax with pixel centres at integers: DA3 -> geojax is
  ``d = -0.5``, geojax -> DA3 ``d = +0.5``."""
  k = np.array(k, np.float32)
  k[..., :2, 2] += d
  return k


def _align_scale(pred_w2c: np.ndarray, given_w2c: np.ndarray) -> float:
  """Scale ``s`` of the Sim(3) with ``pred_centres ~ s R given_centres + t``."""
  from geojax.geometry import alignment
  src, dst = (np.asarray(camera.camera_center(jnp.asarray(e))) for e in (given_w2c, pred_w2c))
  if len(src) < 2:
    return 1.0
  if len(src) >= RANSAC_MIN_VIEWS:
    s, _, _ = alignment.ransac_umeyama(src, dst, seed=42)[:3]
  else:
    s, _, _ = alignment.umeyama(src, dst)
  s = float(s)
  return s if np.isfinite(s) and s > 0 else 1.0


def predict(model: nnx.Module, images: list[np.ndarray], *, extrinsics: np.ndarray | None = None,
            intrinsics: np.ndarray | None = None, names: list[str] | None = None,
            mesh: jax.sharding.Mesh | None = None, process_res: int = 504,
            process_res_method: str = "upper_bound_resize",
            ref_view_strategy: str = "saddle_balanced", use_ray_pose: bool = False,
            align_to_input_scale: bool = True) -> Prediction:
  """DA3 on the views of one scene (see the module docstring and :func:`geojax.predict.run`).

  ``process_res``/``process_res_method``: the official preprocessing; ``ref_view_strategy``:
  reference-view choice for 3+ views without poses; ``use_ray_pose``: cameras from the ray map
  instead of the camera head; ``align_to_input_scale``: with known cameras, return them and
  rescale depth to their frame (False returns the predicted cameras).
  """
  if int(process_res) < 1:
    raise ValueError(f"--process-res must be >= 1; got {process_res}")
  names = list(names) if names is not None else [f"view {i}" for i in range(len(images))]
  proc = pp.preprocess(images, intrinsics, process_res=int(process_res),
                       method=process_res_method, names=names)
  has_cameras = bool(getattr(getattr(model, "cfg", None), "cameras", True))
  if extrinsics is not None and not has_cameras:
    raise ValueError("this model takes no camera input (monocular/metric preset); drop the poses")
  options = (("ref_view_strategy", ref_view_strategy), ("use_ray_pose", bool(use_ray_pose)))
  x = proc.images[None]
  ext = None if extrinsics is None else extrinsics[None]
  k = None if proc.intrinsics is None else _shift_principal_point(proc.intrinsics, 0.5)[None]
  if mesh is None:
    x, ext, k = jax.tree.map(jnp.asarray, (x, ext, k))
  else:  # views split over the mesh's "view" axis when it divides them, the rest replicated
    n = dict(zip(mesh.axis_names, mesh.axis_sizes)).get("view", 1)
    spec = P(None, "view") if n > 1 and x.shape[1] % n == 0 else P()
    x = jax.device_put(x, NamedSharding(mesh, spec))
    ext, k = jax.device_put((ext, k), NamedSharding(mesh, P()))
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    fwd = compiled_call(model, options, (x, ext, k), mesh,
                        keep=("depth", "depth_conf", "extrinsics", "intrinsics", "sky"))
    t0 = time.perf_counter()  # compiled above, outside the timing
    out = jax.block_until_ready(fwd(x, ext, k))
    seconds = time.perf_counter() - t0
  out = jax.device_get(out)
  depth = np.asarray(out["depth"][0], np.float32)
  conf = np.asarray(out["depth_conf"][0], np.float32)
  pred_ext = pred_k = None
  if "extrinsics" in out:
    pred_ext = homogeneous(out["extrinsics"][0])
    pred_k = _shift_principal_point(out["intrinsics"][0], -0.5)
  if extrinsics is not None and align_to_input_scale:
    depth = depth / _align_scale(pred_ext, extrinsics)
    pred_ext, pred_k = extrinsics.copy(), proc.intrinsics.copy()
  sky = np.asarray(out["sky"][0], np.float32) if "sky" in out else None
  return Prediction(depth=depth, depth_conf=conf, extrinsics=pred_ext, intrinsics=pred_k,
                    world_points=None, images=proc.pixels, names=names, input_hw=proc.input_hw,
                    sky=sky, seconds=seconds)


PREDICT_ARGS = (
    PredictArg(("--process-res",), dict(type=int, default=504,
                                         help="processing resolution (longest side for "
                                         "upper_bound_*)")),
    PredictArg(("--process-res-method",), dict(default="upper_bound_resize",
                                               choices=pp.METHODS)),
    PredictArg(("--ref-view-strategy",), dict(default="saddle_balanced", choices=(
        "saddle_balanced", "first", "middle", "saddle_sim_range"),
        help="reference view for 3+ views without known poses")),
    PredictArg(("--use-ray-pose",), dict(action="store_true",
                                         help="cameras from the predicted ray map instead of "
                                         "the camera head")),
)


def _resize_rgb(images: np.ndarray, h: int, w: int) -> np.ndarray:
  if images.shape[1:3] == (h, w):
    return images
  return np.stack([np.asarray(Image.fromarray(im).resize((w, h), Image.BICUBIC)) for im in images])


def predictor(model: nnx.Module, options: dict[str, Any]):
  """Evaluation: DA3 at ``process_res`` (long side, rounded to multiples of 14), outputs at
  input size."""
  fwd = jit_forward(model, ref_view_strategy=options.get("ref_view_strategy", "saddle_balanced"),
                    use_ray_pose=bool(options.get("use_ray_pose", False)))
  process_res = int(options.get("process_res", 504))

  def run(images: np.ndarray, **unused) -> dict[str, np.ndarray]:
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 (S, H, W, 3); got {images.dtype} {images.shape}")
    s, h, w = images.shape[:3]
    scale = process_res / max(h, w)
    ph, pw = (max(14, int(round(n * scale / 14)) * 14) for n in (h, w))
    x = _resize_rgb(images, ph, pw).astype(np.float32) / 255.0
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    out = jax.device_get(fwd(jnp.asarray(x[None])))
    res = {"depth": resize_map(out["depth"][0], h, w),
           "depth_conf": resize_map(out["depth_conf"][0], h, w)}
    if "sky" in out:
      res["sky"] = resize_map(out["sky"][0], h, w)
    if "extrinsics" in out:
      ext = np.tile(np.eye(4, dtype=np.float32), (s, 1, 1))
      ext[:, :3] = out["extrinsics"][0]
      k = np.array(out["intrinsics"][0], np.float32)
      k[:, 0] *= w / pw
      k[:, 1] *= h / ph
      res.update(extrinsics=ext, intrinsics=k)
    return res

  return run


# ---------------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class DA3Task:
  """DA3 any-view training: forward with random pose conditioning, then the DA3 objective.

  - images: uint8 ``(B, S, H, W, 3)`` -> ImageNet-normalised float32 inside the jitted step;
  - reference view: ``"first"`` (the loss's world frame is view 0);
  - pose conditioning: each sample is conditioned on its ground-truth cameras with probability
    ``loss.pose_cond_prob`` (paper: 0.2), otherwise the learned camera token is used;
  - teacher labels: when the batch holds ``teacher_depth`` (B, S, H, W), depth supervision
    switches from GT to the teacher depth aligned to the GT by RANSAC scale/shift
    (:func:`geojax.losses.da3.teacher_labels`) at ``loss.teacher_switch_step``.
  """

  loss: da3_loss.DA3LossConfig = da3_loss.DA3LossConfig()
  family: str = "da3"

  def loss_fn(self, model, batch: dict[str, Any], rng: jax.Array
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    images = normalize_images(batch["images"])
    b = images.shape[0]
    kwargs: dict[str, Any] = {}
    if self.loss.pose_cond_prob > 0 and getattr(model, "cam_enc", None) is not None:
      mask = da3_loss.pose_condition_mask(jax.random.fold_in(rng, 1), b,
                                          self.loss.pose_cond_prob)
      # Encoder intrinsics: the FoV depends only on the focal lengths and the image size.
      kwargs = dict(extrinsics=batch["extrinsics"], intrinsics=batch["intrinsics"],
                    pose_mask=mask)
    pred = model(images, ref_view_strategy="first", **kwargs)
    if "teacher_depth" in batch:
      gt = jnp.asarray(batch["depth"], jnp.float32)
      labels = lambda: da3_loss.teacher_labels(batch["teacher_depth"], gt, batch["valid"])[0]
      batch = dict(batch, depth=da3_loss.depth_target(batch.get(STEP_KEY, 0), gt, labels,
                                                      self.loss))
    total, terms = da3_loss.da3_loss(pred, batch, self.loss)
    aux = {k: v for k, v in terms.items() if k != "scene_scale"}
    if kwargs:
      aux["pose_conditioned"] = jnp.mean(kwargs["pose_mask"].astype(jnp.float32))
    return total, aux


def make_task(config) -> DA3Task:
  """:class:`DA3Task` with the objective from ``config.loss`` (``DA3LossConfig`` fields)."""
  fields = {f.name for f in dataclasses.fields(da3_loss.DA3LossConfig)}
  given = dict(config.loss) if "loss" in config else {}
  unknown = sorted(set(given) - fields)
  if unknown:
    raise ValueError(f"config.loss has unknown fields {unknown}; DA3 loss fields: "
                     f"{sorted(fields)}")
  if "total_steps" not in given:
    given["total_steps"] = int(config.total_steps)
  return DA3Task(loss=da3_loss.DA3LossConfig(**given))


FAMILY = register(Family(
    name="da3", build=build, predict=predict, predicts=predicts, load_official=load_official,
    predictor=predictor, presets=da3.PRESET_NAMES, model_types=(da3.DA3, da3.NestedDA3),
    identify_official=identify_official, predict_args=PREDICT_ARGS, make_task=make_task,
    eval_options=dict(process_res=504, ref_view_strategy="saddle_balanced", use_ray_pose=False),
    demo=Demo(config_arg="runlocal", rows=(
        ("depth AbsRel (lower is better)", "abs_rel"),
        ("depth delta1 (higher is better)", "delta1"),
        ("pose AUC@30 (higher is better)", "auc30")))))
