"""Back-projection, projection and DA3 ray maps.

Conventions: OpenCV camera axes (x right, y down, z forward); ``depth`` is z-depth (distance
along the optical axis, not along the ray); extrinsics are world-to-camera (w2c,
``x_cam = R x_world + t``) as ``(..., 3, 4)`` or ``(..., 4, 4)``; intrinsics ``K`` are
``(..., 3, 3)`` in pixels of the map they are applied to (rescale with
:func:`geojax.geometry.camera.scale_intrinsics` for maps of another resolution).

Pixel ``(u, v)`` is column ``u``, row ``v``; its centre sits at ``(u + offset, v + offset)`` with
``offset = 0`` by default (integer coordinates are pixel centres, the convention of
``geojax.data.synthetic``). DA3's camera decoder (principal point ``(W/2, H/2)``) and its ray ->
pose solver (:func:`geojax.geometry.ray_pose.pose_from_rays`, which reads pixel ``j`` at
``j + 0.5``) correspond to ``offset = 0.5``.

Batching: maps carry arbitrary leading dims ``(..., H, W)``. For point transforms the batch
dims of the camera (``(..., 3|4, 4)`` or ``(..., 3, 3)``) align with the *leading* dims of the
points; all remaining point dims are free, e.g. w2c ``(B, S, 4, 4)`` with points
``(B, S, H, W, 3)`` or ``(B, S, N, 3)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from geojax.geometry.camera import camera_center

_HP = jax.lax.Precision.HIGHEST


def pixel_grid(h: int, w: int, *, offset: float = 0.0, dtype=jnp.float32) -> jax.Array:
  """``(h, w, 2)`` pixel-centre coordinates ``(u, v)`` = ``(column + offset, row + offset)``."""
  u = jnp.arange(w, dtype=dtype) + offset
  v = jnp.arange(h, dtype=dtype) + offset
  uu, vv = jnp.meshgrid(u, v, indexing="xy")
  return jnp.stack([uu, vv], -1)


def camera_rays(k: jax.Array, h: int, w: int, *, offset: float = 0.0) -> jax.Array:
  """Camera-frame ray directions ``K^-1 [u, v, 1]`` (unnormalised, z = 1 for pinhole K).

  Args:
    k: ``(..., 3, 3)`` intrinsics.
    h, w: map size.
    offset: pixel-centre offset (module docstring).

  Returns:
    ``(..., h, w, 3)``.
  """
  k = jnp.asarray(k, jnp.result_type(k, jnp.float32))
  pix = pixel_grid(h, w, offset=offset, dtype=k.dtype)
  pix = jnp.concatenate([pix, jnp.ones_like(pix[..., :1])], -1)
  k_inv = jnp.linalg.inv(k)
  return jnp.einsum("...ij,hwj->...hwi", k_inv, pix, precision=_HP)


def depth_to_camera_points(depth: jax.Array, k: jax.Array, *, offset: float = 0.0) -> jax.Array:
  """Back-project z-depth ``(..., H, W)`` with ``K`` ``(..., 3, 3)`` -> ``(..., H, W, 3)``."""
  h, w = depth.shape[-2:]
  return camera_rays(k, h, w, offset=offset) * depth[..., None]


def _rigid_apply(points: jax.Array, rot: jax.Array, trans: jax.Array) -> jax.Array:
  """``rot @ p + trans`` with the batch dims of ``rot`` aligned to the leading dims of points."""
  nb = rot.ndim - 2
  flat = points.reshape(points.shape[:nb] + (-1, 3))
  out = jnp.einsum("...ij,...nj->...ni", rot, flat, precision=_HP) + trans[..., None, :]
  return out.reshape(out.shape[:-2] + points.shape[nb:])


def world_to_camera(points: jax.Array, w2c: jax.Array) -> jax.Array:
  """World points ``(..., *P, 3)`` -> camera frame: ``R x + t``."""
  return _rigid_apply(points, w2c[..., :3, :3], w2c[..., :3, 3])


def camera_to_world(points: jax.Array, w2c: jax.Array) -> jax.Array:
  """Camera-frame points ``(..., *P, 3)`` -> world: ``R^T (x - t)`` for w2c ``[R | t]``."""
  rt = jnp.swapaxes(w2c[..., :3, :3], -1, -2)
  return _rigid_apply(points, rt, camera_center(w2c))


def depth_to_world_points(depth: jax.Array, k: jax.Array, w2c: jax.Array, *,
                          offset: float = 0.0) -> jax.Array:
  """Z-depth ``(..., H, W)``, ``K`` ``(..., 3, 3)``, w2c ``(..., 3|4, 4)`` -> ``(..., H, W, 3)``."""
  return camera_to_world(depth_to_camera_points(depth, k, offset=offset), w2c)


def project(points: jax.Array, k: jax.Array, *, eps: float = 1e-12) -> tuple[jax.Array, jax.Array]:
  """Pinhole projection of camera-frame points.

  Args:
    points: ``(..., *P, 3)`` camera-frame points.
    k: ``(..., 3, 3)`` intrinsics (batch dims aligned with the leading dims of ``points``).
    eps: ``|z|`` below this is replaced by ``eps`` in the division (finite output, no NaN
      gradients); mask such points with ``z > 0`` downstream.

  Returns:
    ``(uv, z)``: pixel coordinates ``(..., *P, 2)`` in the convention of ``k`` and depth
    ``(..., *P)``.
  """
  z = points[..., 2]
  hom = _rigid_apply(points, k, jnp.zeros(k.shape[:-2] + (3,), k.dtype))
  zs = jnp.where(jnp.abs(hom[..., 2]) > eps, hom[..., 2], eps)
  return hom[..., :2] / zs[..., None], z


def cameras_to_ray_map(k: jax.Array, w2c: jax.Array, h: int, w: int, *,
                       offset: float = 0.0) -> jax.Array:
  """DA3 ray map ``(..., h, w, 6)`` of cameras ``K`` ``(..., 3, 3)`` and w2c ``(..., 3|4, 4)``.

  Channels 0..2: unnormalised world-frame direction ``d = R_c2w K^-1 [u, v, 1]`` (camera-frame
  z = 1, so world points are ``origin + depth * d`` for z-depth); channels 3..5: the camera
  centre (ray origin), the layout DA3's code reads. ``K`` must be in pixels of an ``h x w`` map.
  Feeding :func:`geojax.geometry.ray_pose.pose_from_rays` recovers the cameras exactly when the
  principal point is centred in that solver's convention, i.e. with ``offset=0.5`` for
  ``c = (w/2, h/2)`` (or ``offset=0`` for ``c = ((w-1)/2, (h-1)/2)``, returned shifted by +0.5).
  """
  rays = camera_rays(k, h, w, offset=offset)
  r = w2c[..., :3, :3]
  d = jnp.einsum("...ji,...hwj->...hwi", r, rays, precision=_HP)  # R^T K^-1 p
  origin = camera_center(w2c)[..., None, None, :]
  shape = jnp.broadcast_shapes(d.shape, origin.shape)
  return jnp.concatenate([jnp.broadcast_to(d, shape), jnp.broadcast_to(origin, shape)], -1)


def points_from_depth_and_rays(depth: jax.Array, ray_map: jax.Array) -> jax.Array:
  """World points ``origin + depth * d`` from z-depth ``(..., H, W)`` and a ray map
  ``(..., H, W, 6)`` (direction first, origin last) -> ``(..., H, W, 3)``."""
  return ray_map[..., 3:] + depth[..., None] * ray_map[..., :3]
