"""Offscreen pictures of point clouds and cameras in pure NumPy (no OpenGL, no matplotlib).

Conventions (as everywhere in geojax):

- ``extrinsics`` are world-to-camera ``(S, 4, 4)`` or ``(S, 3, 4)`` matrices (one ``(4, 4)`` /
  ``(3, 4)`` matrix means ``S = 1``); camera axes are OpenCV: x right, y down, z forward.
- ``intrinsics`` ``(S, 3, 3)`` (or one ``(3, 3)`` for all cameras) are in pixels, and pixel
  ``(u, v)`` at integer coordinates is the centre of column ``u`` / row ``v``; an ``H x W`` image
  therefore covers ``[-0.5, W - 0.5] x [-0.5, H - 0.5]``.
- ``image_hw`` is ``(H, W)`` for all cameras or ``(S, 2)``; when omitted it is inferred from the
  principal point (``W = 2 cx + 1``, ``H = 2 cy + 1``), exact for centred principal points.
- Pictures are ``uint8 (H, W, 3)`` RGB.

The virtual camera of :func:`render_point_cloud` is a pinhole with a 50 degree vertical field of
view and the same OpenCV conventions. It looks at the centre of the 2nd-98th percentile box of the
points. Its direction is the mean viewing direction of the input cameras tilted down towards
their mean "up" (so the view is from behind and above them); when the cameras look in all
directions (a turntable), it looks across the rig from above; without cameras it is a fixed
oblique direction (forward, down and to the right in a y-down world, as when the world frame is
a camera frame). Its distance is the smallest that puts 98% of the points (a percentile, so
outliers do not matter) and every frustum vertex inside the central 92% of the frame. These
statistics use a random sample of at most 65,536 points.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_VFOV_DEG = 50.0  # vertical field of view of the virtual camera
_FILL = 0.92  # fraction of the frame the fitted content may use
_FIT_PERCENTILE = 98.0  # share of the points that the framing keeps inside the frame
_LINE_WIDTH = 2  # frustum lines, in pixels
_STATS_SAMPLE = 65_536  # points drawn (with replacement) for the centre, scale and framing


def camera_arrays(extrinsics: Any, intrinsics: Any, who: str) -> tuple[np.ndarray, np.ndarray]:
  """Shape-checked ``(w2c (S, 4, 4), K (S, 3, 3))`` float64 (``(3, 4)`` poses completed; one
  ``(3, 3)`` K shared by all views); values are not checked."""
  e = np.asarray(extrinsics, np.float64)
  if e.ndim == 2:
    e = e[None]
  if e.ndim != 3 or e.shape[1:] not in ((4, 4), (3, 4)):
    raise ValueError(f"{who}: extrinsics must have shape (S, 4, 4) or (S, 3, 4), got "
                     f"{np.shape(extrinsics)}")
  s = e.shape[0]
  if e.shape[1] == 3:
    e = np.concatenate([e, np.broadcast_to(np.array([[[0.0, 0, 0, 1]]]), (s, 1, 4))], axis=1)
  if intrinsics is None:
    raise ValueError(f"{who}: intrinsics (S, 3, 3) are required when extrinsics are given")
  k = np.asarray(intrinsics, np.float64)
  if k.shape == (3, 3):
    k = np.broadcast_to(k, (s, 3, 3))
  if k.shape != (s, 3, 3):
    raise ValueError(f"{who}: intrinsics must have shape ({s}, 3, 3) or (3, 3) for {s} "
                     f"extrinsics, got {np.shape(intrinsics)}")
  return e, k


def _cameras(extrinsics: Any, intrinsics: Any, image_hw: Any, who: str,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Checked ``(c2w (S, 4, 4), K (S, 3, 3), hw (S, 2) int)`` in float64."""
  e, k = camera_arrays(extrinsics, intrinsics, who)
  s = e.shape[0]
  if not np.isfinite(e).all():
    raise ValueError(f"{who}: extrinsics must be finite")
  if not np.isfinite(k).all() or np.any(np.abs(np.linalg.det(k)) < 1e-12):
    raise ValueError(f"{who}: intrinsics must be finite and invertible")
  if image_hw is None:
    hw = np.rint(2 * k[:, [1, 0], 2] + 1)
  else:
    hw = np.asarray(image_hw, np.float64)
    if hw.shape == (2,):
      hw = np.broadcast_to(hw, (s, 2))
    if hw.shape != (s, 2):
      raise ValueError(f"{who}: image_hw must be (H, W) or have shape ({s}, 2), got "
                       f"{np.shape(image_hw)}")
  if not np.isfinite(hw).all() or np.any(hw < 1):
    raise ValueError(f"{who}: image sizes must be positive, got {hw.tolist()}"
                     + (" (inferred from the principal points)" if image_hw is None else ""))
  try:
    c2w = np.linalg.inv(e)
  except np.linalg.LinAlgError:
    raise ValueError(f"{who}: extrinsics must be invertible") from None
  return c2w, k, hw.astype(np.int64)


