"""NumPy transforms on multi-view scene dicts: resize / crop with exact intrinsics, view sampling,
photometric jitter and the per-family targets (URGT GridMix, D4RT queries, PPD depth encoding).

A *scene* is a dict of NumPy arrays with a leading view axis ``S``: ``images`` (S, H, W, 3) uint8,
``depth`` (S, H, W) float32 z-depth (0 = invalid), ``valid`` (S, H, W) bool, optionally
``normals`` (S, H, W, 3), ``sky`` (S, H, W) bool, ``intrinsics`` (S, 3, 3) in pixels,
``extrinsics`` (S, 4, 4) world-to-camera (OpenCV), and for dynamic scenes ``tracks`` (S, P, 3)
world points at each view's time and ``track_visible`` (S, P), and for the built-in dynamic
scenes ``segment`` (S, H, W) (object index per pixel, -1 static) with ``object_poses``
(S, M, 4, 4) object-to-world transforms (exact motion of every pixel).

Pixel convention: pixel ``(u, v)`` (column, row) at integer coordinates is the pixel *centre*, so
an image of width ``W`` spans ``[-0.5, W - 0.5]``. Resizing by ``s`` maps ``x -> s (x + 0.5) - 0.5``,
hence ``f' = s f`` and ``c' = s (c + 0.5) - 0.5``; cropping at ``offset`` gives ``c' = c - offset``.
Images are resized bilinearly; every other per-pixel map (depth, valid, normals, sky) with nearest
neighbour, so invalid and valid depths never mix.

All randomness comes from an explicit ``np.random.Generator``; nothing reads global state.
"""

from __future__ import annotations

import numpy as np

# Per-view arrays that are not images (indexed along views, untouched by resize / crop).
VIEW_KEYS = ("intrinsics", "extrinsics", "tracks", "track_visible", "time", "object_poses")
# Per-pixel maps resized with nearest neighbour; any other (S, H, W, ...) array but ``images`` and
# ``ray_map`` (recomputed from the new camera) is treated the same way.
PIXEL_KEYS = ("depth", "valid", "normals", "sky", "segment")


def _pixel_keys(scene: dict) -> list[str]:
  """Keys of per-pixel maps (S, H, W, ...) other than ``images`` and ``ray_map``."""
  s, h, w = scene["images"].shape[:3]
  return [k for k, v in scene.items() if k not in ("images", "ray_map") + VIEW_KEYS
          and isinstance(v, np.ndarray) and v.ndim >= 3 and v.shape[:3] == (s, h, w)]


def mask_non_finite(scene: dict) -> tuple[dict, int, str | None]:
  """Guard a training scene against non-finite values: ``(scene, masked_pixels, problem)``.

  A pixel where any float per-pixel map (``depth``, ``normals``, ``ray_map``, ...) is NaN or
  infinite becomes invalid: ``valid`` False, those maps 0 there (``masked_pixels`` counts them).
  Non-finite per-view or scene values (cameras, tracks, object poses, times) and non-positive
  focal lengths cannot be masked: ``problem`` then names the array and the views, and the scene
  should be skipped. Returns the scene unchanged (not copied) when everything is finite.
  """
  s, h, w = scene["images"].shape[:3]
  bad_px = np.zeros((s, h, w), bool)
  for k, v in scene.items():
    if k == "images" or not isinstance(v, np.ndarray) or v.dtype.kind != "f":
      continue
    fin = np.isfinite(v)
    if v.ndim >= 3 and v.shape[:3] == (s, h, w):
      if not fin.all():
        bad_px |= ~fin.reshape(s, h, w, -1).all(-1)
    elif not fin.all():
      views = np.nonzero(~fin.reshape(len(v), -1).all(-1))[0].tolist() if v.ndim else []
      return scene, 0, f"non-finite {k} (views {views})"
  k = scene.get("intrinsics")
  if isinstance(k, np.ndarray) and k.ndim == 3 and np.any((k[:, 0, 0] <= 0) | (k[:, 1, 1] <= 0)):
    views = np.nonzero((k[:, 0, 0] <= 0) | (k[:, 1, 1] <= 0))[0].tolist()
    return scene, 0, f"non-positive focal length in intrinsics (views {views})"
  n = int(bad_px.sum())
  if n == 0:
    return scene, 0, None
  out = dict(scene)
  for key, v in scene.items():
    if key != "images" and isinstance(v, np.ndarray) and v.dtype.kind == "f" and \
        v.ndim >= 3 and v.shape[:3] == (s, h, w):
      m = bad_px.reshape((s, h, w) + (1,) * (v.ndim - 3))
      out[key] = np.where(m, 0, v).astype(v.dtype)
  out["valid"] = np.asarray(scene.get("valid", np.ones((s, h, w), bool)), bool) & ~bad_px
  return out, n, None


