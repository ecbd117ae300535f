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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from geojax.models import dage
from geojax.models.registry import Demo, Family, PredictArg, config_overrides, register
from geojax.models.runner import compiled_call
from geojax.predict.core import point_map_prediction


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
  from geojax.convert.torch_layout import checkpoint_tensors
  return checkpoint_tensors(checkpoint, "DAGE")


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
  if int(lr_max_size) < 14:
    raise ValueError(f"--lr-max-size must be >= 14 (one patch); got {lr_max_size}")
  if int(hr_num_tokens) < 1:
    raise ValueError(f"--hr-num-tokens must be >= 1; got {hr_num_tokens}")
  if int(chunk) < 0:
    raise ValueError(f"--chunk must be >= 0 (0 = all frames at once); got {chunk}")
  pixels = _same_size(images, names)
  x = jnp.asarray(pixels[None].astype(np.float32) / 255.0)
  opts = dict(lr_max_size=int(lr_max_size), hr_num_tokens=int(hr_num_tokens),
              chunk=int(chunk) or None, conf_threshold=float(conf_threshold), metric=False)
  exe = compiled_call(model, tuple(sorted(opts.items())), (x,), fn=dage.infer)
  t0 = time.perf_counter()
  out = jax.device_get(jax.block_until_ready(exe(x)))
  return point_map_prediction(out, pixels, names, [tuple(im.shape[:2]) for im in images],
                              seconds=time.perf_counter() - t0)


PREDICT_ARGS = (
    PredictArg(("--lr-max-size",), dict(type=int, default=252,
                                         help="longest side of DAGE's low-resolution stream")),
    PredictArg(("--hr-num-tokens",), dict(type=int, default=dage.HR_NUM_TOKENS,
                                           help="DAGE's high-resolution token budget")),
    PredictArg(("--chunk",), dict(type=int, default=0,
                                  help="DAGE: frames per high-resolution chunk (0 = all)")),
)


# ---------------------------------------------------------------------------------- training

STAGES = (1, 2, 3)
TEACHER_MAX_SIZE = 672  # the official stage-1 teacher's longest side (a multiple of 28)