def frustum_lines(extrinsics: Any, intrinsics: Any, image_hw: Any, scale: Any) -> np.ndarray:
  """Camera frustums as line segments in world space, ``float64 (S, 8, 2, 3)``.

  Segments 0-3 join the camera centre to the image corners top-left, top-right, bottom-right,
  bottom-left (the outer pixel edges, ``(-0.5, -0.5)`` to ``(W - 0.5, H - 0.5)``), placed on the
  plane at camera depth ``scale`` (a number or one per camera); segments 4-7 are the rectangle
  through those corners in the same order (corner ``k`` to corner ``k + 1 mod 4``).
  """
  c2w, k, hw = _cameras(extrinsics, intrinsics, image_hw, "frustum_lines")
  s = c2w.shape[0]
  scale = np.asarray(scale, np.float64)
  if scale.shape not in ((), (s,)) or not np.isfinite(scale).all() or np.any(scale < 0):
    raise ValueError(f"frustum_lines: scale must be a non-negative number or ({s},), got "
                     f"{scale.shape if scale.shape else scale}")
  scale = np.broadcast_to(scale, (s,))
  h, w = hw[:, 0].astype(np.float64), hw[:, 1].astype(np.float64)
  lo, ones = np.full(s, -0.5), np.ones(s)
  pix = np.stack([np.stack([lo, lo, ones], -1), np.stack([w - 0.5, lo, ones], -1),
                  np.stack([w - 0.5, h - 0.5, ones], -1), np.stack([lo, h - 0.5, ones], -1)],
                 axis=1)  # (S, 4, 3)
  rays = np.einsum("sij,snj->sni", np.linalg.inv(k), pix)
  z = rays[..., 2:3]
  z = np.where(np.abs(z) < 1e-12, 1.0, z)  # a degenerate K: keep the numbers finite
  cam = rays / z * scale[:, None, None]
  corners = np.einsum("sij,snj->sni", c2w[:, :3, :3], cam) + c2w[:, None, :3, 3]
  centre = np.broadcast_to(c2w[:, None, :3, 3], (s, 4, 3))
  spokes = np.stack([centre, corners], axis=2)
  rim = np.stack([corners, np.roll(corners, -1, axis=1)], axis=2)
  return np.concatenate([spokes, rim], axis=1)


def camera_colors(n: int) -> np.ndarray:
  """``n`` distinct saturated colours ``uint8 (n, 3)`` (hues from red through to violet)."""
  hue = np.arange(n) / max(n, 1) * 0.8
  sat, val = 0.9, 0.85
  sector = np.floor(hue * 6).astype(np.int64) % 6
  f = hue * 6 - np.floor(hue * 6)
  p, q, t = np.full_like(hue, val * (1 - sat)), val * (1 - f * sat), val * (1 - (1 - f) * sat)
  v = np.full_like(hue, val)
  table = np.stack([np.stack([v, t, p], -1), np.stack([q, v, p], -1), np.stack([p, v, t], -1),
                    np.stack([p, q, v], -1), np.stack([t, p, v], -1), np.stack([v, p, q], -1)])
  rgb = table[sector, np.arange(n)] if n else np.zeros((0, 3))
  return (rgb * 255 + 0.5).astype(np.uint8)


