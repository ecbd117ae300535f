"""Surface normals from depth / point maps and MoGe-style depth edges.

Conventions: OpenCV camera axes (x right, y down, z forward); normals are unit vectors in the
frame of the input points (camera frame for :func:`normals_from_depth`) and face the camera
(``n . p < 0`` for camera-frame points ``p``); invalid normals are zero. Maps carry arbitrary
leading batch dims: depth ``(..., H, W)``, points ``(..., H, W, 3)``, masks ``(..., H, W)`` bool.
Out-of-image neighbours never count as valid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from geojax.geometry.unproject import depth_to_camera_points


def _pad_hw(x: jax.Array, r: int, axes: tuple[int, int], value) -> jax.Array:
  widths = [(0, 0)] * x.ndim
  for a in axes:
    widths[a % x.ndim] = (r, r)
  return jnp.pad(x, widths, constant_values=value)


def _window(x: jax.Array, di: int, dj: int, h: int, w: int, axes: tuple[int, int]) -> jax.Array:
  """The ``(h, w)`` slice of a padded map starting at ``(di, dj)`` on ``axes``."""
  idx = [slice(None)] * x.ndim
  idx[axes[0] % x.ndim] = slice(di, di + h)
  idx[axes[1] % x.ndim] = slice(dj, dj + w)
  return x[tuple(idx)]


def _normalize(v: jax.Array, eps: float = 1e-12) -> jax.Array:
  return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), eps)


def normals_from_depth(depth: jax.Array, k: jax.Array, window: int = 5,
                       mask: jax.Array | None = None, *, offset: float = 0.0,
                       min_points: int = 3) -> tuple[jax.Array, jax.Array]:
  """Camera-frame normals by a local least-squares plane fit.

  Each pixel's valid neighbours in a ``window x window`` patch are back-projected; the normal
  is the eigenvector of the smallest eigenvalue of their covariance (total least squares),
  oriented towards the camera. Windows straddling depth discontinuities blend surfaces; combine
  the validity with ``~depth_edges(...)`` where that matters.

  Args:
    depth: ``(..., H, W)`` z-depth; non-finite or non-positive values are invalid.
    k: ``(..., 3, 3)`` intrinsics in pixels.
    window: odd patch size.
    mask: optional ``(..., H, W)`` validity.
    offset: pixel-centre offset (see :mod:`geojax.geometry.unproject`).
    min_points: fewest valid patch points for a fit (at least 3).

  Returns:
    ``(normals (..., H, W, 3), valid (..., H, W))``: valid where the centre pixel is valid, the
    patch has ``>= min_points`` valid points and they are not (nearly) collinear.
  """
  if window % 2 != 1 or window < 3:
    raise ValueError(f"window must be odd and >= 3, got {window}")
  depth = jnp.asarray(depth, jnp.result_type(depth, jnp.float32))
  h, w = depth.shape[-2:]
  r = window // 2
  valid = jnp.isfinite(depth) & (depth > 0)
  if mask is not None:
    valid = valid & mask
  pts = depth_to_camera_points(jnp.where(valid, depth, 1.0), k, offset=offset)
  valid = jnp.broadcast_to(valid, pts.shape[:-1])
  pts_pad = _pad_hw(pts, r, (-3, -2), 0.0)
  val_pad = _pad_hw(valid, r, (-2, -1), False)
  offsets = [(i, j) for i in range(window) for j in range(window)]

  def neighbour(i, j):  # offsets relative to the centre point, and their validity
    v = _window(val_pad, i, j, h, w, (-2, -1))
    d = _window(pts_pad, i, j, h, w, (-3, -2)) - pts
    return jnp.where(v[..., None], d, 0.0), v

  count = jnp.zeros(pts.shape[:-1], pts.dtype)
  total = jnp.zeros_like(pts)
  for i, j in offsets:
    d, v = neighbour(i, j)
    count = count + v
    total = total + d
  mean = total / jnp.maximum(count, 1.0)[..., None]
  cov = jnp.zeros(pts.shape + (3,), pts.dtype)
  for i, j in offsets:
    d, v = neighbour(i, j)
    c = jnp.where(v[..., None], d - mean, 0.0)
    cov = cov + c[..., :, None] * c[..., None, :]
  evals, evecs = jnp.linalg.eigh(cov)
  n = evecs[..., :, 0]
  n = jnp.where(jnp.sum(n * pts, -1, keepdims=True) > 0, -n, n)
  ok = (valid & (count >= max(min_points, 3))
        & (evals[..., 1] > 1e-6 * jnp.maximum(evals[..., 2], 1e-30)))
  return jnp.where(ok[..., None], n, 0.0), ok


def moge_normals(points: jax.Array,
                 mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """MoGe / utils3d ``points_to_normals``: four-triangle normals of a point map.

  With ``up, left, down, right`` the differences from each point to its 4-neighbours, the
  normalised cross products ``up x left``, ``left x down``, ``down x right``, ``right x up`` of
  the pairs whose three points are valid are summed and normalised. For an OpenCV camera-frame
  point map this faces the camera. Non-finite points count as invalid (MoGe would emit NaN).

  Args:
    points: ``(..., H, W, 3)``.
    mask: optional ``(..., H, W)`` validity.

  Returns:
    ``(normals (..., H, W, 3), valid (..., H, W))``; valid = at least one pair is valid.
  """
  h, w = points.shape[-3:-1]
  valid = jnp.all(jnp.isfinite(points), -1)
  if mask is not None:
    valid = valid & mask
  pts = jnp.where(valid[..., None], points, 0.0)
  p = _pad_hw(pts, 1, (-3, -2), 0.0)
  m = _pad_hw(valid, 1, (-2, -1), False)
  at = lambda i, j: _window(p, i, j, h, w, (-3, -2)) - pts  # noqa: E731
  ok = lambda i, j: _window(m, i, j, h, w, (-2, -1))  # noqa: E731
  up, left, down, right = at(0, 1), at(1, 0), at(2, 1), at(1, 2)
  vu, vl, vd, vr = ok(0, 1), ok(1, 0), ok(2, 1), ok(1, 2)
  pairs = [(up, left, vu & vl), (left, down, vl & vd), (down, right, vd & vr),
           (right, up, vr & vu)]
  n = jnp.zeros_like(pts)
  any_valid = jnp.zeros(valid.shape, bool)
  for a, b, v in pairs:
    v = v & valid
    n = n + jnp.where(v[..., None], _normalize(jnp.cross(a, b)), 0.0)
    any_valid = any_valid | v
  return _normalize(n), any_valid


def depth_edges(depth: jax.Array, rtol: float | None = 0.03, kernel_size: int = 3,
                mask: jax.Array | None = None, *, atol: float | None = None) -> jax.Array:
  """MoGe ``depth_edge``: pixels whose ``kernel_size`` neighbourhood spans a large depth range.

  ``diff = max - min`` of the valid depths in the window centred on each pixel (out-of-image
  and masked pixels ignored); edge where ``diff / depth > rtol`` (NaN -> False, as MoGe's
  ``nan_to_num``) or ``diff > atol``. The centre's own validity is not required (as in MoGe).

  Args:
    depth: ``(..., H, W)``.
    rtol: relative tolerance (``None`` to skip).
    kernel_size: odd window size.
    mask: optional ``(..., H, W)`` validity.
    atol: optional absolute tolerance.

  Returns:
    ``(..., H, W)`` bool.
  """
  if kernel_size % 2 != 1:
    raise ValueError(f"kernel_size must be odd, got {kernel_size}")
  depth = jnp.asarray(depth, jnp.result_type(depth, jnp.float32))
  r = kernel_size // 2
  nd = depth.ndim
  dims = (1,) * (nd - 2) + (kernel_size, kernel_size)
  pad = ((0, 0),) * (nd - 2) + ((r, r), (r, r))

  def max_pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, (1,) * nd, pad)

  if mask is None:
    diff = max_pool(depth) + max_pool(-depth)
  else:
    diff = (max_pool(jnp.where(mask, depth, -jnp.inf))
            + max_pool(jnp.where(mask, -depth, -jnp.inf)))
  edge = jnp.zeros(depth.shape, bool)
  if atol is not None:
    edge = edge | (diff > atol)
  if rtol is not None:
    edge = edge | (jnp.nan_to_num(diff / depth) > rtol)
  return edge
