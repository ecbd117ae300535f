"""ViT input preprocessing (patch 14, ImageNet statistics), equal to the official ``InputProcessor`` of ``depth-anything-3``.

For each image (uint8 RGB ``(H, W, 3)``):

1. **Boundary resize** keeping the aspect ratio. ``upper_bound_*`` scales the longest side to
   ``process_res``, ``lower_bound_*`` the shortest; the new size is ``max(1, round(side *
   scale))`` (Python's ``round``, half to even). Nothing happens if that side already equals
   ``process_res``.
2. **Multiples of 14** (the ViT patch). ``*_resize`` resizes each side to its nearest multiple of
   14 (ties go up); ``*_crop`` centre-crops each side down to a multiple of 14 (offset
   ``(side - new) // 2``).
3. **Normalisation**: ``x / 255``, then ImageNet mean/std, as float32.

Resampling is OpenCV's, re-implemented in NumPy so that no OpenCV is needed: bicubic
(``cv2.INTER_CUBIC``: Keys kernel with ``a = -0.75``, replicated border) whenever either side
grows, otherwise area averaging (``cv2.INTER_AREA``), both as separable weight matrices applied
in float64 and rounded to uint8. Results are rounded back to uint8 between steps, as the official
processor does with its PIL round trips. Pixel values agree with OpenCV to within one grey level
(1/255 before normalisation): OpenCV accumulates in float32, so values within float32 rounding
of a half level may round the other way.

**Mixed sizes.** When the processed images of one scene differ in size, all are centre-cropped
to the smallest height and width (with a warning), and principal points move by the crop.

**Intrinsics** use geojax's pixel convention (pixel ``(u, v)`` at integer coordinates is the
centre of column ``u``): scaling by ``s`` maps ``c`` to ``(c + 0.5) * s - 0.5``, and cropping
``left`` columns maps ``c`` to ``c - left``. In OpenCV's corner convention (``c + 0.5``) these are
the official processor's ``K[0] *= s`` and ``cx -= left``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np

from geojax.data.transforms import crop_intrinsics, scale_intrinsics
from geojax.models.registry import IMAGENET_MEAN, IMAGENET_STD

PATCH = 14
METHODS = ("upper_bound_resize", "upper_bound_crop", "lower_bound_resize", "lower_bound_crop")

_CUBIC_A = -0.75


# ------------------------------------------------------------------------------------------------
# OpenCV-equivalent resampling of uint8 images.


def _cubic_matrix(n_out: int, n_in: int) -> np.ndarray:
  """``(n_out, n_in)`` bicubic weights of ``cv2.INTER_CUBIC`` (Keys ``a = -0.75``, border
  replicated; the source coordinate is computed in float32 as OpenCV does)."""
  scale = n_in / n_out
  f = ((np.arange(n_out) + 0.5) * scale - 0.5).astype(np.float32).astype(np.float64)
  s = np.floor(f)
  t = f - s
  a = _CUBIC_A
  w0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
  w1 = ((a + 2) * t - (a + 3)) * t * t + 1
  w2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
  w = np.stack([w0, w1, w2, 1 - w0 - w1 - w2], -1)
  idx = np.clip(s.astype(np.int64)[:, None] + np.arange(-1, 3)[None], 0, n_in - 1)
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.repeat(np.arange(n_out), 4), idx.reshape(-1)), w.reshape(-1))
  return m


def _separable(img: np.ndarray, my: np.ndarray, mx: np.ndarray) -> np.ndarray:
  """``my @ img @ mx.T`` per channel in float64, rounded half to even and saturated to uint8."""
  x = np.moveaxis(img.astype(np.float64), -1, 0)  # (C, H, W)
  out = np.moveaxis(my @ (x @ mx.T), 0, -1)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _resize_cubic(img: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  h, w = img.shape[:2]
  return _separable(img, _cubic_matrix(out_hw[0], h), _cubic_matrix(out_hw[1], w))


def _area_matrix(n_out: int, n_in: int) -> np.ndarray:
  """``(n_out, n_in)`` area-overlap weights of ``cv2.INTER_AREA`` for a shrinking axis."""
  scale = n_in / n_out
  m = np.zeros((n_out, n_in), np.float64)
  for d in range(n_out):
    lo, hi = d * scale, d * scale + scale
    cell = min(scale, n_in - lo)
    s1, s2 = int(np.ceil(lo)), int(np.floor(hi))
    if s1 - lo > 1e-3:
      m[d, s1 - 1] = (s1 - lo) / cell
    m[d, s1:min(s2, n_in)] = 1.0 / cell
    if hi - s2 > 1e-3 and s2 < n_in:
      m[d, s2] = min(min(hi - s2, 1.0), cell) / cell
  return m


def _resize_area(img: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  h, w = img.shape[:2]
  return _separable(img, _area_matrix(out_hw[0], h), _area_matrix(out_hw[1], w))


def resize_uint8(img: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """Resize uint8 ``(H, W, 3)`` as the official processor does: bicubic if a side grows, else
  area averaging (OpenCV semantics, see the module docstring)."""
  h, w = img.shape[:2]
  if (h, w) == tuple(out_hw):
    return img
  if out_hw[0] > h or out_hw[1] > w:
    return _resize_cubic(img, out_hw)
  return _resize_area(img, out_hw)


# ------------------------------------------------------------------------------------------------
# Sizes and intrinsics.


def boundary_size(hw: tuple[int, int], process_res: int, method: str) -> tuple[int, int]:
  """Size after step 1 (aspect-preserving resize of the longest/shortest side)."""
  h, w = hw
  side = max(h, w) if method.startswith("upper") else min(h, w)
  if side == process_res:
    return h, w
  scale = process_res / float(side)
  return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def _nearest_multiple(x: int, p: int = PATCH) -> int:
  down = (x // p) * p
  up = down + p
  return max(1, up if abs(up - x) <= abs(x - down) else down)


def processed_size(hw: tuple[int, int], process_res: int = 504,
                   method: str = "upper_bound_resize") -> tuple[int, int]:
  """Network input size ``(H, W)`` for an image of size ``hw`` (both multiples of 14)."""
  _check_method(method)
  h, w = boundary_size(hw, process_res, method)
  if method.endswith("resize"):
    return _nearest_multiple(h), _nearest_multiple(w)
  return (h // PATCH) * PATCH, (w // PATCH) * PATCH


def _check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"process_res_method must be one of {METHODS}; got {method!r}")


# ------------------------------------------------------------------------------------------------
# The processor.


@dataclasses.dataclass
class Processed:
  """Output of :func:`preprocess`.

  Attributes:
    images: ImageNet-normalised float32 ``(S, H, W, 3)``, H and W multiples of 14.
    pixels: the same views as uint8 RGB ``(S, H, W, 3)`` (for colouring point clouds).
    intrinsics: ``(S, 3, 3)`` float32 for the processed size (geojax pixel centres), or None.
    input_hw: original ``(H, W)`` of every view.
    crops: ``(top, left)`` of the mixed-size centre crop per view (zeros when sizes agree).
  """
  images: np.ndarray
  pixels: np.ndarray
  intrinsics: np.ndarray | None
  input_hw: list[tuple[int, int]]
  crops: list[tuple[int, int]]


def _process_one(img: np.ndarray, k: np.ndarray | None, process_res: int, method: str):
  h0, w0 = img.shape[:2]
  h1, w1 = boundary_size((h0, w0), process_res, method)
  img = resize_uint8(img, (h1, w1))
  if k is not None:
    k = scale_intrinsics(k, w1 / w0, h1 / h0)
  if method.endswith("resize"):
    h2, w2 = _nearest_multiple(h1), _nearest_multiple(w1)
    img = resize_uint8(img, (h2, w2))
    if k is not None:
      k = scale_intrinsics(k, w2 / w1, h2 / h1)
  else:
    h2, w2 = (h1 // PATCH) * PATCH, (w1 // PATCH) * PATCH
    top, left = (h1 - h2) // 2, (w1 - w2) // 2
    img = img[top:top + h2, left:left + w2]
    if k is not None:
      k = crop_intrinsics(k, top, left)
  if min(h2, w2) < PATCH:
    raise ValueError(f"an image of {w0}x{h0} pixels becomes {w2}x{h2} at process_res="
                     f"{process_res} ({method}); both sides must reach at least {PATCH} pixels "
                     "(raise --process-res or crop the image)")
  return img, k


def preprocess(images: Sequence[np.ndarray], intrinsics: np.ndarray | None = None, *,
               process_res: int = 504, method: str = "upper_bound_resize",
               names: Sequence[str] | None = None) -> Processed:
  """Prepare the views of one scene for the network, as the official input processor does.

  Args:
    images: ``S`` uint8 RGB arrays ``(H_i, W_i, 3)`` (sizes may differ; see the module).
    intrinsics: optional ``(S, 3, 3)`` pixel intrinsics of the original images (geojax
      convention); returned rescaled to the processed size.
    process_res: target size of the longest (``upper_bound_*``) or shortest side.
    method: one of :data:`METHODS`.
    names: view names for error and warning messages.

  Returns:
    a :class:`Processed`.
  """
  _check_method(method)
  if not isinstance(process_res, (int, np.integer)) or process_res < PATCH:
    raise ValueError(f"process_res must be an integer >= {PATCH}; got {process_res!r}")
  if len(images) == 0:
    raise ValueError("preprocess: no images given")
  names = list(names) if names is not None else [f"view {i}" for i in range(len(images))]
  ks = None
  if intrinsics is not None:
    ks = np.asarray(intrinsics, np.float64)
    if ks.shape != (len(images), 3, 3):
      raise ValueError(f"intrinsics must be ({len(images)}, 3, 3) to match the images; got "
                       f"{ks.shape}")
  outs, kout, hw0 = [], [], []
  for i, img in enumerate(images):
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
      raise ValueError(f"{names[i]}: expected uint8 RGB (H, W, 3); got {img.dtype} {img.shape}")
    hw0.append(img.shape[:2])
    try:
      im, k = _process_one(img, None if ks is None else ks[i], process_res, method)
    except ValueError as e:
      raise ValueError(f"{names[i]}: {e}") from None
    outs.append(im)
    kout.append(k)
  sizes = [o.shape[:2] for o in outs]
  crops = [(0, 0)] * len(outs)
  if len(set(sizes)) > 1:
    mh, mw = min(s[0] for s in sizes), min(s[1] for s in sizes)
    detail = ", ".join(f"{n}: {w}x{h}" for n, (h, w) in zip(names, hw0))
    warnings.warn(f"the images of one scene differ in size ({detail}); after resizing they are "
                  f"centre-cropped to {mw}x{mh}", stacklevel=2)
    crops = [((h - mh) // 2, (w - mw) // 2) for h, w in sizes]
    outs = [o[t:t + mh, l:l + mw] for o, (t, l) in zip(outs, crops)]
    if ks is not None:
      kout = [crop_intrinsics(k, t, l) for k, (t, l) in zip(kout, crops)]
  pixels = np.stack(outs)
  x = pixels.astype(np.float32) / np.float32(255.0)
  x = (x - IMAGENET_MEAN) / IMAGENET_STD
  return Processed(images=x.astype(np.float32), pixels=pixels,
                   intrinsics=None if ks is None else np.stack(kout).astype(np.float32),
                   input_hw=hw0, crops=crops)