def _unit(v: np.ndarray) -> tuple[np.ndarray, float]:
  norm = float(np.linalg.norm(v))
  return (v / norm if norm > 0 else v), norm


def _look_rotation(view: np.ndarray, up: np.ndarray) -> np.ndarray:
  """World-to-camera rotation of an OpenCV camera looking along unit ``view``, ``up`` on top."""
  down, norm = _unit(-(up - np.dot(up, view) * view))
  if norm < 1e-6:  # looking straight along up: any perpendicular will do
    axis = np.eye(3)[np.argmin(np.abs(view))]
    down, _ = _unit(axis - np.dot(axis, view) * view)
  right = np.cross(down, view)
  return np.stack([right, down, view])


def _pixels(u: np.ndarray, v: np.ndarray, size: int, h: int, w: int) -> np.ndarray:
  """Flat pixel indices ``(n, size * size)`` of ``size``-pixel square splats (-1 off-image)."""
  u = np.clip(u, -2.0 * size - 2, w + 2.0 * size + 2)  # keep the int cast safe
  v = np.clip(v, -2.0 * size - 2, h + 2.0 * size + 2)
  bu = np.floor(u - (size - 1) / 2 + 0.5).astype(np.int64)
  bv = np.floor(v - (size - 1) / 2 + 0.5).astype(np.int64)
  dv, du = np.divmod(np.arange(size * size), size)
  uu, vv = bu[:, None] + du[None], bv[:, None] + dv[None]
  inside = (uu >= 0) & (uu < w) & (vv >= 0) & (vv < h)
  return np.where(inside, vv * w + uu, -1)


