"""Pictures of predictions: colour-mapped depth and error maps, image grids, safe PNG writes."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

# A perceptually ordered dark-blue -> teal -> yellow ramp (anchor colours, linearly interpolated).
_ANCHORS = np.array([
    [0.05, 0.03, 0.25], [0.15, 0.25, 0.60], [0.10, 0.55, 0.65], [0.30, 0.75, 0.45],
    [0.75, 0.85, 0.25], [0.99, 0.90, 0.15]], np.float32)


def colormap(x: np.ndarray) -> np.ndarray:
  """Map values in [0, 1] (clipped; NaN -> black) to uint8 RGB ``(..., 3)``."""
  x = np.asarray(x, np.float32)
  bad = ~np.isfinite(x)
  t = np.clip(np.where(bad, 0, x), 0, 1) * (len(_ANCHORS) - 1)
  i = np.minimum(t.astype(np.int64), len(_ANCHORS) - 2)
  f = (t - i)[..., None]
  rgb = _ANCHORS[i] * (1 - f) + _ANCHORS[i + 1] * f
  rgb = np.where(bad[..., None], 0, rgb)
  return (rgb * 255 + 0.5).astype(np.uint8)


def depth_range(depth: np.ndarray, valid: np.ndarray | None = None) -> tuple[float, float]:
  """2nd and 98th percentile of the valid, finite, positive depths (for shared colour scales)."""
  d = np.asarray(depth, np.float32)
  ok = np.isfinite(d) & (d > 0)
  if valid is not None:
    ok &= np.asarray(valid, bool)
  if not ok.any():
    return 0.0, 1.0
  lo, hi = np.percentile(d[ok], [2, 98])
  return float(lo), float(max(hi, lo + 1e-6))


def colorize_depth(depth: np.ndarray, valid: np.ndarray | None = None,
                   value_range: tuple[float, float] | None = None) -> np.ndarray:
  """Depth ``(H, W)`` -> uint8 RGB; near is bright. Invalid pixels are black."""
  lo, hi = value_range or depth_range(depth, valid)
  x = 1.0 - (np.asarray(depth, np.float32) - lo) / (hi - lo)
  if valid is not None:
    x = np.where(np.asarray(valid, bool), x, np.nan)
  return colormap(x)


def colorize_error(err: np.ndarray, valid: np.ndarray | None = None, vmax: float = 0.2) -> np.ndarray:
  """Non-negative error ``(H, W)`` -> uint8 RGB on ``[0, vmax]``; invalid pixels black."""
  x = np.asarray(err, np.float32) / vmax
  if valid is not None:
    x = np.where(np.asarray(valid, bool), x, np.nan)
  return colormap(x)


def grid(rows: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
  """Tile equally sized uint8 RGB tiles into one image, ``pad`` white pixels between tiles."""
  h, w = rows[0][0].shape[:2]
  n_r, n_c = len(rows), max(len(r) for r in rows)
  out = np.full((n_r * h + (n_r - 1) * pad, n_c * w + (n_c - 1) * pad, 3), 255, np.uint8)
  for i, r in enumerate(rows):
    for j, tile in enumerate(r):
      if tile.shape[:2] != (h, w):
        raise ValueError(f"grid: tile ({i}, {j}) has shape {tile.shape[:2]}, expected {(h, w)}")
      out[i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = tile
  return out


def save_png(path: str, image: np.ndarray, *, overwrite: bool = False) -> None:
  """Write uint8 RGB ``image`` to ``path``; refuses to replace a file unless ``overwrite``."""
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}.png"
  Image.fromarray(np.asarray(image, np.uint8)).save(tmp)
  os.replace(tmp, path)


def colorize_normals(normals: np.ndarray) -> np.ndarray:
  """Camera-frame unit normals ``(..., 3)`` (OpenCV axes) -> uint8 RGB ``(n + 1) / 2``: red is
  +x (right), green +y (down), blue +z (away from the camera); invalid (zero or non-finite) -> black."""
  n = np.asarray(normals, np.float32)
  ok = np.all(np.isfinite(n), -1) & (np.linalg.norm(np.where(np.isfinite(n), n, 0), axis=-1) > 0)
  rgb = (np.clip(np.where(ok[..., None], n, 0), -1, 1) + 1) * 0.5
  rgb = np.where(ok[..., None], rgb, 0)
  return (rgb * 255 + 0.5).astype(np.uint8)


def track_colors(n: int) -> np.ndarray:
  """``(n, 3)`` uint8 colours, well spread in hue, for ``n`` tracks."""
  import colorsys
  hues = (np.arange(n) * 0.618033988749895) % 1.0
  return np.array([[int(c * 255) for c in colorsys.hsv_to_rgb(h, 0.85, 1.0)] for h in hues],
                  np.uint8).reshape(n, 3)


def _track_frame(frame: np.ndarray, uv: np.ndarray, ok: np.ndarray, colors: np.ndarray, t: int,
                 trail: int, radius: int) -> np.ndarray:
  """Frame ``t`` with a dot at every track visible there and its trail over ``trail`` frames."""
  from PIL import ImageDraw
  im = Image.fromarray(np.ascontiguousarray(frame))
  draw = ImageDraw.Draw(im)
  for p in np.flatnonzero(ok[t]):
    pts = [tuple(uv[j, p] + 0.5) for j in range(max(0, t - trail), t + 1) if ok[j, p]]
    c = tuple(int(v) for v in colors[p])
    if len(pts) > 1:
      draw.line(pts, fill=c, width=1)
    x, y = pts[-1]
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=c)
  return np.asarray(im)


def _track_inputs(uv, visible):
  vis = np.asarray(visible) > 0.5
  uv = np.asarray(uv, np.float64)
  return uv, vis & np.all(np.isfinite(uv), -1), track_colors(uv.shape[1])


def draw_tracks(frames: np.ndarray, uv: np.ndarray, visible: np.ndarray, *,
                max_frames: int = 4, trail: int = 8, radius: int = 2) -> np.ndarray:
  """A picture of 2D tracks over frames: up to ``max_frames`` frames (evenly chosen) side by
  side, each with a dot at every track visible there and its trail over the ``trail`` frames
  before.

  Args:
    frames: uint8 ``(S, H, W, 3)``.
    uv: ``(S, P, 2)`` pixel positions (geojax convention; non-finite = unknown).
    visible: ``(S, P)`` bool or probabilities (> 0.5 = visible).
  """
  s, h, w = frames.shape[:3]
  uv, ok, colors = _track_inputs(uv, visible)
  pick = np.unique(np.linspace(0, s - 1, min(max_frames, s)).round().astype(int))
  tiles = [_track_frame(frames[t], uv, ok, colors, t, trail, radius) for t in pick]
  return np.concatenate(tiles, 1) if tiles else np.zeros((h, w, 3), np.uint8)


def track_frames(frames: np.ndarray, uv: np.ndarray, visible: np.ndarray, *, trail: int = 8,
                 radius: int = 2) -> np.ndarray:
  """Every frame ``(S, H, W, 3)`` with the tracks drawn as in :func:`draw_tracks` (a video)."""
  uv, ok, colors = _track_inputs(uv, visible)
  return np.stack([_track_frame(frames[t], uv, ok, colors, t, trail, radius)
                   for t in range(frames.shape[0])])
