"""Canny edge detection on the host (NumPy + SciPy), matching OpenCV's ``cv2.Canny`` defaults.

This module is NumPy, not JAX: it runs eagerly on CPU arrays and is meant for metrics and data
preparation (e.g. an edge-aware Chamfer metric: GT depth min-max scaled to uint8, then
``canny(img, 100, 200)``), not inside ``jit``.

Conventions follow ``cv2.Canny(image, low, high)`` with ``apertureSize=3, L2gradient=False``:
unnormalised 3x3 Sobel derivatives (``[-1, 0, 1]`` x ``[1, 2, 1]``, replicated border), L1
gradient magnitude ``|gx| + |gy|`` in the units of the input values (uint8 images: 0..255, so
``low=100, high=200`` mean the same as in OpenCV), no blur unless ``sigma`` is given. Image
rows are y (down), columns x (right).
"""

from __future__ import annotations

import numpy as np

# OpenCV's fixed-point sector bounds: tan(22.5 deg) in Q15 and tan(67.5) = tan(22.5) + 2.
_TG22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)
_TG67 = _TG22 + (1 << 16)


def _sobel(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  p = np.pad(img, 1, mode="edge")
  smooth_rows = p[:-2] + 2 * p[1:-1] + p[2:]  # [1, 2, 1] down the rows
  gx = smooth_rows[:, 2:] - smooth_rows[:, :-2]
  smooth_cols = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]
  gy = smooth_cols[2:] - smooth_cols[:-2]
  return gx, gy


def canny(image: np.ndarray, low: float, high: float, sigma: float | None = None) -> np.ndarray:
  """Canny edges of a single-channel image (host NumPy, see the module docstring).

  Steps as in OpenCV: Sobel gradients; non-maximum suppression along the gradient quantised to
  0/45/90/135 degrees (ties kept on one side: ``m > left and m >= right``, ``m > up and
  m >= down``; diagonals strict on both), magnitudes outside the image count as 0; candidates
  need ``m > low``, seeds ``m > high``; hysteresis keeps the candidates 8-connected to a seed
  (``scipy.ndimage.label``). ``low > high`` is swapped, like OpenCV.

  Args:
    image: ``(H, W)`` uint8 or float image (float values are used as they are, so scale them to
      0..255 to reuse uint8 thresholds); ``(..., H, W)`` stacks are processed one by one.
    low, high: hysteresis thresholds on the L1 Sobel magnitude.
    sigma: optional Gaussian pre-blur (``scipy.ndimage.gaussian_filter``, nearest border); OpenCV
      itself does not blur.

  Returns:
    ``(..., H, W)`` bool edge map (``cv2.Canny`` returns the same set as 0/255 uint8).
  """
  from scipy import ndimage  # host-only dependency, imported lazily

  img = np.asarray(image)
  if img.ndim > 2:
    flat = img.reshape((-1,) + img.shape[-2:])
    out = np.stack([canny(x, low, high, sigma) for x in flat])
    return out.reshape(img.shape)
  if img.ndim != 2:
    raise ValueError(f"expected an (H, W) image, got shape {img.shape}")
  if low > high:
    low, high = high, low
  img = img.astype(np.float64)
  if sigma is not None and sigma > 0:
    img = ndimage.gaussian_filter(img, sigma, mode="nearest")
  gx, gy = _sobel(img)
  mag = np.abs(gx) + np.abs(gy)

  mp = np.pad(mag, 1)  # zeros outside the image
  nb = lambda di, dj: mp[1 + di:mp.shape[0] - 1 + di, 1 + dj:mp.shape[1] - 1 + dj]  # noqa: E731
  ax, ay = np.abs(gx) * _TG22, np.abs(gy) * (1 << 15)
  horizontal = ay < ax  # gradient within 22.5 deg of x: compare left/right
  vertical = ~horizontal & (ay > np.abs(gx) * _TG67)  # compare up/down
  same_sign = (gx < 0) == (gy < 0)  # gradient along the main diagonal (down-right / up-left)
  keep_h = (mag > nb(0, -1)) & (mag >= nb(0, 1))
  keep_v = (mag > nb(-1, 0)) & (mag >= nb(1, 0))
  keep_d = np.where(same_sign, (mag > nb(-1, -1)) & (mag > nb(1, 1)),
                    (mag > nb(-1, 1)) & (mag > nb(1, -1)))
  peak = np.where(horizontal, keep_h, np.where(vertical, keep_v, keep_d))
  cand = peak & (mag > low)
  seeds = cand & (mag > high)

  labels, n = ndimage.label(cand, structure=np.ones((3, 3), bool))
  keep = np.zeros(n + 1, bool)
  keep[labels[seeds]] = True
  keep[0] = False
  return keep[labels]
