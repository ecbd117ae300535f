"""Rotations, rigid transforms and the 9-D camera encoding ``[t, q_xyzw, fov_h, fov_w]``.

Conventions: quaternions are scalar-last (xyzw); extrinsics are world-to-camera (w2c) unless a
name says ``c2w``; intrinsics are in pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def quat_to_mat(q: jax.Array) -> jax.Array:
  """xyzw quaternion (not necessarily unit; normalised through ``2 / |q|^2``) -> 3x3 matrix."""
  i, j, k, r = jnp.moveaxis(q, -1, 0)
  two_s = 2.0 / jnp.sum(q * q, -1)
  o = jnp.stack([
      1 - two_s * (j * j + k * k), two_s * (i * j - k * r), two_s * (i * k + j * r),
      two_s * (i * j + k * r), 1 - two_s * (i * i + k * k), two_s * (j * k - i * r),
      two_s * (i * k - j * r), two_s * (j * k + i * r), 1 - two_s * (i * i + j * j)], -1)
  return o.reshape(q.shape[:-1] + (3, 3))


def mat_to_quat(m: jax.Array) -> jax.Array:
  """3x3 rotation -> xyzw quaternion with w >= 0 (best-conditioned of four candidates)."""
  m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
  m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
  m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
  sq = jnp.stack([1.0 + m00 + m11 + m22, 1.0 + m00 - m11 - m22,
                  1.0 - m00 + m11 - m22, 1.0 - m00 - m11 + m22], -1)
  q_abs = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
  cand = jnp.stack([
      jnp.stack([q_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], -1),
      jnp.stack([m21 - m12, q_abs[..., 1] ** 2, m10 + m01, m02 + m20], -1),
      jnp.stack([m02 - m20, m10 + m01, q_abs[..., 2] ** 2, m12 + m21], -1),
      jnp.stack([m10 - m01, m20 + m02, m21 + m12, q_abs[..., 3] ** 2], -1)], -2)  # rijk
  cand = cand / (2.0 * jnp.maximum(q_abs, 0.1)[..., None])
  best = jnp.argmax(q_abs, -1)
  rijk = jnp.take_along_axis(cand, best[..., None, None], axis=-2)[..., 0, :]
  q = jnp.concatenate([rijk[..., 1:], rijk[..., :1]], -1)
  return jnp.where(q[..., 3:4] < 0, -q, q)


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