def ray_map(intrinsics: np.ndarray, extrinsics: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """``(S, H, W, 6)`` float32: world ray direction ``R_c2w K^-1 [u, v, 1]`` (pixel offset 0), then
  the camera centre, as :func:`geojax.data.synthetic.render_scene`'s ``ray_map``."""
  v, u = np.mgrid[0:hw[0], 0:hw[1]].astype(np.float64)
  pix = np.stack([u, v, np.ones_like(u)], -1)
  c2w = np.linalg.inv(extrinsics.astype(np.float64))
  kinv = np.linalg.inv(intrinsics.astype(np.float64))
  d = np.einsum("sij,hwj->shwi", c2w[:, :3, :3] @ kinv, pix)
  c = np.broadcast_to(c2w[:, None, None, :3, 3], d.shape)
  return np.concatenate([d, c], -1).astype(np.float32)


# ------------------------------------------------------------------------------------ geometry


def scale_intrinsics(k: np.ndarray, sx: float, sy: float) -> np.ndarray:
  """Intrinsics ``(..., 3, 3)`` after resizing by ``(sx, sy)`` under the pixel-centre convention.

  Host (NumPy, float64) twin of :func:`geojax.geometry.camera.scale_intrinsics` with
  ``offset=0``, so that Grain workers need no JAX.

  ``fx' = sx fx``, ``cx' = sx (cx + 0.5) - 0.5`` (same for y); the skew scales with ``sx``.
  """
  k = np.array(k, np.float64, copy=True)
  k[..., 0, :] *= sx
  k[..., 1, :] *= sy
  k[..., 0, 2] += 0.5 * sx - 0.5
  k[..., 1, 2] += 0.5 * sy - 0.5
  return k


def crop_intrinsics(k: np.ndarray, top: int, left: int) -> np.ndarray:
  """Intrinsics ``(..., 3, 3)`` after cropping at ``(top, left)``: ``c' = c - offset``."""
  k = np.array(k, np.float64, copy=True)
  k[..., 0, 2] -= left
  k[..., 1, 2] -= top
  return k


def _src_coords(n_out: int, n_in: int) -> np.ndarray:
  """Source coordinate of each output pixel centre, ``(x' + 0.5) n_in / n_out - 0.5``."""
  return (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5


def resize_bilinear(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of ``(S, H, W, C)`` (any dtype) to ``(S, H', W', C)`` float32, centre-aligned.

  Borders are clamped. No antialiasing: for strong downscaling use a multiple-step resize.
  """
  out = x.astype(np.float32)
  for axis, n_out in ((1, out_hw[0]), (2, out_hw[1])):
    n_in = out.shape[axis]
    if n_in == n_out:
      continue
    s = np.clip(_src_coords(n_out, n_in), 0, n_in - 1)
    i0 = np.floor(s).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (s - i0).astype(np.float32)
    shape = [1] * out.ndim
    shape[axis] = n_out
    w = w.reshape(shape)
    out = np.take(out, i0, axis) * (1 - w) + np.take(out, i1, axis) * w
  return out


def resize_nearest(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """Nearest-neighbour resize of ``(S, H, W, ...)``: output pixel ``x'`` reads source pixel
  ``floor((x' + 0.5) n_in / n_out)``, the source pixel whose centre is nearest."""
  h, w = x.shape[1:3]
  rows = np.minimum(np.floor((np.arange(out_hw[0]) + 0.5) * h / out_hw[0]).astype(np.int64), h - 1)
  cols = np.minimum(np.floor((np.arange(out_hw[1]) + 0.5) * w / out_hw[1]).astype(np.int64), w - 1)
  return x[:, rows][:, :, cols]


def resize_scene(scene: dict, out_hw: tuple[int, int]) -> dict:
  """Resize every view of ``scene`` to ``out_hw = (H', W')`` and update the intrinsics exactly."""
  h, w = scene["images"].shape[1:3]
  if (h, w) == tuple(out_hw):
    return dict(scene)
  out = dict(scene)
  img = resize_bilinear(scene["images"], out_hw)
  if scene["images"].dtype == np.uint8:
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
  out["images"] = img
  for key in _pixel_keys(scene):
    out[key] = resize_nearest(scene[key], out_hw)
  out["intrinsics"] = scale_intrinsics(scene["intrinsics"], out_hw[1] / w, out_hw[0] / h).astype(np.float32)
  if "ray_map" in scene:
    out["ray_map"] = ray_map(out["intrinsics"], scene["extrinsics"], out_hw)
  return out


def crop_scene(scene: dict, top: int, left: int, out_hw: tuple[int, int]) -> dict:
  """Crop every view of ``scene`` to rows ``top:top+H'`` and columns ``left:left+W'``."""
  h, w = scene["images"].shape[1:3]
  if top < 0 or left < 0 or top + out_hw[0] > h or left + out_hw[1] > w:
    raise ValueError(f"crop {(top, left, *out_hw)} outside an image of size {(h, w)}")
  out = dict(scene)
  for key in ["images", "ray_map"] + _pixel_keys(scene):
    if key in scene:
      out[key] = scene[key][:, top:top + out_hw[0], left:left + out_hw[1]]
  out["intrinsics"] = crop_intrinsics(scene["intrinsics"], top, left).astype(np.float32)
  return out


def fit_to_bucket(scene: dict, bucket_hw: tuple[int, int], rng: np.random.Generator | None = None) -> dict:
  """Resize (aspect preserving, to cover) then crop ``scene`` to exactly ``bucket_hw``.

  The scale is ``max(H_b / H, W_b / W)``; the resized size is rounded up so it covers the bucket,
  with the exact per-axis scales used for the intrinsics. The crop is random when ``rng`` is
  given, centred otherwise.
  """
  h, w = scene["images"].shape[1:3]
  hb, wb = bucket_hw
  s = max(hb / h, wb / w)
  rh, rw = max(hb, int(np.ceil(h * s - 1e-6))), max(wb, int(np.ceil(w * s - 1e-6)))
  scene = resize_scene(scene, (rh, rw))
  if rng is None:
    top, left = (rh - hb) // 2, (rw - wb) // 2
  else:
    top, left = int(rng.integers(0, rh - hb + 1)), int(rng.integers(0, rw - wb + 1))
  return crop_scene(scene, top, left, (hb, wb))


def closest_bucket(hw: tuple[int, int], buckets) -> tuple[int, int]:
  """The bucket ``(H, W)`` whose aspect ratio is closest (in log space) to ``hw``'s."""
  a = np.log(hw[1] / hw[0])
  return tuple(min(buckets, key=lambda b: abs(np.log(b[1] / b[0]) - a)))


def select_views(scene: dict, views: np.ndarray) -> dict:
  """Keep views ``views`` (n,) of every array whose leading axis is the view axis ``S``."""
  n = scene["images"].shape[0]
  out = dict(scene)
  for key, val in scene.items():
    if isinstance(val, np.ndarray) and val.ndim >= 1 and val.shape[0] == n:
      out[key] = val[views]
  return out


def sample_views(num_available: int, num_views: int, rng: np.random.Generator,
                 order: str = "ordered") -> np.ndarray:
  """Indices (num_views,) of the views to keep.

  ``order="ordered"``: a random subset in increasing order (keeps temporal order of videos);
  ``"random"``: a random subset in random order; ``"first"``: views ``0..n-1``; ``"strided"``
  (videos, D4RT's random temporal stride): ``start + stride * arange(n)`` with the stride drawn
  uniformly among those that fit, then the start. When the scene has fewer views than requested,
  views are drawn with replacement (then sorted for ``"ordered"`` / ``"strided"``).
  """
  if order == "first" and num_available >= num_views:
    return np.arange(num_views)
  if order == "strided" and num_available >= num_views:
    max_stride = 1 if num_views == 1 else (num_available - 1) // (num_views - 1)
    stride = int(rng.integers(1, max_stride + 1))
    start = int(rng.integers(0, num_available - stride * (num_views - 1)))
    return start + stride * np.arange(num_views)
  replace = num_available < num_views
  idx = rng.choice(num_available, num_views, replace=replace)
  return np.sort(idx) if order in ("ordered", "first", "strided") else idx


def sample_crop_box(rng: np.random.Generator, hw: tuple[int, int],
                    area: tuple[float, float] = (0.3, 1.0),
                    aspect: tuple[float, float] = (0.75, 4 / 3), tries: int = 10
                    ) -> tuple[int, int, int, int]:
  """A random ``(top, left, height, width)`` crop of an ``hw`` image: area fraction
  ``U[area]``, aspect ratio ``width / height`` log-uniform in ``aspect`` (torchvision's
  RandomResizedCrop rule; D4RT: area 0.3-1.0, log-uniform aspect). After ``tries`` draws that do
  not fit, the largest centred crop of the middle aspect."""
  h, w = hw
  lo, hi = np.log(aspect[0]), np.log(aspect[1])
  for _ in range(tries):
    a = rng.uniform(*area) * h * w
    r = float(np.exp(rng.uniform(lo, hi)))
    cw, ch = int(round(np.sqrt(a * r))), int(round(np.sqrt(a / r)))
    if 0 < cw <= w and 0 < ch <= h:
      return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
  r = float(np.exp((lo + hi) / 2))
  cw, ch = (w, max(1, min(h, int(round(w / r))))) if w / h < r else (max(1, min(w, int(round(h * r)))), h)
  return (h - ch) // 2, (w - cw) // 2, ch, cw


def zoom_boxes(box: tuple[int, int, int, int], num_views: int, factor: float,
               hw: tuple[int, int]) -> np.ndarray:
  """``(S, 4)`` integer crop boxes that zoom in over the clip: view 0 is ``box``, the last view the
  same centre with sides ``factor`` (< 1) times as long, linear in between."""
  top, left, ch, cw = box
  cy, cx = top + ch / 2, left + cw / 2
  f = 1.0 + (factor - 1.0) * (np.arange(num_views) / max(num_views - 1, 1))
  hs, ws = np.maximum(1, np.round(ch * f)), np.maximum(1, np.round(cw * f))
  tops = np.clip(np.round(cy - hs / 2), 0, hw[0] - hs)
  lefts = np.clip(np.round(cx - ws / 2), 0, hw[1] - ws)
  return np.stack([tops, lefts, hs, ws], -1).astype(np.int64)


def crop_resize_views(scene: dict, boxes: np.ndarray, out_hw: tuple[int, int]) -> dict:
  """Crop view ``i`` of ``scene`` to ``boxes[i] = (top, left, height, width)`` and resize it to
  ``out_hw`` (the aspect ratio may change): images bilinear, per-pixel maps nearest, intrinsics
  exact per view (crop, then per-axis scale), ray maps recomputed."""
  boxes = np.asarray(boxes, np.int64)
  if np.all(boxes == boxes[:1]):  # one box for the clip: crop and resize all views at once
    t, l, ch, cw = (int(v) for v in boxes[0])
    return resize_scene(crop_scene(scene, t, l, (ch, cw)), out_hw)
  views = [resize_scene(crop_scene(_view(scene, i), *(int(v) for v in b[:2]), tuple(int(v) for v in b[2:])), out_hw)
           for i, b in enumerate(boxes)]
  out = dict(scene)
  for key in ["images", "ray_map", "intrinsics"] + _pixel_keys(scene):
    if key in scene:
      out[key] = np.concatenate([v[key] for v in views])
  return out


def _view(scene: dict, i: int) -> dict:
  """View ``i`` of the per-pixel maps, images, ray map and camera (leading axis kept)."""
  keys = ["images", "ray_map", "intrinsics", "extrinsics"] + _pixel_keys(scene)
  return {k: scene[k][i:i + 1] for k in keys if k in scene}


def random_blur(images: np.ndarray, sigma: float) -> np.ndarray:
  """Gaussian blur of uint8 ``(S, H, W, 3)`` images, the same ``sigma`` (pixels) for every view."""
  from scipy import ndimage  # host-only dependency, imported lazily
  x = ndimage.gaussian_filter(images.astype(np.float32), sigma=(0, sigma, sigma, 0), mode="nearest")
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def color_drop(images: np.ndarray) -> np.ndarray:
  """Grey (luma, BT.601) copies of uint8 ``(S, H, W, 3)`` images, kept three-channel."""
  grey = images.astype(np.float32) @ _YIQ[0]
  return np.repeat(np.clip(np.round(grey), 0, 255).astype(np.uint8)[..., None], 3, -1)


# ---------------------------------------------------------------------------------- photometric


def sample_color_jitter(rng: np.random.Generator, brightness: float, contrast: float,
                        saturation: float, hue: float) -> np.ndarray:
  """Jitter parameters ``[b, c, s, h]``: factors ``U[1 - x, 1 + x]`` and hue shift ``U[-hue, hue]``
  (fraction of a full turn). Draw once per scene so every view gets the same jitter."""
  return np.array([rng.uniform(1 - brightness, 1 + brightness), rng.uniform(1 - contrast, 1 + contrast),
                   rng.uniform(1 - saturation, 1 + saturation), rng.uniform(-hue, hue)], np.float32)


_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)


def apply_color_jitter(images: np.ndarray, params: np.ndarray) -> np.ndarray:
  """Apply brightness, contrast (per view, around its mean grey), saturation and hue (rotation of
  the YIQ chroma plane) to uint8 ``(S, H, W, 3)`` images; returns uint8 of the same shape."""
  b, c, s, h = (float(p) for p in params)
  x = images.astype(np.float32) / 255.0 * b
  grey = x @ _YIQ[0]
  mean = grey.mean(axis=(1, 2), keepdims=True)[..., None]
  x = (x - mean) * c + mean
  grey = (x @ _YIQ[0])[..., None]
  x = (x - grey) * s + grey
  if h != 0.0:
    ang = 2 * np.pi * h
    rot = np.array([[1, 0, 0], [0, np.cos(ang), -np.sin(ang)], [0, np.sin(ang), np.cos(ang)]], np.float32)
    m = np.linalg.inv(_YIQ) @ rot @ _YIQ
    x = x @ m.T.astype(np.float32)
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


# -------------------------------------------------------------------------------- URGT GridMix


def sample_gridmix(rng: np.random.Generator, probs=(0.1, 0.2, 0.3, 0.4)) -> int:
  """Grid size ``n`` in ``1..len(probs)`` drawn with probabilities ``probs`` (URGT: 0.1/0.2/0.3/0.4)."""
  p = np.asarray(probs, np.float64)
  return int(rng.choice(len(p), p=p / p.sum())) + 1


def gridmix_crop(scene: dict, n: int, rng: np.random.Generator | None, grid: int = 4) -> dict:
  """URGT GridMix: the image is a ``grid x grid`` lattice of patches of size ``(H/grid, W/grid)``;
  keep one contiguous ``n x n`` block of patches (at a random lattice origin when ``rng`` is given,
  else the top-left block; ``n == grid`` keeps the whole image).

  Returns the cropped scene (images ``(S, n H/grid, n W/grid, 3)``, intrinsics shifted) with
  ``grid_n`` (int32 scalar ``n``), ``grid_origin`` (2,) int32 lattice cell ``(row, col)`` of the
  block's top-left patch (the global RoPE origin) and ``grid_patch_hw`` (2,) the patch size in px.
  """
  h, w = scene["images"].shape[1:3]
  if h % grid or w % grid:
    raise ValueError(f"gridmix: image {(h, w)} is not divisible by the grid {grid}")
  ph, pw = h // grid, w // grid
  if rng is None:
    r0 = c0 = 0
  else:
    r0, c0 = int(rng.integers(0, grid - n + 1)), int(rng.integers(0, grid - n + 1))
  out = crop_scene(scene, r0 * ph, c0 * pw, (n * ph, n * pw))
  out["grid_n"] = np.int32(n)
  out["grid_origin"] = np.array([r0, c0], np.int32)
  out["grid_patch_hw"] = np.array([ph, pw], np.int32)
  return out


# ------------------------------------------------------------------------------- D4RT queries


def query_boundaries(depth: np.ndarray, valid: np.ndarray, threshold: float = 0.05) -> np.ndarray:
  """Depth-boundary mask (S, H, W), dilated by one pixel, for D4RT query sampling.

  Not MoGe's relative depth-edge rule (:func:`geojax.geometry.normals.depth_edges`), which marks
  slanted planes near the horizon as edges.

  A pixel is a boundary when the 4-neighbour Laplacian of inverse depth, relative to its own
  inverse depth, exceeds ``threshold`` (inverse depth is affine in the pixel coordinates on any
  plane, so slanted floors and the horizon of a ground plane are not boundaries), or when it is
  valid next to an invalid pixel (sky, holes).
  """
  valid = valid.astype(bool)
  inv = np.where(valid, 1.0 / np.maximum(depth, 1e-6), 0.0)
  p = np.pad(inv, ((0, 0), (1, 1), (1, 1)), mode="edge")
  vp = np.pad(valid, ((0, 0), (1, 1), (1, 1)), mode="edge")
  lap = 4 * inv - p[:, :-2, 1:-1] - p[:, 2:, 1:-1] - p[:, 1:-1, :-2] - p[:, 1:-1, 2:]
  edge = valid & (np.abs(lap) > threshold * np.maximum(inv, 1e-12))
  nb_invalid = ~(vp[:, :-2, 1:-1] & vp[:, 2:, 1:-1] & vp[:, 1:-1, :-2] & vp[:, 1:-1, 2:])
  edge |= valid & nb_invalid
  e = np.pad(edge, ((0, 0), (1, 1), (1, 1)))
  h, w = edge.shape[1:]
  dil = np.zeros_like(edge)
  for dy in range(3):
    for dx in range(3):
      dil |= e[:, dy:dy + h, dx:dx + w]
  return dil


def _pick(mask_flat: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """``k`` flat indices drawn uniformly (with replacement) among the true entries of a mask."""
  idx = np.flatnonzero(mask_flat)
  if idx.size == 0:
    return np.full(k, -1, np.int64)
  return idx[rng.integers(0, idx.size, k)]


def sample_d4rt_queries(scene: dict, rng: np.random.Generator, num_queries: int = 2048,
                        edge_fraction: float = 0.3, same_time_prob: float = 0.4,
                        edge_threshold: float = 0.05) -> dict:
  """D4RT training queries for a clip whose views are its frames ``t = 0..S-1``.

  Each query is ``(u, v, t_src, t_tgt, t_cam)``: pixel ``(u, v)`` of frame ``t_src`` (returned
  normalised to ``[0, 1]`` as ``(u + 0.5) / W``, ``(v + 0.5) / H``); the target is that physical
  point at time ``t_tgt`` in the camera frame of ``t_cam``. ``t_src`` and ``t_tgt`` are uniform;
  ``t_cam = t_tgt`` with probability ``same_time_prob``, otherwise uniform over the *other* frames
  (so the fraction with ``t_cam == t_tgt`` is ``same_time_prob`` whenever ``S > 1``).
  ``round(edge_fraction * N)`` queries are drawn among pixels near depth (or, with tracks, motion)
  boundaries (:func:`query_boundaries`), the rest uniformly among valid pixels.

  Returns ``queries`` (N, 5) float32 ``[u, v, t_src, t_tgt, t_cam]`` (u, v normalised),
  ``query_pixels`` (N, 2) int32 ``(u, v)`` px, ``query_near_edge`` (N,) bool (drawn from the
  boundary pool) and the targets of :func:`d4rt_targets` under ``query_<name>`` (``query_points``,
  ``query_valid``, ``query_uv``, ``query_uv_valid``, ``query_visible``, ``query_displacement``, ``query_normal``,
  ``query_normal_valid``, ``query_exact``).
  """
  depth, valid = scene["depth"], scene["valid"].astype(bool)
  s, h, w = depth.shape
  n = int(num_queries)
  t_src = rng.integers(0, s, n)
  t_tgt = rng.integers(0, s, n)
  same = rng.random(n) < same_time_prob
  if s > 1:
    other = (t_tgt + rng.integers(1, s, n)) % s
    t_cam = np.where(same, t_tgt, other)
  else:
    t_cam = t_tgt.copy()
  edges = query_boundaries(depth, valid, edge_threshold) & valid
  if "tracks" in scene and "track_visible" in scene:
    edges |= _motion_edges(scene) & valid
  n_edge = int(round(edge_fraction * n))
  near = np.zeros(n, bool)
  near[rng.permutation(n)[:n_edge]] = True
  flat = np.full(n, -1, np.int64)
  for t in range(s):
    for is_edge, sel in ((True, near), (False, ~near)):
      m = (t_src == t) & sel
      k = int(m.sum())
      if not k:
        continue
      picked = _pick((edges if is_edge else valid)[t].ravel(), k, rng)
      if is_edge and picked[0] < 0:  # no boundary pixels in this frame: fall back to uniform
        picked = _pick(valid[t].ravel(), k, rng)
        near[m] = False
      flat[m] = picked
  found = flat >= 0
  v, u = np.divmod(np.maximum(flat, 0), w)
  tg = d4rt_targets(scene, u, v, t_src, t_tgt, t_cam)
  ok = tg["valid"] & found
  queries = np.stack([(u + 0.5) / w, (v + 0.5) / h, t_src, t_tgt, t_cam], -1).astype(np.float32)
  out = {"queries": queries, "query_pixels": np.stack([u, v], -1).astype(np.int32),
         "query_near_edge": near & ok}
  for key, val in tg.items():
    out[f"query_{key}"] = np.where(ok.reshape((-1,) + (1,) * (val.ndim - 1)), val,
                                   np.zeros_like(val)) if key != "exact" else val
  out["query_valid"] = ok
  return out


VISIBILITY_RTOL = 0.03  # relative depth tolerance of the visibility test of :func:`d4rt_targets`


def d4rt_targets(scene: dict, u, v, t_src, t_tgt, t_cam) -> dict:
  """Ground truth of D4RT queries at integer pixels ``(u, v)`` (column, row) of frame ``t_src``.

  The pixel's depth gives its surface point at ``t_src``, ``X_w = c2w[t_src] (d K^-1 [u, v, 1])``,
  exactly consistent with the depth map. Its position at ``t_tgt``:

  * **exact** with ``segment`` and ``object_poses`` (the built-in dynamic scenes): the point moves
    with the object seen at the pixel, ``P[t_tgt, j] P[t_src, j]^-1 X_w`` (static where the
    segment is -1);
  * with only ``tracks`` (S, P, 3) and ``track_visible``: the motion of the nearest track visible
    at ``t_src`` (an approximation; ``exact`` is False);
  * otherwise the scene is static.

  Returns (arrays over the N queries): ``points`` (N, 3) the position at ``t_tgt`` in the camera
  of ``t_cam``; ``uv`` (N, 2) its projection into frame ``t_tgt``, normalised like the queries
  (``(x + 0.5) / W``) and ``uv_valid`` (N,) (in front of that camera); ``visible`` (N,) whether it is seen in frame ``t_tgt`` (in front, inside
  the image and, at the nearest pixel, on the rendered surface: same segment when known, depth
  within ``VISIBILITY_RTOL``); ``displacement`` (N, 3) ``X(t_tgt) - X(t_src)`` in the ``t_cam``
  frame; ``normal`` (N, 3) the unit surface normal at ``t_tgt`` in the ``t_cam`` frame (rotated
  with the object) and ``normal_valid`` (N,); ``valid`` (N,) depth > 0 at the pixel; ``exact``
  (scalar bool).
  """
  depth = scene["depth"]
  s, h, w = depth.shape
  u, v = np.asarray(u, np.int64), np.asarray(v, np.int64)
  t_src, t_tgt, t_cam = (np.asarray(t, np.int64) for t in (t_src, t_tgt, t_cam))
  d = depth[t_src, v, u].astype(np.float64)
  ok = d > 0
  k = scene["intrinsics"].astype(np.float64)
  e = scene["extrinsics"].astype(np.float64)
  c2w = np.linalg.inv(e)
  pix = np.stack([u, v, np.ones_like(u)], -1).astype(np.float64)
  ray = np.einsum("nij,nj->ni", np.linalg.inv(k[t_src]), pix)
  xw = np.einsum("nij,nj->ni", c2w[t_src, :3, :3], ray * d[:, None]) + c2w[t_src, :3, 3]
  nrm = scene["normals"][t_src, v, u].astype(np.float64) if "normals" in scene else np.zeros((u.size, 3))
  nw = np.einsum("nij,nj->ni", c2w[t_src, :3, :3], nrm)
  exact = "segment" in scene and "object_poses" in scene
  seg = None
  if exact:
    seg = scene["segment"][t_src, v, u].astype(np.int64)
    poses = scene["object_poses"].astype(np.float64)
    j = np.maximum(seg, 0)
    rel = poses[t_tgt, j] @ np.linalg.inv(poses[t_src, j])
    rel[seg < 0] = np.eye(4)
    xw_t = np.einsum("nij,nj->ni", rel[:, :3, :3], xw) + rel[:, :3, 3]
    nw = np.einsum("nij,nj->ni", rel[:, :3, :3], nw)
  elif "tracks" in scene and "track_visible" in scene:
    xw_t = xw + _track_displacement(scene, xw, t_src, t_tgt)
  else:
    xw_t = xw
  rot = e[t_cam, :3, :3]
  points = np.einsum("nij,nj->ni", rot, xw_t) + e[t_cam, :3, 3]
  displacement = np.einsum("nij,nj->ni", rot, xw_t - xw)
  normal = np.einsum("nij,nj->ni", rot, nw)
  nn = np.linalg.norm(normal, axis=-1)
  normal_valid = ok & (nn > 0.5)
  normal = normal / np.maximum(nn, 1e-12)[:, None]
  # visibility and image position in frame t_tgt
  pt = np.einsum("nij,nj->ni", e[t_tgt, :3, :3], xw_t) + e[t_tgt, :3, 3]
  z = pt[:, 2]
  zs = np.where(z > 1e-9, z, 1.0)
  uvw = np.einsum("nij,nj->ni", k[t_tgt], pt / zs[:, None])
  x, y = uvw[:, 0], uvw[:, 1]
  inside = (z > 1e-9) & (x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)
  xi = np.clip(np.rint(x), 0, w - 1).astype(np.int64)
  yi = np.clip(np.rint(y), 0, h - 1).astype(np.int64)
  dm = depth[t_tgt, yi, xi].astype(np.float64)
  visible = inside & ok & (np.abs(dm - z) <= VISIBILITY_RTOL * z)
  if exact:
    visible &= scene["segment"][t_tgt, yi, xi] == seg
  uv = np.stack([(x + 0.5) / w, (y + 0.5) / h], -1)
  uv = np.where((z > 1e-9)[:, None], uv, 0.0)
  f32 = lambda a: a.astype(np.float32)  # noqa: E731
  return {"points": f32(points), "uv": f32(uv), "uv_valid": ok & (z > 1e-9), "visible": visible,
          "displacement": f32(displacement),
          "normal": f32(normal), "normal_valid": normal_valid, "valid": ok,
          "exact": np.bool_(exact)}


def _motion_edges(scene: dict) -> np.ndarray:
  """Pixels (S, H, W) next to a projected visible track that moves between consecutive frames."""
  tracks, vis = scene["tracks"].astype(np.float64), scene["track_visible"].astype(bool)
  s, h, w = scene["depth"].shape
  out = np.zeros((s, h, w), bool)
  mov = np.zeros(tracks.shape[:2], bool)
  if s > 1:
    step = np.linalg.norm(np.diff(tracks, axis=0), axis=-1)
    mov[1:] |= step > 1e-4
    mov[:-1] |= step > 1e-4
  for t in range(s):
    sel = vis[t] & mov[t]
    if not sel.any():
      continue
    e, k = scene["extrinsics"][t].astype(np.float64), scene["intrinsics"][t].astype(np.float64)
    pc = tracks[t, sel] @ e[:3, :3].T + e[:3, 3]
    pc = pc[pc[:, 2] > 1e-6]
    uv = pc @ k.T
    uu = np.round(uv[:, 0] / uv[:, 2]).astype(np.int64)
    vv = np.round(uv[:, 1] / uv[:, 2]).astype(np.int64)
    inb = (uu >= 0) & (uu < w) & (vv >= 0) & (vv < h)
    out[t, vv[inb], uu[inb]] = True
  return out


def _track_displacement(scene: dict, xw: np.ndarray, t_src: np.ndarray, t_tgt: np.ndarray) -> np.ndarray:
  """Motion (N, 3) of each query point from ``t_src`` to ``t_tgt``: that of the nearest track
  visible at ``t_src`` (zero when none is visible)."""
  tracks, vis = scene["tracks"].astype(np.float64), scene["track_visible"].astype(bool)
  disp = np.zeros_like(xw)
  for t in np.unique(t_src):
    m = t_src == t
    cand = np.flatnonzero(vis[t])
    if cand.size == 0:
      continue
    d2 = ((xw[m, None, :] - tracks[t, cand][None]) ** 2).sum(-1)
    nearest = cand[np.argmin(d2, axis=1)]
    disp[m] = tracks[t_tgt[m], nearest] - tracks[t, nearest]
  return disp


# ---------------------------------------------------------------------------- PPD depth encoding


def encode_depth_ppd(depth: np.ndarray, valid: np.ndarray, *, quantiles=(0.02, 0.98),
                     max_depth: float = 80.0, out_range: str = "symmetric"):
  """Pixel-Perfect-Depth target: ``l = log(d + 1)`` normalised per view by the linear-interpolated
  ``quantiles`` of ``l`` over valid pixels with ``d < max_depth`` (as ``torch.quantile``).

  ``x = (l - q_lo) / (q_hi - q_lo)`` (``q_hi - q_lo >= 1e-6``); then
  ``out_range="symmetric"``: ``2 x - 1`` clipped to **[-1, 1]**; ``"unit"``: ``x`` clipped to
  **[0, 1]**; ``"ppd"`` (the released code): ``clip(x, -0.5, 1) - 0.5`` in **[-1, 0.5]**.
  Invalid pixels are set to the range's lower end. Depth ``(S, H, W)`` -> ``(encoded (S, H, W)
  float32, q_lo (S,), q_hi (S,))``; :func:`decode_depth_ppd` inverts it for unclipped values.
  """
  valid = valid.astype(bool)
  l = np.log(np.maximum(depth, 0).astype(np.float64) + 1.0)
  mask = valid & (depth < max_depth)
  s = depth.shape[0]
  q_lo, q_hi = np.zeros(s), np.ones(s)
  for i in range(s):
    vals = l[i][mask[i]]
    if vals.size:
      q_lo[i], q_hi[i] = np.quantile(vals, quantiles, method="linear")
  q_hi = np.maximum(q_hi, q_lo + 1e-6)
  x = (l - q_lo[:, None, None]) / (q_hi - q_lo)[:, None, None]
  if out_range == "symmetric":
    enc, low = np.clip(2 * x - 1, -1, 1), -1.0
  elif out_range == "unit":
    enc, low = np.clip(x, 0, 1), 0.0
  elif out_range == "ppd":
    enc, low = np.clip(x, -0.5, 1) - 0.5, -1.0
  else:
    raise ValueError(f"ppd_range must be 'symmetric', 'unit' or 'ppd'; got {out_range!r}")
  enc = np.where(valid, enc, low)
  return enc.astype(np.float32), q_lo.astype(np.float32), q_hi.astype(np.float32)


def decode_depth_ppd(enc: np.ndarray, q_lo: np.ndarray, q_hi: np.ndarray,
                     out_range: str = "symmetric") -> np.ndarray:
  """Inverse of :func:`encode_depth_ppd`: ``(S, H, W)`` codes and ``(S,)`` quantiles -> depth."""
  enc = np.asarray(enc, np.float64)
  if out_range == "symmetric":
    x = (enc + 1) / 2
  elif out_range == "unit":
    x = enc
  elif out_range == "ppd":
    x = enc + 0.5
  else:
    raise ValueError(f"ppd_range must be 'symmetric', 'unit' or 'ppd'; got {out_range!r}")
  q_lo = np.asarray(q_lo, np.float64)[..., None, None]
  q_hi = np.asarray(q_hi, np.float64)[..., None, None]
  return (np.exp(x * (q_hi - q_lo) + q_lo) - 1.0).astype(np.float32)
