"""Inference from Python: ``run(model, images) -> Prediction`` (NumPy in, NumPy out).

:func:`run` finds the model's family in the registry (:mod:`geojax.models.registry`) and calls
its ``predict``: the family prepares the views as its official code does, runs the network and
fills the fields of :class:`Prediction` it has. :func:`run` then validates what came back,
lifts depth to world points where the family gave none and warns, in one line each, about
degenerate outputs (non-finite depth, cameras that are non-finite or whose field of view is
below 1 or above 179 degrees), which are still returned and exported.

Families keep compiled forwards per model, options, input shape and mesh, so calling :func:`run`
in a loop over scenes of one size compiles once.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geojax.geometry import camera, unproject

MIN_FOV_DEG, MAX_FOV_DEG = 1.0, 179.0  # fields of view outside this range are degenerate
# folders an exported scene already uses (``Prediction.extras`` must not reuse them)
EXPORT_NAMES = frozenset({"images", "depth", "depth_vis", "confidence", "normals", "point_map",
                          "point_map_local", "sky", "colmap"})


@dataclasses.dataclass
class Prediction:
  """Per-scene outputs at the resolution the model worked at, ``(h, w)``; a family fills what
  it predicts and leaves the rest None.

  Attributes:
    depth: ``(S, h, w)`` float32 z-depth (up to scale unless the model is metric or cameras
      were given).
    depth_conf: ``(S, h, w)`` float32 confidence (higher is better), or None.
    extrinsics: ``(S, 4, 4)`` float32 world-to-camera (OpenCV axes), or None for monocular
      models.
    intrinsics: ``(S, 3, 3)`` float32 pixels, geojax convention (pixel ``(u, v)`` at integer
      coordinates is the centre of column ``u``), or None.
    world_points: ``(S, h, w, 3)`` float32 world point map: the family's own, or depth lifted
      with the cameras (camera frame when there are none).
    images: ``(S, h, w, 3)`` uint8 RGB the model saw.
    names: view names.
    input_hw: original ``(H, W)`` per view.
    sky: ``(S, h, w)`` sky probability, or None.
    local_points: ``(S, h, w, 3)`` float32 camera-frame point map, or None.
    normals: ``(S, h, w, 3)`` float32 camera-frame unit normals (OpenCV axes), or None.
    tracks: ``(S, P, 3)`` float32 world positions of ``P`` tracked points at every frame, or None.
    track_visibility: ``(S, P)`` float32 in [0, 1] (or bool): the point is visible in frame s.
    track_queries: ``(P, 3)`` float32 ``(t, u, v)``: frame and pixel each track starts from.
    metric_scale: metres per unit of depth / points (multiply to get metres) when the model
      predicts scale separately, else None.
    seconds: wall time of the forward pass (after compilation).
    warnings: the degenerate-output messages :func:`run` reported.
    points_from_depth: ``world_points`` were lifted from depth by :func:`run` (the family gave
      no point map of its own).
    extras: further per-view maps a family returns, ``{name: (S, h, w) or (S, h, w, 3)}``
      (e.g. URGT's priors next to the refinement); exported as ``<name>/<stem>.npy`` and a
      picture each.
  """
  depth: np.ndarray
  depth_conf: np.ndarray | None
  extrinsics: np.ndarray | None
  intrinsics: np.ndarray | None
  world_points: np.ndarray | None
  images: np.ndarray
  names: list[str]
  input_hw: list[tuple[int, int]]
  sky: np.ndarray | None = None
  seconds: float = 0.0
  local_points: np.ndarray | None = None
  normals: np.ndarray | None = None
  tracks: np.ndarray | None = None
  track_visibility: np.ndarray | None = None
  track_queries: np.ndarray | None = None
  metric_scale: float | None = None
  warnings: list[str] = dataclasses.field(default_factory=list)
  points_from_depth: bool = False
  extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def kinds(self) -> tuple[str, ...]:
    """The output kinds present (:data:`geojax.models.registry.OUTPUT_KINDS`)."""
    have = {"depth": self.depth, "confidence": self.depth_conf, "cameras": self.extrinsics,
            "points": self.world_points, "local_points": self.local_points,
            "normals": self.normals, "tracks": self.tracks, "metric_scale": self.metric_scale,
            "sky": self.sky}
    return tuple(k for k, v in have.items() if v is not None)


def assumed_intrinsics(s: int, h: int, w: int) -> np.ndarray:
  """``(s, 3, 3)`` intrinsics used when a model predicts no cameras: a 60-degree horizontal
  field of view, principal point at the image centre (geojax pixel convention)."""
  f = (w / 2) / np.tan(np.radians(30))
  k = np.array([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1]], np.float32)
  return np.tile(k, (s, 1, 1))


def world_points(depth: np.ndarray, intrinsics: np.ndarray | None,
                 extrinsics: np.ndarray | None) -> np.ndarray:
  """Lift z-depth ``(S, h, w)`` to world points ``(S, h, w, 3)`` (geojax pixel convention);
  without cameras, :func:`assumed_intrinsics` in each camera's frame."""
  if intrinsics is None:
    intrinsics = assumed_intrinsics(*depth.shape)
  d, k = jnp.asarray(depth, jnp.float32), jnp.asarray(intrinsics, jnp.float32)
  if extrinsics is None:
    return np.asarray(unproject.depth_to_camera_points(d, k))
  return np.asarray(unproject.depth_to_world_points(d, k, jnp.asarray(extrinsics, jnp.float32)))


def point_map_prediction(out: dict[str, Any], pixels: np.ndarray, names: list[str],
                         input_hw: list[tuple[int, int]], *, seconds: float = 0.0
                         ) -> Prediction:
  """A :class:`Prediction` from the outputs of a point-map model's ``infer`` (batch 1):
  ``local_points`` ``(1, S, h, w, 3)``, ``global_points``, ``conf`` logits, ``camera_poses``
  camera-to-world, ``intrinsics`` normalised by the image size with the principal point as a
  fraction (0.5 = the centre), optional ``metric_scale``. ``pixels`` ``(S, h, w, 3)``: what the
  model saw."""
  s, h, w = pixels.shape[:3]
  c2w = np.asarray(out["camera_poses"][0], np.float32)
  w2c = np.asarray(camera.rigid_inverse(jnp.asarray(c2w)), np.float32)
  kn = np.asarray(out["intrinsics"][0], np.float32)
  k = np.zeros((s, 3, 3), np.float32)
  k[:, 0, 0], k[:, 1, 1] = kn[:, 0, 0] * w, kn[:, 1, 1] * h
  # a normalised principal point of 0.5 is the image centre; geojax pixels have integer centres
  k[:, 0, 2], k[:, 1, 2], k[:, 2, 2] = kn[:, 0, 2] * w - 0.5, kn[:, 1, 2] * h - 0.5, 1.0
  local = np.asarray(out["local_points"][0], np.float32)
  scale = out.get("metric_scale")
  return Prediction(
      depth=local[..., 2], depth_conf=np.asarray(jax.nn.sigmoid(out["conf"][0]), np.float32),
      extrinsics=w2c, intrinsics=k, world_points=np.asarray(out["global_points"][0], np.float32),
      images=pixels, names=names, input_hw=input_hw, local_points=local,
      metric_scale=None if scale is None else float(np.asarray(scale).reshape(-1)[0]),
      seconds=seconds)


def homogeneous(ext: np.ndarray) -> np.ndarray:
  """``(S, 3|4, 4)`` -> ``(S, 4, 4)`` float32."""
  return np.asarray(camera.to_homogeneous(jnp.asarray(ext, jnp.float32)))


def degenerate_outputs(pred: Prediction) -> list[str]:
  """One message per kind of degenerate output in ``pred`` (empty when all is well)."""
  msgs = []
  s, h, w = pred.depth.shape
  bad = ~np.isfinite(pred.depth)
  if bad.any():
    views = np.flatnonzero(bad.reshape(s, -1).any(1))
    msgs.append(f"non-finite depth in {int(bad.sum())} pixels of {len(views)} view(s) "
                f"(first: {pred.names[views[0]]})")
  if pred.extrinsics is not None:
    ext_ok = np.isfinite(pred.extrinsics).reshape(s, -1).all(1)
    k = np.asarray(pred.intrinsics, np.float64)
    k_ok = np.isfinite(k).reshape(s, -1).all(1)
    with np.errstate(divide="ignore", invalid="ignore"):
      fov_w = np.degrees(2 * np.arctan2(w / 2, np.abs(k[:, 0, 0])))
      fov_h = np.degrees(2 * np.arctan2(h / 2, np.abs(k[:, 1, 1])))
    fov_ok = ((fov_w >= MIN_FOV_DEG) & (fov_w <= MAX_FOV_DEG) & (fov_h >= MIN_FOV_DEG)
              & (fov_h <= MAX_FOV_DEG))
    nonfinite = np.flatnonzero(~(ext_ok & k_ok))
    if len(nonfinite):
      msgs.append(f"non-finite predicted camera in {len(nonfinite)} view(s) "
                  f"(first: {pred.names[nonfinite[0]]})")
    narrow = np.flatnonzero(k_ok & ~fov_ok)
    if len(narrow):
      i = narrow[0]
      msgs.append(f"degenerate predicted camera in {len(narrow)} view(s): field of view "
                  f"{fov_w[i]:.3g} x {fov_h[i]:.3g} degrees (fx {k[i, 0, 0]:.3g}, fy "
                  f"{k[i, 1, 1]:.3g} at {w}x{h}) in {pred.names[i]}, outside "
                  f"[{MIN_FOV_DEG:g}, {MAX_FOV_DEG:g}]; the point cloud will be distorted")
  if pred.tracks is not None and not np.isfinite(pred.tracks).all():
    msgs.append(f"non-finite 3D tracks in {int((~np.isfinite(pred.tracks)).any(-1).sum())} "
                "(frame, track) entries")
  return msgs


def _check_prediction(pred: Prediction, family: str) -> None:
  s = len(pred.names)
  if pred.depth.ndim != 3 or pred.depth.shape[0] != s:
    raise ValueError(f"family {family!r} returned depth of shape {pred.depth.shape}; expected "
                     f"({s}, h, w)")
  h, w = pred.depth.shape[1:]
  shapes = {"depth_conf": (s, h, w), "sky": (s, h, w), "images": (s, h, w, 3),
            "world_points": (s, h, w, 3), "local_points": (s, h, w, 3),
            "normals": (s, h, w, 3), "extrinsics": (s, 4, 4), "intrinsics": (s, 3, 3)}
  for name, shape in shapes.items():
    value = getattr(pred, name)
    if value is not None and tuple(value.shape) != shape:
      raise ValueError(f"family {family!r} returned {name} of shape {value.shape}; expected "
                       f"{shape}")
  for name, value in pred.extras.items():
    if not name.replace("_", "").isalnum() or name in EXPORT_NAMES:
      raise ValueError(f"family {family!r} returned an extra map named {name!r}; expected an "
                       f"identifier other than {sorted(EXPORT_NAMES)}")
    if tuple(value.shape[:3]) != (s, h, w) or value.ndim not in (3, 4) or (
        value.ndim == 4 and value.shape[-1] != 3):
      raise ValueError(f"family {family!r} returned extra map {name!r} of shape {value.shape}; "
                       f"expected {(s, h, w)} or {(s, h, w, 3)}")
  if (pred.extrinsics is None) != (pred.intrinsics is None):
    raise ValueError(f"family {family!r} returned only one of extrinsics and intrinsics")
  if pred.tracks is not None:
    if pred.tracks.ndim != 3 or pred.tracks.shape[0] != s or pred.tracks.shape[2] != 3:
      raise ValueError(f"family {family!r} returned tracks of shape {pred.tracks.shape}; "
                       f"expected ({s}, P, 3)")
    if pred.track_visibility is None or pred.track_visibility.shape != pred.tracks.shape[:2]:
      raise ValueError(f"family {family!r}: tracks need track_visibility of shape "
                       f"{pred.tracks.shape[:2]}")


def run(model: nnx.Module, images: Sequence[np.ndarray] | np.ndarray, *,
        extrinsics: np.ndarray | None = None, intrinsics: np.ndarray | None = None,
        names: Sequence[str] | None = None, mesh: jax.sharding.Mesh | None = None,
        warn: bool = True, **options: Any) -> Prediction:
  """Predict what the model's family predicts for the views of one scene or video.

  Args:
    model: a geojax model of a registered family, e.g. from :func:`geojax.predict.load_model`.
    images: ``S`` uint8 RGB arrays ``(H, W, 3)`` or one ``(S, H, W, 3)`` array; file paths are
      read too.
    extrinsics, intrinsics: optional known world-to-camera ``(S, 4|3, 4)`` poses and pixel
      ``(S, 3, 3)`` intrinsics of the original images (both or neither), for families that take
      them.
    names: view names (for messages and :class:`Prediction`).
    mesh: run under this mesh; a mesh with a ``view`` axis shards the views across devices
      where the family supports it (see :func:`geojax.parallel.sharding.make_view_mesh`).
    warn: report degenerate outputs with :func:`warnings.warn` (they are always listed in
      ``Prediction.warnings``).
    **options: the family's inference options (``geojax predict --help`` lists them per
      family), e.g. ``process_res=504``.

  Returns:
    a :class:`Prediction`.
  """
  from geojax.data.formats.scene_folder import load_rgb
  if isinstance(images, np.ndarray) and images.ndim == 4:
    images = list(images)
  images = [load_rgb(x) if isinstance(x, str) else np.asarray(x) for x in images]
  if not images:
    raise ValueError("run: no images given")
  for i, im in enumerate(images):
    if im.ndim != 3 or im.shape[-1] != 3 or im.dtype != np.uint8:
      raise ValueError(f"run: image {i} must be uint8 (H, W, 3) RGB; got {im.dtype} {im.shape}")
  if (extrinsics is None) != (intrinsics is None):
    raise ValueError("run: pass extrinsics and intrinsics together (or neither)")
  names = list(names) if names is not None else [f"view {i}" for i in range(len(images))]
  if len(names) != len(images):
    raise ValueError(f"run: {len(names)} names for {len(images)} images")
  if extrinsics is not None:
    extrinsics = np.asarray(extrinsics, np.float32)
    if extrinsics.shape not in ((len(images), 4, 4), (len(images), 3, 4)):
      raise ValueError(f"extrinsics must be ({len(images)}, 4, 4) world-to-camera; got "
                       f"{extrinsics.shape}")
    extrinsics = homogeneous(extrinsics)
    intrinsics = np.asarray(intrinsics, np.float32)
    if intrinsics.shape != (len(images), 3, 3):
      raise ValueError(f"intrinsics must be ({len(images)}, 3, 3) pixels; got "
                       f"{intrinsics.shape}")
    if not (np.all(np.isfinite(extrinsics)) and np.all(np.isfinite(intrinsics))):
      raise ValueError("run: extrinsics and intrinsics must be finite")
  from geojax.models import registry
  family = registry.family_of(model)
  pred = family.predict(model, images, extrinsics=extrinsics, intrinsics=intrinsics,
                        names=names, mesh=mesh, **options)
  _check_prediction(pred, family.name)
  if pred.world_points is None:
    pred.world_points = world_points(pred.depth, pred.intrinsics, pred.extrinsics)
    pred.points_from_depth = True
  pred.warnings = degenerate_outputs(pred)
  if warn:
    for msg in pred.warnings:
      warnings.warn(msg, stacklevel=2)
  return pred
