"""TAPVid-3D annotation files (``google-deepmind/tapnet``, ``tapnet/tapvid3d/README.md``).

One ``.npz`` per video, as the official generation scripts write them:

* ``images_jpeg_bytes`` ``(T,)``: each frame as JPEG bytes (a NumPy bytes array; an object
  array would need unpickling and is refused);
* ``intrinsics`` ``(4,)``: ``(fx, fy, cx, cy)`` in pixels;
* ``tracks_XYZ`` ``(T, N, 3)``: the 3D point trajectories in the camera frame of each frame, in
  metres;
* ``visibility`` ``(T, N)``: whether each point is visible in each frame;
* ``queries_xyt`` ``(N, 3)``: the query of each track, pixel ``(x, y)`` in frame ``t``.

:func:`read_tapvid3d` returns a scene dict in geojax's layout for ``evaluate.py``'s ``track``
metrics: ``images`` ``(T, H, W, 3)`` uint8, ``tracks`` ``(T, N, 3)`` (the camera-frame
trajectories; ``extrinsics`` are identities, so "world" and camera frames coincide frame by
frame), ``track_visible`` ``(T, N)``, ``track_queries`` ``(N, 3)`` ``(t, u, v)`` and
``intrinsics`` ``(T, 3, 3)``. There is no dense depth. :func:`write_tapvid3d` writes the same
layout (to convert other data or make test files).
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib

import numpy as np
from PIL import Image

KEYS = ("images_jpeg_bytes", "intrinsics", "tracks_XYZ", "visibility", "queries_xyt")


def read_tapvid3d(path: str) -> dict:
  """The scene of one TAPVid-3D ``.npz`` (module docstring); errors name the file and key."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such TAPVid-3D file")
  try:
    f = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
  try:
    return _read(path, f)
  except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # a truncated member
    raise ValueError(f"{path}: damaged .npz file ({type(e).__name__}: {e})") from None


def _read(path: str, f) -> dict:
  with f:
    missing = [k for k in KEYS if k not in f.files]
    if missing:
      raise ValueError(f"{path}: a TAPVid-3D file holds {', '.join(KEYS)}; missing "
                       f"{', '.join(missing)} (has {', '.join(sorted(f.files))})")
    try:
      jpegs = f["images_jpeg_bytes"]
    except ValueError:
      raise ValueError(f"{path}: images_jpeg_bytes is an object array; geojax reads only "
                       "plain bytes arrays (no pickles)") from None
    intr = np.asarray(f["intrinsics"], np.float64).reshape(-1)
    tracks = np.asarray(f["tracks_XYZ"], np.float64)
    vis = np.asarray(f["visibility"]).astype(bool)
    qxyt = np.asarray(f["queries_xyt"], np.float64)
  t = len(jpegs)
  if intr.shape != (4,):
    raise ValueError(f"{path}: intrinsics must be (fx, fy, cx, cy); got shape {intr.shape}")
  if tracks.ndim != 3 or tracks.shape[0] != t or tracks.shape[2] != 3:
    raise ValueError(f"{path}: tracks_XYZ must be ({t}, N, 3) for {t} frames; got "
                     f"{tracks.shape}")
  n = tracks.shape[1]
  if vis.shape != (t, n):
    raise ValueError(f"{path}: visibility must be ({t}, {n}); got {vis.shape}")
  if qxyt.shape != (n, 3):
    raise ValueError(f"{path}: queries_xyt must be ({n}, 3) (x, y, t); got {qxyt.shape}")
  if not (np.isfinite(tracks[vis]).all() and np.isfinite(qxyt).all() and np.isfinite(intr).all()):
    raise ValueError(f"{path}: non-finite tracks, queries or intrinsics")
  frames = []
  for i, b in enumerate(jpegs):
    try:
      frames.append(np.asarray(Image.open(io.BytesIO(bytes(b))).convert("RGB")))
    except Exception as e:  # PIL raises several types for bad data
      raise ValueError(f"{path}: frame {i} of images_jpeg_bytes is not a readable image "
                       f"({type(e).__name__})") from None
  if len({im.shape for im in frames}) != 1:
    raise ValueError(f"{path}: frames of different sizes")
  images = np.stack(frames)
  h, w = images.shape[1:3]
  qt = qxyt[:, 2]
  if (qt < 0).any() or (qt > t - 1).any():
    raise ValueError(f"{path}: queries_xyt asks for frames outside 0 .. {t - 1}")
  k = np.array([[intr[0], 0, intr[2]], [0, intr[1], intr[3]], [0, 0, 1]])
  return {"images": images, "tracks": np.where(vis[..., None], tracks, 0).astype(np.float32),
          "track_visible": vis, "track_queries": np.stack([qt, qxyt[:, 0], qxyt[:, 1]], -1).astype(np.float32),
          "intrinsics": np.broadcast_to(k, (t, 3, 3)).astype(np.float32),
          "extrinsics": np.broadcast_to(np.eye(4), (t, 4, 4)).astype(np.float32),
          "image_hw": (h, w)}


def write_tapvid3d(path: str, images: np.ndarray, tracks: np.ndarray, visibility: np.ndarray,
                   queries_xyt: np.ndarray, intrinsics, *, quality: int = 95,
                   overwrite: bool = False) -> None:
  """Write one video in the official layout (JPEG frames at ``quality``)."""
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  blobs = []
  for im in np.asarray(images, np.uint8):
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="JPEG", quality=int(quality))
    blobs.append(buf.getvalue())
  tmp = path + ".tmp.npz"
  np.savez(tmp, images_jpeg_bytes=np.array(blobs, dtype=bytes),
           intrinsics=np.asarray(intrinsics, np.float32).reshape(4),
           tracks_XYZ=np.asarray(tracks, np.float32), visibility=np.asarray(visibility, bool),
           queries_xyt=np.asarray(queries_xyt, np.float32))
  os.replace(tmp, path)