def render_point_cloud(xyz: Any, rgb: Any, *, extrinsics: Any = None, intrinsics: Any = None,
                       image_hw: Any = None, size: tuple[int, int] = (480, 640),
                       point_size: int = 2, background: tuple[int, int, int] = (255, 255, 255),
                       max_points: int | None = 300_000, seed: int = 0,
                       camera_size: float = 0.1) -> np.ndarray:
  """Render a coloured point cloud, and optionally its cameras, to a ``uint8 (H, W, 3)`` picture.

  Args:
    xyz: ``(N, 3)`` world points (non-finite ones are dropped); ``rgb``: ``uint8 (N, 3)`` or None
      (dark grey).
    extrinsics, intrinsics, image_hw: input cameras (see the module docstring), drawn as frustum
      wireframes on top of the points, one colour each (:func:`camera_colors`).
    size: ``(H, W)`` of the picture.
    point_size: side of the square splat of each point, in pixels; the nearest point wins.
    background: RGB of empty pixels.
    max_points: render a uniform random subset (``seed``) of at most this many points; None: all.
    camera_size: frustum depth as a fraction of the scene scale (the diagonal of the 5th-95th
      percentile box of the points, else the spread of the camera centres, else 1).
  """
  who = "render_point_cloud"
  if len(size) != 2 or any(int(x) != x or x < 1 for x in size):
    raise ValueError(f"{who}: size must be (H, W) with positive integers, got {size}")
  h, w = int(size[0]), int(size[1])
  if int(point_size) != point_size or point_size < 1:
    raise ValueError(f"{who}: point_size must be a positive integer, got {point_size}")
  point_size = int(point_size)
  bg = np.asarray(background)
  if bg.shape != (3,) or np.any(bg < 0) or np.any(bg > 255):
    raise ValueError(f"{who}: background must be 3 values in [0, 255], got {background}")
  if max_points is not None and (int(max_points) != max_points or max_points < 0):
    raise ValueError(f"{who}: max_points must be a non-negative integer or None, got {max_points}")
  if not (np.isfinite(camera_size) and camera_size > 0):
    raise ValueError(f"{who}: camera_size must be a positive number, got {camera_size}")
  pts = np.asarray(xyz)
  if pts.ndim != 2 or pts.shape[1] != 3:
    raise ValueError(f"{who}: xyz must have shape (N, 3), got {pts.shape}")
  if not (np.issubdtype(pts.dtype, np.floating) or np.issubdtype(pts.dtype, np.integer)):
    raise ValueError(f"{who}: xyz must hold real numbers, got dtype {pts.dtype}")
  if rgb is None:
    col = np.full(pts.shape, 64, np.uint8)
  else:
    col = np.asarray(rgb)
    if col.shape != pts.shape or col.dtype != np.uint8:
      raise ValueError(f"{who}: rgb must be uint8 with shape {pts.shape} like xyz, got "
                       f"{col.dtype} {col.shape}")
  if extrinsics is None and (intrinsics is not None or image_hw is not None):
    raise ValueError(f"{who}: intrinsics/image_hw were given without extrinsics")

  finite = np.isfinite(pts).all(axis=1)
  idx = np.flatnonzero(finite)
  if max_points is not None and idx.size > max_points:
    idx = np.sort(np.random.default_rng(seed).choice(idx, size=int(max_points), replace=False))
  pts, col = pts[idx].astype(np.float64), col[idx]
  image = np.empty((h, w, 3), np.uint8)
  image[:] = bg.astype(np.uint8)

  cams = _cameras(extrinsics, intrinsics, image_hw, who) if extrinsics is not None else None
  if cams is not None and not len(cams[0]):
    cams = None
  if not len(pts) and cams is None:
    return image

  # Scene centre and scale: percentiles, so that a few stray points do not move the view.
  centres = cams[0][:, :3, 3] if cams is not None else np.zeros((0, 3))
  spread = float(np.linalg.norm(np.ptp(centres, axis=0))) if len(centres) else 0.0
  scale = 0.0
  rng = np.random.default_rng(seed)
  # Robust statistics need no more than a random sample of the points.
  sample = pts[rng.integers(0, len(pts), _STATS_SAMPLE)] if len(pts) > _STATS_SAMPLE else pts
  if len(pts):
    lo, q5, q95, hi = np.percentile(sample, [2, 5, 95, 98], axis=0)
    target = (lo + hi) / 2
    scale = float(np.linalg.norm(q95 - q5))
    if not scale > 1e-9 * max(1.0, float(np.abs(target).max())):
      scale = 0.0
  scale = scale or spread or 1.0
  segs = np.zeros((0, 2, 3))
  seg_colors = np.zeros((0, 3), np.uint8)
  if cams is not None:
    c2w, k, hw = cams
    lines = frustum_lines(np.linalg.inv(c2w), k, hw, camera_size * scale)
    segs = lines.reshape(-1, 2, 3)
    seg_colors = np.repeat(camera_colors(len(c2w)), 8, axis=0)
    if not len(pts):
      target = segs.reshape(-1, 3).mean(axis=0)

  # Viewing direction and up: from the cameras when they agree, else a fixed oblique view.
  up = np.array([0.0, -1.0, 0.0])
  view, _ = _unit(np.array([0.4, 0.5, 1.0]))
  if cams is not None:
    axes = c2w[:, :3, :3] / np.maximum(np.linalg.norm(c2w[:, :3, :3], axis=1, keepdims=True),
                                       1e-12)
    mean_up, up_norm = _unit(-axes[:, :, 1].mean(axis=0))
    mean_fwd, fwd_norm = _unit(axes[:, :, 2].mean(axis=0))
    if up_norm > 0.3:
      up = mean_up
    if fwd_norm > 0.3:
      view, norm = _unit(mean_fwd - 0.6 * up)
      if norm < 1e-6:
        view = mean_fwd
    else:  # cameras all around: look across the rig, from above
      across, norm = _unit(target - centres.mean(axis=0))
      across = across - np.dot(across, up) * up
      across, norm = _unit(across)
      if norm < 1e-6:
        across, _ = _unit(np.cross(up, np.eye(3)[np.argmin(np.abs(up))]))
      view, _ = _unit(across - 0.6 * up)
  rot = _look_rotation(view, up)

  # Distance: the smallest that fits the points (percentile) and all frustum vertices.
  focal = 0.5 * h / np.tan(np.radians(_VFOV_DEG / 2))
  tan_x, tan_y = _FILL * 0.5 * w / focal, _FILL * 0.5 * h / focal

  def needed(p: np.ndarray) -> np.ndarray:
    a = (p - target) @ rot.T
    return np.maximum(np.abs(a[:, 0]) / tan_x, np.abs(a[:, 1]) / tan_y) - a[:, 2]

  dist = 0.1 * scale
  if len(pts):
    dist = max(dist, float(np.percentile(needed(sample), _FIT_PERCENTILE)))
  if len(segs):
    dist = max(dist, float(needed(segs.reshape(-1, 3)).max()))
  dist += 1e-3 * scale
  eye = target - dist * view
  near = 1e-3 * dist
  cx, cy = (w - 1) / 2, (h - 1) / 2
  flat = image.reshape(-1, 3)

  if len(pts):
    cam = (pts - eye) @ rot.T
    front = cam[:, 2] > near
    cam, pcol = cam[front], col[front]
    depth = cam[:, 2]
    u = focal * cam[:, 0] / depth + cx
    v = focal * cam[:, 1] / depth + cy
    pix = _pixels(u, v, point_size, h, w).reshape(-1)
    owner = np.repeat(np.arange(len(cam)), point_size * point_size)
    hit = pix >= 0
    pix, owner = pix[hit], owner[hit]
    zbuf = np.full(h * w, np.inf)
    np.minimum.at(zbuf, pix, depth[owner])  # z-buffer: the nearest depth of every pixel
    win = depth[owner] == zbuf[pix]
    flat[pix[win]] = pcol[owner[win]]

  if len(segs):
    a, b = (segs[:, 0] - eye) @ rot.T, (segs[:, 1] - eye) @ rot.T
    keep = (a[:, 2] > near) | (b[:, 2] > near)
    a, b, scol = a[keep], b[keep], seg_colors[keep]
    with np.errstate(divide="ignore", invalid="ignore"):  # clip to the near plane
      ta = np.where(a[:, 2] < near, (near - a[:, 2]) / (b[:, 2] - a[:, 2]), 0.0)
      tb = np.where(b[:, 2] < near, (near - b[:, 2]) / (a[:, 2] - b[:, 2]), 0.0)
    a, b = a + ta[:, None] * (b - a), b + tb[:, None] * (a - b)
    pa = np.stack([focal * a[:, 0] / a[:, 2] + cx, focal * a[:, 1] / a[:, 2] + cy], -1)
    pb = np.stack([focal * b[:, 0] / b[:, 2] + cx, focal * b[:, 1] / b[:, 2] + cy], -1)
    lim = 4.0 * (h + w)
    pa, pb = np.clip(pa, -lim, lim), np.clip(pb, -lim, lim)
    steps = np.ceil(np.abs(pb - pa).max(axis=1)).astype(np.int64) + 1
    seg_id = np.repeat(np.arange(len(steps)), steps)
    start = np.cumsum(steps) - steps
    t = (np.arange(len(seg_id)) - start[seg_id]) / np.maximum(steps[seg_id] - 1, 1)
    samples = pa[seg_id] + t[:, None] * (pb - pa)[seg_id]
    pix = _pixels(samples[:, 0], samples[:, 1], _LINE_WIDTH, h, w)
    colours = np.broadcast_to(scol[seg_id][:, None], pix.shape + (3,))
    hit = pix >= 0
    flat[pix[hit]] = colours[hit]
  return image
