"""Rotations: quaternions, axis-angle, geodesic distances and 9-D SVD orthogonalisation.

Conventions: quaternions are scalar-last (xyzw) and canonicalised to ``w >= 0``; rotation
matrices act on column vectors (``x' = R x``); axis-angle vectors are ``angle * unit_axis`` with
the angle in radians in ``[0, pi]``. Every function is pure ``jax.numpy``, works on arbitrary
leading batch dimensions, and is ``jit``/``vmap`` friendly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HP = jax.lax.Precision.HIGHEST


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


def skew(v: jax.Array) -> jax.Array:
  """Cross-product matrix ``[v]_x`` of ``(..., 3)`` vectors -> ``(..., 3, 3)``."""
  x, y, z = jnp.moveaxis(v, -1, 0)
  o = jnp.zeros_like(x)
  return jnp.stack([o, -z, y, z, o, -x, -y, x, o], -1).reshape(v.shape[:-1] + (3, 3))


def _safe_norm(v: jax.Array) -> jax.Array:
  """``|v|`` over the last axis with a zero (not NaN) gradient at ``v = 0``."""
  n2 = jnp.sum(v * v, -1)
  pos = n2 > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, n2, 1.0)), 0.0)


def axis_angle_to_mat(rotvec: jax.Array) -> jax.Array:
  """Rodrigues: ``(..., 3)`` axis-angle -> ``(..., 3, 3)`` rotation.

  ``R = I + a [v]_x + b [v]_x^2`` with ``a = sin(t)/t``, ``b = (1 - cos t)/t^2``, ``t = |v|``;
  both coefficients switch to their Taylor series below ``t = 1e-2`` (exact and smooth at 0).
  """
  t2 = jnp.sum(rotvec * rotvec, -1)
  small = t2 < 1e-4
  t = jnp.sqrt(jnp.where(small, 1.0, t2))
  a = jnp.where(small, 1.0 - t2 / 6.0 + t2 * t2 / 120.0, jnp.sin(t) / t)
  half = jnp.sin(t / 2) / t
  b = jnp.where(small, 0.5 - t2 / 24.0 + t2 * t2 / 720.0, 2.0 * half * half)  # (1 - cos t)/t^2
  k = skew(rotvec)
  eye = jnp.eye(3, dtype=k.dtype)
  return eye + a[..., None, None] * k + b[..., None, None] * jnp.matmul(k, k, precision=_HP)


def quat_to_axis_angle(q: jax.Array) -> jax.Array:
  """xyzw quaternion (any norm, any sign) -> ``(..., 3)`` axis-angle with angle in ``[0, pi]``.

  ``angle = 2 atan2(|v|, w)`` after flipping to ``w >= 0``; the factor ``angle / |v|`` uses its
  Taylor series for small ``|v|``, so the map is exact and smooth near the identity.
  """
  q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  q = jnp.where(q[..., 3:4] < 0, -q, q)
  v, w = q[..., :3], q[..., 3]
  n = _safe_norm(v)
  small = n < 1e-3
  n_safe = jnp.where(small, 1.0, n)
  w_safe = jnp.where(small, w, 1.0)  # w ~ 1 on the small branch
  ratio = jnp.where(small, 2.0 / w_safe * (1.0 - n * n / (3.0 * w_safe * w_safe)),
                    2.0 * jnp.arctan2(n_safe, w) / n_safe)
  return v * ratio[..., None]


def axis_angle_to_quat(rotvec: jax.Array) -> jax.Array:
  """``(..., 3)`` axis-angle -> unit xyzw quaternion, flipped to ``w >= 0``."""
  t2 = jnp.sum(rotvec * rotvec, -1)
  small = t2 < 1e-4
  t = jnp.sqrt(jnp.where(small, 1.0, t2))
  half_sinc = jnp.where(small, 0.5 - t2 / 48.0, jnp.sin(t / 2) / t)  # sin(t/2) / t
  w = jnp.where(small, 1.0 - t2 / 8.0, jnp.cos(t / 2))
  q = jnp.concatenate([rotvec * half_sinc[..., None], w[..., None]], -1)
  return jnp.where(q[..., 3:4] < 0, -q, q)


def mat_to_axis_angle(m: jax.Array) -> jax.Array:
  """``(..., 3, 3)`` rotation -> ``(..., 3)`` axis-angle (via :func:`mat_to_quat`).

  Stable over the whole range: the four-candidate quaternion extraction stays well conditioned
  near 180 degrees, and :func:`quat_to_axis_angle` is exact near the identity. At exactly
  180 degrees either of the two equivalent axes may be returned.
  """
  return quat_to_axis_angle(mat_to_quat(m))


def rotation_angle(m: jax.Array) -> jax.Array:
  """Angle (radians, ``[0, pi]``) of ``(..., 3, 3)`` rotations.

  Uses ``atan2(|vee(R - R^T)| / 2, (tr R - 1) / 2)`` rather than ``arccos`` of the clipped
  cosine: accurate for tiny angles in float32, defined for slightly non-orthogonal input (no
  clipping needed) and with a finite gradient everywhere except exactly 180 degrees.
  """
  s = jnp.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0],
                 m[..., 1, 0] - m[..., 0, 1]], -1)
  sin = 0.5 * _safe_norm(s)
  cos = 0.5 * (m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2] - 1.0)
  return jnp.arctan2(sin, cos)


def geodesic_distance(r1: jax.Array, r2: jax.Array) -> jax.Array:
  """Geodesic distance (radians) between rotations: the angle of ``R1^T R2``; ``(...)``."""
  rel = jnp.matmul(jnp.swapaxes(r1, -1, -2), r2, precision=_HP)
  return rotation_angle(rel)


def geodesic_distance_deg(r1: jax.Array, r2: jax.Array) -> jax.Array:
  """:func:`geodesic_distance` in degrees."""
  return jnp.rad2deg(geodesic_distance(r1, r2))


def svd_orthogonalize(m: jax.Array) -> jax.Array:
  """Nearest rotation to a 9-D prediction, as in the Pi3 / DAGE ``CameraHead``.

  Args:
    m: ``(..., 9)`` row-major values or ``(..., 3, 3)`` matrices.

  Returns:
    ``(..., 3, 3)`` rotations (det +1). The rows of ``M`` are L2-normalised first
    (``x / max(|x|, 1e-12)``); with ``M^T = U S V^T``, ``R = V diag(1, 1, det(V U^T)) U^T``.
    Computed in at least float32 (bf16/fp16 inputs are upcast).
  """
  if m.shape[-1] == 9:
    m = m.reshape(m.shape[:-1] + (3, 3))
  elif m.shape[-2:] != (3, 3):
    raise ValueError(f"expected (..., 9) or (..., 3, 3), got {m.shape}")
  m = m.astype(jnp.promote_types(m.dtype, jnp.float32))
  m = m / jnp.maximum(jnp.linalg.norm(m, axis=-1, keepdims=True), 1e-12)
  u, _, vh = jnp.linalg.svd(jnp.swapaxes(m, -1, -2))  # M^T = U S V^T; jnp returns V^T
  v = jnp.swapaxes(vh, -1, -2)
  ut = jnp.swapaxes(u, -1, -2)
  det = jnp.linalg.det(jnp.matmul(v, ut, precision=_HP))
  v = jnp.concatenate([v[..., :2], v[..., 2:] * det[..., None, None]], -1)
  return jnp.matmul(v, ut, precision=_HP)
