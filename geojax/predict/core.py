"""Inference from Python: ``run(model, images) -> Prediction`` (NumPy in, NumPy out).

The model sees the views as the official DA3 API prepares them
(:mod:`geojax.predict.preprocess`); every output is at that processed resolution, with the
processed RGB pixels in ``Prediction.images`` for colouring.

Known cameras (``extrinsics`` and ``intrinsics`` of the original images) condition the camera
token, and then, as the official API does by default, the outputs are expressed in the given
frame: the returned cameras are the given ones (intrinsics rescaled to the processed size) and
depth is divided by the scale of the Sim(3) that maps the given camera centres onto the
predicted ones (Umeyama; DA3's RANSAC variant from 10 views on).

Compiled forwards are cached per model, options, input shape and mesh, so calling :func:`run` in a
loop over scenes of one size compiles once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import weakref
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from geojax.geometry import camera, unproject
from geojax.predict import preprocess as pp

RANSAC_MIN_VIEWS = 10  # the official API switches to RANSAC pose alignment from this many views


@dataclasses.dataclass
class Prediction:
  """Per-scene outputs at the processed resolution ``(h, w)``.

  Attributes:
    depth: ``(S, h, w)`` float32 z-depth (up to scale unless the model is metric or cameras
      were given).
    depth_conf: ``(S, h, w)`` float32 confidence (higher is better).
    extrinsics: ``(S, 4, 4)`` float32 world-to-camera (OpenCV axes), or None for monocular
      models.
    intrinsics: ``(S, 3, 3)`` float32 pixels, geojax convention (pixel ``(u, v)`` at integer
      coordinates is the centre of column ``u``), or None.
    world_points: ``(S, h, w, 3)`` float32 depth lifted with the cameras (camera frame when
      there are none).
    images: ``(S, h, w, 3)`` uint8 processed RGB.
    names: view names.
    input_hw: original ``(H, W)`` per view.
    sky: ``(S, h, w)`` sky probability (monocular/metric models), else None.
    seconds: wall time of the forward pass (after compilation).
  """
  depth: np.ndarray
  depth_conf: np.ndarray
  extrinsics: np.ndarray | None
  intrinsics: np.ndarray | None
  world_points: np.ndarray
  images: np.ndarray
  names: list[str]
  input_hw: list[tuple[int, int]]
  sky: np.ndarray | None = None
  seconds: float = 0.0


_CACHE: "weakref.WeakKeyDictionary[nnx.Module, dict]" = weakref.WeakKeyDictionary()


def _compiled(model: nnx.Module, options: tuple, images, ext, k, mesh):
  """``f(images, extrinsics, intrinsics)`` compiled for ``model``, static ``options``, these
  input shapes and ``mesh`` (parameters replicated over it), cached while the model lives."""
  per_model = _CACHE.setdefault(model, {})
  key = (options, jax.tree.map(lambda a: (a.shape, str(a.dtype)), (images, ext, k)),
         None if mesh is None else (mesh.axis_names, mesh.axis_sizes, tuple(mesh.device_ids.flat)))
  if key not in per_model:
    graphdef, state = nnx.split(model)
    if mesh is not None:
      state = jax.device_put(state, NamedSharding(mesh, P()))
    kwargs = dict(options)

    def apply(state, images, ext, k):
      out = nnx.merge(graphdef, state)(images, ext, k, **kwargs)
      keep = ("depth", "depth_conf", "extrinsics", "intrinsics", "sky")
      return {name: out[name] for name in keep if name in out}

    exe = jax.jit(apply).lower(state, images, ext, k).compile()
    per_model[key] = (exe, state)
  exe, state = per_model[key]
  return lambda *args: exe(state, *args)


def _shift_principal_point(k: np.ndarray, d: float) -> np.ndarray:
  """Move principal points by ``d`` pixels. DA3 works with pixel corners at integers (its
  principal points are ``(W/2, H/2)``), geojax with pixel centres at integers: DA3 -> geojax is
  ``d = -0.5``, geojax -> DA3 ``d = +0.5``."""
  k = np.array(k, np.float32)
  k[..., :2, 2] += d
  return k


def _homogeneous(ext: np.ndarray) -> np.ndarray:
  return np.asarray(camera.to_homogeneous(jnp.asarray(ext, jnp.float32)))


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


def run(model: nnx.Module, images: Sequence[np.ndarray] | np.ndarray, *,
        extrinsics: np.ndarray | None = None, intrinsics: np.ndarray | None = None,
        process_res: int = 504, process_res_method: str = "upper_bound_resize",
        ref_view_strategy: str = "saddle_balanced", use_ray_pose: bool = False,
        align_to_input_scale: bool = True, names: Sequence[str] | None = None,
        mesh: jax.sharding.Mesh | None = None) -> Prediction:
  """Predict depth, confidence, cameras and world points for the views of one scene.

  Args:
    model: a DA3 model (``geojax.models.da3``), e.g. from :func:`geojax.predict.load_model`.
    images: ``S`` uint8 RGB arrays ``(H, W, 3)`` or one ``(S, H, W, 3)`` array; file paths are
      read too.
    extrinsics, intrinsics: optional known world-to-camera ``(S, 4|3, 4)`` poses and pixel
      ``(S, 3, 3)`` intrinsics of the original images (both or neither).
    process_res, process_res_method: resolution and method of the official preprocessing.
    ref_view_strategy: reference-view choice for S >= 3 views without poses.
    use_ray_pose: cameras from the predicted ray map instead of the camera head.
    align_to_input_scale: with known cameras, return them and rescale depth to their frame (as
      the official API); False returns the predicted cameras.
    names: view names (for messages and :class:`Prediction`).
    mesh: run under this mesh; a mesh with a ``view`` axis shards the views across devices
      (see :func:`geojax.parallel.sharding.make_view_mesh`).

  Returns:
    a :class:`Prediction`.
  """
  from geojax.data.formats.scene_folder import load_rgb
  if isinstance(images, np.ndarray) and images.ndim == 4:
    images = list(images)
  images = [load_rgb(x) if isinstance(x, str) else np.asarray(x) for x in images]
  if (extrinsics is None) != (intrinsics is None):
    raise ValueError("run: pass extrinsics and intrinsics together (or neither)")
  names = list(names) if names is not None else [f"view {i}" for i in range(len(images))]
  if extrinsics is not None:
    extrinsics = np.asarray(extrinsics, np.float32)
    if extrinsics.shape not in ((len(images), 4, 4), (len(images), 3, 4)):
      raise ValueError(f"extrinsics must be ({len(images)}, 4, 4) world-to-camera; got "
                       f"{extrinsics.shape}")
    extrinsics = _homogeneous(extrinsics)
    if not (np.all(np.isfinite(extrinsics)) and np.all(np.isfinite(intrinsics))):
      raise ValueError("run: extrinsics and intrinsics must be finite")
  proc = pp.preprocess(images, intrinsics, process_res=process_res, method=process_res_method,
                       names=names)
  cfg = getattr(model, "cfg", None)
  has_cameras = bool(getattr(cfg, "cameras", True))
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
    fwd = _compiled(model, options, x, ext, k, mesh)  # once per shape, outside the timing
    t0 = time.perf_counter()
    out = jax.block_until_ready(fwd(x, ext, k))
    seconds = time.perf_counter() - t0
  out = jax.device_get(out)
  depth = np.asarray(out["depth"][0], np.float32)
  conf = np.asarray(out["depth_conf"][0], np.float32)
  pred_ext = pred_k = None
  if "extrinsics" in out:
    pred_ext = _homogeneous(out["extrinsics"][0])
    pred_k = _shift_principal_point(out["intrinsics"][0], -0.5)
  if extrinsics is not None and align_to_input_scale:
    depth = depth / _align_scale(pred_ext, extrinsics)
    pred_ext, pred_k = extrinsics.copy(), proc.intrinsics.copy()
  pts = world_points(depth, pred_k, pred_ext)
  sky = np.asarray(out["sky"][0], np.float32) if "sky" in out else None
  return Prediction(depth=depth, depth_conf=conf, extrinsics=pred_ext, intrinsics=pred_k,
                    world_points=pts, images=proc.pixels, names=names, input_hw=proc.input_hw,
                    sky=sky, seconds=seconds)
