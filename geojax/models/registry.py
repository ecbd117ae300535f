"""Model families: one interface behind ``geojax predict``, ``evaluate.py``, ``train.py``,
``demo.py`` and the benches.

A *family* is one module that builds a :class:`Family` and calls :func:`register` when it is
imported. The built-in families are listed in :mod:`geojax.families`; other packages can add
theirs through the ``geojax.families`` entry-point group (``name = "package.module"``), or a
script can simply ``register(Family(...))`` before calling the library. Nothing here names a
family: every caller looks families up by name (``get_family``), by preset
(``family_for_preset``) or by model (``family_of``).

What a family provides (only ``name``, ``build`` and ``predict`` are required):

- ``build(config, rngs)``: a model from the JSON-able config stored in checkpoints
  (``{"preset": ..., "overrides": {...}}``);
- ``load_official(path, config)``: official weights from safetensors (a file or a directory);
  ``identify_official(path)`` tells whether a path holds this family's official weights (and
  which preset); ``convert_state_dict(checkpoint)`` is the hook of ``geojax convert`` that turns
  a whole official checkpoint (pickled, loaded with ``torch.load(weights_only=True)``, tensors as
  NumPy arrays) into the tensors the safetensors file stores, or ``(tensors, config)`` with a
  JSON-able config written next to them as ``config.json``;
- ``predict(model, images, *, extrinsics, intrinsics, names, mesh, **options)``: one scene or
  video (uint8 ``(H, W, 3)`` views) -> :class:`geojax.predict.Prediction`; ``predict_args``
  declares the family's ``geojax predict`` options;
- ``predictor(model, options)``: the evaluation view of ``predict``: uint8 ``(S, H, W, 3)`` in,
  a dict of NumPy arrays at the input resolution out (standard keys below). The default adapts
  ``predict``;
- ``predicts(config)``: the output kinds the model produces (:data:`OUTPUT_KINDS`), from which
  the evaluator picks its metric groups;
- ``make_task(config)``: the training task (``task.loss_fn(model, batch, rng) -> (loss, aux)``,
  ``task.family``; optionally ``task.step_inputs()``: arrays every step reads but never updates,
  such as a distillation teacher's weights, added to each batch) for ``train.py``;
  ``model_config(config.model)`` the stored model config; ``initialize(model, config.init)``:
  initial weights from the family's own sources (e.g. a merge of other models' checkpoints), a
  model to copy from or ``None``;
- ``eval_options``: its inference options with their defaults, which ``configs/evaluate.py``
  exposes as ``model.*`` fields; ``eval_inputs(scene, options)``: per-scene predictor inputs
  made from the ground-truth scene (e.g. URGT's training-style priors), ``{}`` when none;
  ``depth_align``: the default depth alignment of ``evaluate.py`` for the family's depth (e.g.
  PPD's ``log_affine``; ``None``: the evaluator's default);
  ``demo``: its ``make demo-<family>`` run (:class:`Demo`),
  which trains ``configs/<family>.py:<config_arg>`` (the family's training config, big_vision
  style, next to ``train.py``).

Standard keys of ``predictor`` outputs: ``depth`` ``(S, H, W)`` z-depth, ``depth_conf``,
``extrinsics`` ``(S, 4, 4)`` world-to-camera and ``intrinsics`` ``(S, 3, 3)`` pixels, ``sky``,
``normals`` ``(S, H, W, 3)`` camera-frame unit normals, ``local_points`` ``(S, H, W, 3)``
camera-frame point maps (the ``pointmap`` metrics use them, else depth), ``tracks``
``(S, P, 3)`` world points of the ground truth's query points with ``track_visible`` ``(S, P)``,
``patch_depth`` / ``patch_boxes`` (one entry per view) per-crop depths ``(K, ph, pw)`` and crop
boxes ``(K, 4)`` of a model that refines crops (kind ``patches``; the ``seam`` metric),
``prior``: a dict with ``depth`` (and ``normals``) of the coarse input a refiner started from,
which the evaluator scores too (keys prefixed ``prior_``).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geojax.nn.layers import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401  (re-exported)

# What a family can produce; ``Family.predicts`` returns a subset.
OUTPUT_KINDS = ("depth", "confidence", "cameras", "points", "local_points", "normals", "tracks",
                "metric_scale", "sky", "patches")


@dataclasses.dataclass(frozen=True)
class PredictArg:
  """One ``geojax predict`` option of a family: ``add_argument(*flags, **kwargs)``; the parsed
  value reaches ``Family.predict`` as the keyword ``dest``."""
  flags: tuple[str, ...]
  kwargs: dict[str, Any]

  @property
  def dest(self) -> str:
    return self.kwargs.get("dest") or self.flags[0].lstrip("-").replace("-", "_")


@dataclasses.dataclass(frozen=True)
class Demo:
  """``make demo-<family>``: train ``train_config(config_arg)`` for a few minutes on synthetic
  scenes, evaluate before and after, and print ``rows`` (label, metric key) of the summary."""
  config_arg: str = "runlocal"
  rows: tuple[tuple[str, str], ...] = (("depth AbsRel (lower is better)", "abs_rel"),
                                       ("depth delta1 (higher is better)", "delta1"))


@dataclasses.dataclass(frozen=True)
class Family:
  """How one model family is built, loaded, run, trained and demonstrated (module docstring)."""
  name: str
  build: Callable[[dict[str, Any], nnx.Rngs], nnx.Module]
  predict: Callable[..., Any]
  predicts: Callable[[dict[str, Any]], tuple[str, ...]] = lambda config: ("depth",)
  load_official: Callable[[str, dict[str, Any]], nnx.Module] | None = None
  predictor: Callable[[nnx.Module, dict[str, Any]], Callable[[np.ndarray], dict]] | None = None
  presets: tuple[str, ...] = ()
  model_types: tuple[type, ...] = ()
  identify_official: Callable[[str], str | None] | None = None
  convert_state_dict: Callable[[Any], Any] | None = None
  predict_args: tuple[PredictArg, ...] = ()
  make_task: Callable[[Any], Any] | None = None
  model_config: Callable[[Any], dict[str, Any]] | None = None
  train_config: Callable[[str | None], Any] | None = None
  initialize: Callable[[nnx.Module, Any], nnx.Module | None] | None = None
  eval_options: dict[str, Any] = dataclasses.field(default_factory=dict)
  eval_inputs: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None
  demo: Demo | None = None
  depth_align: str | None = None

  def __post_init__(self):
    if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
      raise ValueError(f"family name must be a non-empty identifier; got {self.name!r}")
    unknown = set(self.predicts({"preset": self.presets[0] if self.presets else ""})) - set(
        OUTPUT_KINDS)
    if unknown:
      raise ValueError(f"family {self.name!r} declares unknown output kinds {sorted(unknown)}; "
                       f"expected a subset of {OUTPUT_KINDS}")

  def get_predictor(self, model: nnx.Module, options: dict[str, Any]):
    """``predict(images (S, H, W, 3) uint8) -> dict`` at the input resolution (for evaluation)."""
    if self.predictor is not None:
      return self.predictor(model, options)
    return _predictor_from_predict(self, model, options)


FAMILIES: dict[str, Family] = {}
_LOADED = False


def register(family: Family, *, replace: bool = False) -> Family:
  """Add ``family`` to the registry (``replace=True`` to redefine one, e.g. in a notebook)."""
  if family.name in FAMILIES and not replace and FAMILIES[family.name] is not family:
    raise ValueError(f"a model family named {family.name!r} is already registered")
  for other in FAMILIES.values():
    clash = set(family.presets) & set(other.presets)
    if other.name != family.name and clash:
      raise ValueError(f"family {family.name!r}: presets {sorted(clash)} already belong to "
                       f"{other.name!r}")
  FAMILIES[family.name] = family
  return family


def unregister(name: str) -> None:
  FAMILIES.pop(name, None)


def _load_builtin() -> None:
  """Import the built-in families and those of installed plug-ins (entry points), once."""
  global _LOADED
  if _LOADED:
    return
  _LOADED = True
  importlib.import_module("geojax.families")
  from importlib.metadata import entry_points
  for ep in entry_points(group="geojax.families"):
    importlib.import_module(ep.value)


def families() -> dict[str, Family]:
  _load_builtin()
  return dict(FAMILIES)


def get_family(name: str) -> Family:
  _load_builtin()
  if name not in FAMILIES:
    raise ValueError(f"unknown model family {name!r}; registered: {sorted(FAMILIES)}")
  return FAMILIES[name]


def family_for_preset(preset: str) -> Family:
  """The family that defines ``preset``."""
  _load_builtin()
  for fam in FAMILIES.values():
    if preset in fam.presets:
      return fam
  known = sorted(p for f in FAMILIES.values() for p in f.presets)
  raise ValueError(f"unknown preset {preset!r}; known presets: {known}")


def family_of(model: nnx.Module) -> Family:
  """The family whose ``model_types`` ``model`` is an instance of."""
  _load_builtin()
  for fam in FAMILIES.values():
    if fam.model_types and isinstance(model, fam.model_types):
      return fam
  raise ValueError(f"{type(model).__name__} belongs to no registered model family "
                   f"({sorted(FAMILIES)}); load models with geojax.predict.load_model or "
                   "register their family")


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


def config_overrides(config: dict[str, Any]) -> dict[str, Any]:
  """Runtime overrides of a stored config; ``dtype`` is stored as a string (``"bfloat16"``)."""
  out = dict(config.get("overrides", {}))
  if isinstance(out.get("dtype"), str):
    out["dtype"] = jnp.dtype(out["dtype"])
  return out


def resize_map(x: np.ndarray, h: int, w: int) -> np.ndarray:
  """Bilinear resize of ``(S, h', w')`` or ``(S, h', w', C)`` float maps to ``(S, h, w[, C])``."""
  if x.shape[1:3] == (h, w):
    return x
  return np.asarray(jax.image.resize(jnp.asarray(x), (x.shape[0], h, w) + x.shape[3:], "linear"))


def _predictor_from_predict(family: Family, model: nnx.Module, options: dict[str, Any]):
  """Run ``family.predict`` on a scene and bring every map back to the input resolution."""
  def predict(images: np.ndarray, **extra) -> dict[str, np.ndarray]:
    """``extra``: per-scene inputs such as ``track_queries`` (P, 3) ``(t, u, v)`` pixels."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 (S, H, W, 3); got {images.dtype} {images.shape}")
    h, w = images.shape[1:3]
    names = [f"view {i}" for i in range(len(images))]
    pred = family.predict(model, list(images), names=names, **options, **extra)
    ph, pw = pred.depth.shape[1:3]
    if pred.tracks is not None and (ph, pw) != (h, w):
      raise ValueError(f"family {family.name!r}: tracks need a predictor that works at the input "
                       f"resolution (predicted {pw}x{ph} for {w}x{h} inputs)")
    out = {"depth": resize_map(pred.depth, h, w)}
    for key, value in (("depth_conf", pred.depth_conf), ("sky", pred.sky),
                       ("local_points", pred.local_points)):
      if value is not None:
        out[key] = resize_map(value, h, w)
    if pred.normals is not None:
      n = resize_map(pred.normals, h, w)
      out["normals"] = n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    if pred.extrinsics is not None:
      k = np.array(pred.intrinsics, np.float32)
      # geojax pixel centres: c -> (c + 0.5) * s - 0.5 for a resize by s
      k[:, 0, :] *= w / pw
      k[:, 1, :] *= h / ph
      k[:, 0, 2] += 0.5 * w / pw - 0.5
      k[:, 1, 2] += 0.5 * h / ph - 0.5
      out.update(extrinsics=pred.extrinsics, intrinsics=k)
    if pred.tracks is not None:
      out.update(tracks=pred.tracks, track_visible=pred.track_visibility)
    return out
  return predict
