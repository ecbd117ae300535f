"""Rigid transforms, intrinsics and the 9-D camera encoding ``[t, q_xyzw, fov_h, fov_w]``.

Conventions: OpenCV camera axes (x right, y down, z forward); quaternions are scalar-last (xyzw)
with ``w >= 0``; extrinsics are world-to-camera (w2c, ``x_cam = R x_world + t``) unless a name
says ``c2w``, given as ``(..., 3, 4)`` or ``(..., 4, 4)``; intrinsics are ``(..., 3, 3)`` in
pixels. Pixel centres sit at integer coordinates plus ``offset`` (default 0: pixel ``(u, v)`` in
column ``u``, row ``v`` is centred at ``(u, v)``; DA3's decoder and ray solver use 0.5, i.e. an
image spans ``[0, W] x [0, H]``). Quaternion helpers live in :mod:`geojax.geometry.rotation` and
are re-exported here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from geojax.geometry.rotation import mat_to_quat, quat_to_mat

_HP = jax.lax.Precision.HIGHEST


def rigid_inverse(a: jax.Array) -> jax.Array:
  """Inverse of a rigid ``[R | t]`` (3x4 or 4x4) as ``[R^T | -R^T t]``, same shape."""
  r, t = a[..., :3, :3], a[..., :3, 3:]
  rt = jnp.swapaxes(r, -1, -2)
  top = jnp.concatenate([rt, -rt @ t], -1)
  if a.shape[-2] == 4:
    return jnp.concatenate([top, a[..., 3:, :]], -2)
  return top


def to_homogeneous(a: jax.Array) -> jax.Array:
  """Pad ``(..., 3, 4)`` extrinsics to ``(..., 4, 4)``; 4x4 input is returned unchanged."""
  if a.shape[-2] == 4:
    return a
  bottom = jnp.broadcast_to(jnp.array([0.0, 0.0, 0.0, 1.0], a.dtype), a.shape[:-2] + (1, 4))
  return jnp.concatenate([a, bottom], -2)


def encode_pose(c2w: jax.Array, intrinsics: jax.Array, image_hw: tuple[int, int]) -> jax.Array:
  """``[t_c2w (3), q_xyzw(R_c2w) (4), fov_h, fov_w]``; the principal point is ignored."""
  h, w = image_hw
  quat = mat_to_quat(c2w[..., :3, :3])
  fov_h = 2 * jnp.arctan((h / 2) / intrinsics[..., 1, 1])
  fov_w = 2 * jnp.arctan((w / 2) / intrinsics[..., 0, 0])
  return jnp.concatenate([c2w[..., :3, 3], quat, fov_h[..., None], fov_w[..., None]], -1)


def decode_pose(enc: jax.Array, image_hw: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  """Inverse of :func:`encode_pose`: ``(c2w 3x4, K)`` with the principal point at the centre."""
  h, w = image_hw
  rot = quat_to_mat(enc[..., 3:7])
  c2w = jnp.concatenate([rot, enc[..., :3, None]], -1)
  fy = (h / 2.0) / jnp.maximum(jnp.tan(enc[..., 7] / 2.0), 1e-6)
  fx = (w / 2.0) / jnp.maximum(jnp.tan(enc[..., 8] / 2.0), 1e-6)
  z = jnp.zeros_like(fx)
  k = jnp.stack([fx, z, z + w / 2, z, fy, z + h / 2, z, z, z + 1.0], -1)
  return c2w, k.reshape(enc.shape[:-1] + (3, 3))


def normalize_extrinsics(w2c: jax.Array) -> jax.Array:
  """Express poses relative to view 0 and scale by the median camera distance (>= 0.1).

  ``(B, S, 4, 4)`` w2c -> ``(B, S, 4, 4)``: ``w2c_i @ inv(w2c_0)``, translations divided by the
  (lower) median over views of ``|camera centre|``, clamped to at least 0.1. This is the
  normalisation DA3's API applies before its camera encoder.
  """
  w2c = to_homogeneous(w2c)
  rel = w2c @ rigid_inverse(w2c[:, :1])
  dists = jnp.linalg.norm(rigid_inverse(rel)[..., :3, 3], axis=-1)  # (B, S)
  s = dists.shape[-1]
  med = jnp.sort(dists, -1)[..., (s - 1) // 2]  # torch.median: lower middle value
  med = jnp.maximum(med, 0.1)
  return rel.at[..., :3, 3].divide(med[:, None, None])


invert_pose = rigid_inverse
w2c_to_c2w = rigid_inverse
c2w_to_w2c = rigid_inverse


def to_3x4(a: jax.Array) -> jax.Array:
  """Drop the homogeneous row: ``(..., 4, 4)`` -> ``(..., 3, 4)``; 3x4 input is unchanged."""
  return a[..., :3, :]


def make_pose(rot: jax.Array, trans: jax.Array) -> jax.Array:
  """``[R | t]`` as ``(..., 3, 4)`` from rotations ``(..., 3, 3)`` and translations ``(..., 3)``."""
  batch = jnp.broadcast_shapes(rot.shape[:-2], trans.shape[:-1])
  rot = jnp.broadcast_to(rot, batch + (3, 3))
  trans = jnp.broadcast_to(trans, batch + (3,))
  return jnp.concatenate([rot, trans[..., None]], -1)


def compose_poses(a: jax.Array, b: jax.Array) -> jax.Array:
  """Rigid product ``a @ b`` (apply ``b`` first); 3x4 if both inputs are 3x4, else 4x4."""
  ra, ta = a[..., :3, :3], a[..., :3, 3:]
  rb, tb = b[..., :3, :3], b[..., :3, 3:]
  out = jnp.concatenate([jnp.matmul(ra, rb, precision=_HP),
                         jnp.matmul(ra, tb, precision=_HP) + ta], -1)
  if a.shape[-2] == 4 or b.shape[-2] == 4:
    return to_homogeneous(out)
  return out


def relative_pose(a: jax.Array, b: jax.Array, *, c2w: bool = False) -> jax.Array:
  """Pose of camera ``b`` relative to camera ``a`` (``a``'s camera frame taken as the world).

  For w2c inputs this is the w2c ``b @ inv(a)``: it maps points in ``a``'s camera frame to
  ``b``'s (``relative_pose(a, a)`` is the identity; ``normalize_extrinsics`` uses it with view
  0). With ``c2w=True`` both inputs and the output are c2w: ``inv(a) @ b``. Output is 3x4 when
  both inputs are 3x4, else 4x4.
  """
  if c2w:
    return compose_poses(rigid_inverse(a), b)
  return compose_poses(b, rigid_inverse(a))


def camera_center(w2c: jax.Array) -> jax.Array:
  """World-frame camera centre ``-R^T t`` of ``(..., 3|4, 4)`` w2c extrinsics -> ``(..., 3)``."""
  r, t = w2c[..., :3, :3], w2c[..., :3, 3]
  return -jnp.einsum("...ji,...j->...i", r, t, precision=_HP)


def make_intrinsics(fx: jax.Array, fy: jax.Array, cx: jax.Array, cy: jax.Array) -> jax.Array:
  """Pinhole ``K`` (..., 3, 3) from broadcastable focal lengths and principal point (pixels)."""
  fx, fy, cx, cy = jnp.broadcast_arrays(*(jnp.asarray(x, jnp.result_type(x, jnp.float32))
                                          for x in (fx, fy, cx, cy)))
  z = jnp.zeros_like(fx)
  return jnp.stack([fx, z, cx, z, fy, cy, z, z, z + 1], -1).reshape(fx.shape + (3, 3))


def intrinsics_from_fov(fov_h: jax.Array, fov_w: jax.Array, h: int, w: int) -> jax.Array:
  """``K`` from vertical/horizontal FoV (radians) of an ``h x w`` image, principal point
  ``(w/2, h/2)``: ``fy = (h/2) / tan(fov_h/2)``, ``fx = (w/2) / tan(fov_w/2)`` (tan clamped to
  1e-6 as in DA3). Inverse of :func:`fov_from_intrinsics`; ``(...)`` -> ``(..., 3, 3)``."""
  fov_h, fov_w = (jnp.asarray(x, jnp.result_type(x, jnp.float32)) for x in (fov_h, fov_w))
  fy = (h / 2.0) / jnp.maximum(jnp.tan(fov_h / 2.0), 1e-6)
  fx = (w / 2.0) / jnp.maximum(jnp.tan(fov_w / 2.0), 1e-6)
  return make_intrinsics(fx, fy, w / 2.0, h / 2.0)


def fov_from_intrinsics(k: jax.Array, h: int, w: int) -> tuple[jax.Array, jax.Array]:
  """``(fov_h, fov_w)`` in radians of an ``h x w`` image: ``2 atan((h/2) / fy)``,
  ``2 atan((w/2) / fx)`` (the principal point is ignored, as in the 9-D pose encoding)."""
  fov_h = 2.0 * jnp.arctan((h / 2.0) / k[..., 1, 1])
  fov_w = 2.0 * jnp.arctan((w / 2.0) / k[..., 0, 0])
  return fov_h, fov_w


def scale_intrinsics(k: jax.Array, sx: float | jax.Array, sy: float | jax.Array, *,
                     offset: float = 0.0) -> jax.Array:
  """Intrinsics after resizing the image by ``(sx, sy)`` = ``(new_w / w, new_h / h)``.

  The resize maps the image extent onto the new extent (pixel-area alignment, as in
  ``jax.image.resize`` / OpenCV / PIL). With pixel centres at ``integer + offset`` the image
  edge sits at ``offset - 0.5``, hence ``f' = s f`` and ``c' = s c + (offset - 0.5)(1 - s)``:
  ``c' = s (c + 0.5) - 0.5`` for the default integer-centre convention (``offset=0``) and
  ``c' = s c`` for DA3/MoGe-style centres at ``+0.5`` (``offset=0.5``). Skew scales with ``sx``.
  """
  k = jnp.asarray(k, jnp.result_type(k, jnp.float32))
  sx = jnp.asarray(sx, k.dtype)
  sy = jnp.asarray(sy, k.dtype)
  shift = offset - 0.5
  row0 = jnp.stack([k[..., 0, 0] * sx, k[..., 0, 1] * sx,
                    k[..., 0, 2] * sx + shift * (1 - sx)], -1)
  row1 = jnp.stack([k[..., 1, 0] * sy, k[..., 1, 1] * sy,
                    k[..., 1, 2] * sy + shift * (1 - sy)], -1)
  return jnp.stack([row0, row1, jnp.broadcast_to(k[..., 2, :], row0.shape)], -2)