def distill_resolutions(h: int, w: int, teacher_max_size: int = TEACHER_MAX_SIZE
                        ) -> tuple[tuple[int, int], tuple[int, int]]:
  """Stage-1 sizes for ``h x w`` training images (``train_dage_stage1.py``): the Pi3 teacher's
  input (long side at most ``teacher_max_size``, sides multiples of 28) and the student's LR
  resolution, exactly half of it."""
  th, tw = dage.lr_size(h, w, teacher_max_size, multiple=28)
  return (th, tw), (th // 2, tw // 2)


@dataclasses.dataclass(frozen=True)
class DAGETask:
  """DAGE training (official recipe, ``../shared/reference/dage.md`` §9-10).

  - ``stage=1``: :func:`geojax.losses.dage.distill_loss` (the stage-2 terms plus point, camera
    and cosine feature distillation) against a frozen Pi3 teacher run inside the step on the
    same clip at twice the student's LR resolution (:func:`distill_resolutions`), its raw
    point / confidence maps resized to the image size before the remap and its decoder block
    ``depth - 3`` matched by the student's token splitter; the HR stream sees
    ``(H // 14) * (W // 14)`` tokens, as officially.
  - ``stage=2``: :func:`geojax.losses.dage.pi3_loss` (scale-aligned local points, normals, edge,
    relative cameras, metric scale) on every sample; synthetic scenes count as synthetic-depth
    and metric data.
  - ``stage=3``: :func:`geojax.losses.dage.conf_loss` (confidence BCE; sky = the batch's
    ``sky`` mask when it has one).
  Images: uint8 ``(B, N, H, W, 3)``; in stages 2-3 the LR stream runs at ``lr_max_size``, the
  HR stream with ``hr_num_tokens`` tokens.
  """
  stage: int = 2
  lr_max_size: int = dage.LR_MAX_SIZE
  hr_num_tokens: int = dage.HR_NUM_TOKENS
  loss: tuple[tuple[str, Any], ...] = ()
  teacher_max_size: int = TEACHER_MAX_SIZE
  teacher_graphdef: Any = dataclasses.field(default=None, compare=False, repr=False)
  teacher_state: Any = dataclasses.field(default=None, compare=False, repr=False)
  family: str = "dage"

  def step_inputs(self) -> dict[str, Any] | None:
    """The teacher's weights, handed to every step as an argument (stage 1)."""
    return {"pi3_teacher": self.teacher_state} if self.stage == 1 else None

  def loss_fn(self, model, batch: dict[str, Any], rng: jax.Array
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    from geojax.losses import dage as dage_loss
    del rng
    x = jnp.asarray(batch["images"], jnp.float32) / 255.0
    gt = dage_loss.gt_from_pipeline(batch)
    b = x.shape[0]
    gt.setdefault("is_synthetic", jnp.ones((b,), bool))
    gt.setdefault("is_metric_scale", jnp.ones((b,), bool))
    kw = dict(self.loss)
    if self.stage == 1:
      total, aux = self._distill(model, x, batch["pi3_teacher"], gt, kw)
    else:
      pred = model(x, lr_max_size=self.lr_max_size, hr_num_tokens=self.hr_num_tokens)
      if self.stage == 3:
        total, aux = dage_loss.conf_loss(pred, gt, sky_mask=batch.get("sky"), **kw)
      else:
        total, aux = dage_loss.pi3_loss(pred, gt, **kw)
    return total, {k: v for k, v in aux.items() if jnp.ndim(v) == 0}

  def _distill(self, model, x, teacher_state, gt, kw):
    from geojax.losses import dage as dage_loss
    from geojax.nn import resize
    b, n, h, w, _ = x.shape
    (th, tw), student_lr = distill_resolutions(h, w, self.teacher_max_size)
    teacher = nnx.merge(self.teacher_graphdef, jax.lax.stop_gradient(teacher_state))
    xt = x.reshape(b * n, h, w, 3)
    if (th, tw) != (h, w):
      xt = jnp.clip(resize.resize_bilinear(xt, (th, tw), antialias=True), 0.0, 1.0)
    t_out = jax.lax.stop_gradient(teacher(xt.reshape(b, n, th, tw, 3),
                                          tap=teacher.cfg.dec_depth - 3, out_hw=(h, w)))
    pred = model(x, lr_resolution=student_lr, hr_num_tokens=(h // 14) * (w // 14),
                 distill=True)
    return dage_loss.distill_loss(pred, t_out, gt, student_feat=pred["student_feat"],
                                  teacher_feat=t_out["features"], **kw)


def load_teacher(tconfig, model_preset: str, dtype: Any = None):
  """The frozen Pi3 teacher of stage 1 from ``config.teacher``: official Pi3 safetensors
  (``weights``), a geojax Pi3 checkpoint (``checkpoint``), or - only for the geojax-only
  ``pi3-tiny`` preset, in smoke runs - a random initialisation. Its decoder width must equal
  the student's."""
  from geojax.models import pi3
  weights, ckpt = tconfig.get("weights", ""), tconfig.get("checkpoint", "")
  preset = tconfig.get("preset", "pi3")
  if weights and ckpt:
    raise ValueError("teacher: set either teacher.weights or teacher.checkpoint, not both")
  over = {} if dtype is None else {"dtype": dtype}
  if weights:
    from geojax.convert.pi3 import load_official
    teacher = load_official(weights, **over)
  elif ckpt:
    from geojax.models.registry import load_checkpoint
    teacher, _, _ = load_checkpoint(ckpt, family="pi3", what="teacher.checkpoint")
  elif preset in pi3.OFFICIAL_PRESETS:
    raise ValueError("stage 1 distils from a Pi3 teacher: set teacher.weights to the official "
                     "Pi3 model.safetensors (yyfz233/Pi3) or teacher.checkpoint to a geojax Pi3 "
                     "checkpoint")
  else:
    warnings.warn(f"stage 1 with a randomly initialised {preset} teacher (no teacher.weights "
                  "or teacher.checkpoint): only for smoke tests", stacklevel=2)
    teacher = pi3.Pi3.from_preset(preset, rngs=nnx.Rngs(int(tconfig.get("seed", 0))), **over)
  student = dage.get_config(model_preset)
  if teacher.cfg.dec_dim != student.dec_dim:
    raise ValueError(f"the Pi3 teacher's decoder width {teacher.cfg.dec_dim} differs from the "
                     f"{model_preset} student's {student.dec_dim}; feature distillation needs "
                     "them equal")
  return teacher


def make_task(config) -> DAGETask:
  """:class:`DAGETask` from ``config.stage``, ``config.model.lr_max_size`` /
  ``hr_num_tokens``, ``config.loss`` (keyword arguments of the stage's loss) and, for stage 1,
  ``config.teacher`` (:func:`load_teacher`)."""
  stage = int(config.get("stage", 2))
  if stage not in STAGES:
    raise ValueError(f"config.stage={stage}: DAGE trains in stages {STAGES}")
  m = config.model
  kw = dict(stage=stage, lr_max_size=int(m.get("lr_max_size", dage.LR_MAX_SIZE)),
            hr_num_tokens=int(m.get("hr_num_tokens", dage.HR_NUM_TOKENS)),
            loss=tuple(sorted(dict(config.get("loss", {})).items())))
  if stage == 1:
    t = config.get("teacher", {})
    dtype = m.get("dtype")
    teacher = load_teacher(t, m.preset, None if dtype in (None, "", "float32") else dtype)
    graphdef, state = nnx.split(teacher)
    kw.update(teacher_max_size=int(t.get("max_size", TEACHER_MAX_SIZE)),
              teacher_graphdef=graphdef, teacher_state=state)
  return DAGETask(**kw)


def initialize(model: nnx.Module, init) -> nnx.Module | None:
  """The official stage-1 initialisation (``scripts/merge_checkpoints.py``) when
  ``init.moge2`` and ``init.pi3`` are set: MoGe-2's encoder, neck and heads as the HR stream,
  Pi3's trunk and camera branch as the LR stream, the adapter / cls decoder / token splitter
  kept at their initialisation (:func:`geojax.convert.pi3.dage_init_state_dict`). Both are
  safetensors (MoGe-2's ``model.pt`` converted once with
  ``geojax convert --family dage --tensors-only``)."""
  moge2, pi3_path = init.get("moge2", ""), init.get("pi3", "")
  if not moge2 and not pi3_path:
    return None
  if not (moge2 and pi3_path):
    raise ValueError("init: the MoGe-2 + Pi3 merge needs both init.moge2 and init.pi3")
  from geojax.convert import pi3 as pi3_conv
  from geojax.convert.torch_layout import read_safetensors
  merged = pi3_conv.dage_init_state_dict(read_safetensors(moge2, "dage")[0],
                                         read_safetensors(pi3_path, "pi3")[0])
  src, loaded, kept = pi3_conv.merge_into_dage(model, merged)
  print(f"DAGE init: {len(loaded)} tensors from MoGe-2 + Pi3, {len(kept)} kept at their "
        "initialisation", flush=True)
  return src


FAMILY = register(Family(
    name="dage", build=build, predict=predict, predicts=predicts, load_official=load_official,
    presets=dage.PRESET_NAMES, model_types=(dage.DAGE,), identify_official=identify_official,
    convert_state_dict=convert_state_dict, predict_args=PREDICT_ARGS, make_task=make_task,
    initialize=initialize,
    eval_options=dict(lr_max_size=252, hr_num_tokens=dage.HR_NUM_TOKENS, chunk=0),
    demo=Demo(config_arg="runlocal", rows=(
        ("depth AbsRel (lower is better)", "abs_rel"),
        ("depth delta1 (higher is better)", "delta1"),
        ("pose AUC@30 (higher is better)", "auc30")))))
