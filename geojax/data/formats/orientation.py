"""EXIF orientation: turning a stored image upright, and its camera and per-pixel maps with it.

Phones store a portrait photo as landscape pixels plus an EXIF ``Orientation`` tag (1-8) saying
how to turn it for display. geojax applies the tag when it reads an image (see
:func:`geojax.data.formats.scene_folder.load_rgb`), so a model sees what the user sees.

Tags 2-8 are the seven flips and quarter turns of the pixel grid (the same operations as Pillow's
``ImageOps.exif_transpose``). :func:`apply` performs one on any ``(H, W, ...)`` array, so depth,
masks and normals stored on the same grid turn exactly like the image. :func:`pixel_map` is the
matching map of pixel coordinates (geojax's convention: integer coordinates are pixel centres),
and :func:`camera` carries a pinhole camera calibrated on the stored grid over to the upright
grid: the new camera frame is the old one turned about its optical axis, so ``K`` stays upper
triangular with positive focal lengths and ``x_cam' = Q x_cam``. Mirroring tags (2, 4, 5, 7)
have no proper rotation ``Q``; a camera cannot follow them (:func:`camera` refuses).
"""

from __future__ import annotations

import numpy as np

MIRRORED = (2, 4, 5, 7)
TRANSPOSED = (5, 6, 7, 8)  # tags that swap width and height
EXIF_ORIENTATION_TAG = 0x0112


def read_tag(image) -> int:
  """The EXIF orientation (1-8) of an open PIL image; 1 when absent or not a valid value."""
  try:
    o = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
  except Exception:  # a malformed EXIF block: treat as no orientation, like viewers do
    return 1
  try:
    o = int(o)
  except (TypeError, ValueError):
    return 1
  return o if 1 <= o <= 8 else 1


def upright_size(hw: tuple[int, int], orientation: int) -> tuple[int, int]:
  """``(H, W)`` of the upright image for a stored ``(H, W)``."""
  h, w = hw
  return (w, h) if orientation in TRANSPOSED else (h, w)


def apply(a: np.ndarray, orientation: int) -> np.ndarray:
  """The stored ``(H, W, ...)`` array ``a`` turned upright for EXIF tag ``orientation``."""
  a = np.asarray(a)
  o = int(orientation)
  if o == 1:
    return a
  if o == 2:
    out = a[:, ::-1]
  elif o == 3:
    out = a[::-1, ::-1]
  elif o == 4:
    out = a[::-1]
  elif o == 5:
    out = a.swapaxes(0, 1)
  elif o == 6:  # turn clockwise a quarter
    out = a[::-1].swapaxes(0, 1)
  elif o == 7:
    out = a[::-1, ::-1].swapaxes(0, 1)
  elif o == 8:  # turn counter-clockwise a quarter
    out = a[:, ::-1].swapaxes(0, 1)
  else:
    raise ValueError(f"EXIF orientation must be 1-8; got {orientation}")
  return np.ascontiguousarray(out)


def pixel_map(orientation: int, hw: tuple[int, int]) -> np.ndarray:
  """3x3 ``M`` with ``(u', v', 1) = M (u, v, 1)``: stored pixel centre -> upright pixel centre."""
  h, w = hw
  a = {1: ((1, 0, 0), (0, 1, 0)),
       2: ((-1, 0, w - 1), (0, 1, 0)),
       3: ((-1, 0, w - 1), (0, -1, h - 1)),
       4: ((1, 0, 0), (0, -1, h - 1)),
       5: ((0, 1, 0), (1, 0, 0)),
       6: ((0, -1, h - 1), (1, 0, 0)),
       7: ((0, -1, h - 1), (-1, 0, w - 1)),
       8: ((0, 1, 0), (-1, 0, w - 1))}
  if orientation not in a:
    raise ValueError(f"EXIF orientation must be 1-8; got {orientation}")
  return np.array(a[orientation] + ((0, 0, 1),), np.float64)


def frame_rotation(orientation: int) -> np.ndarray:
  """3x3 ``Q`` taking stored-camera coordinates to upright-camera coordinates (a turn about z)."""
  m = pixel_map(orientation, (1, 1))
  q = np.eye(3)
  q[:2, :2] = m[:2, :2]
  return q


def camera(intrinsics: np.ndarray, extrinsics: np.ndarray, orientation: int,
           hw: tuple[int, int], where: str = "camera") -> tuple[np.ndarray, np.ndarray]:
  """``(K', w2c')`` of the upright image for a camera calibrated on the stored ``hw`` grid.

  ``K' = M K Q^T`` and ``w2c' = Q w2c`` with ``M`` from :func:`pixel_map` and ``Q`` from
  :func:`frame_rotation`: every world point projects to the upright pixel that holds it.

  Raises:
    ValueError naming ``where`` for a mirroring tag (2, 4, 5, 7).
  """
  if orientation in MIRRORED:
    raise ValueError(f"{where}: EXIF orientation {orientation} mirrors the image, and a camera "
                     "cannot be mirrored with it; store the image upright or read it without "
                     "EXIF (--ignore-exif / data.exif=False)")
  k = np.asarray(intrinsics, np.float64)
  e = np.asarray(extrinsics, np.float64)
  if orientation == 1:
    return k.copy(), e.copy()
  m, q = pixel_map(orientation, hw), frame_rotation(orientation)
  k2 = m @ k @ q.T
  e2 = e.copy()
  e2[:3] = q @ e[:3]
  return k2, e2
