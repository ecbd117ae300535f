"""The geojax *scene folder*: one multi-view scene as plain files on disk.

Layout (``<stem>`` is the image file name without its extension; every view shares it)::

  scene/
    cameras.json          # required, see below
    images/<stem>.png     # required, RGB (PNG or JPEG; grey, 16-bit grey, RGBA, palette and CMYK
                          #   images become RGB; EXIF orientation applied, see below)
    depth/<stem>.npy      # optional, float32 (H, W) z-depth in metres, lossless
    depth/<stem>.png      #   or 16-bit PNG in millimetres (see "Depth precision")
    normals/<stem>.npy    # optional, float32 (H, W, 3) unit normals in camera coordinates
    masks/<stem>.png      # optional, 8-bit (H, W), non-zero = pixel is valid

``cameras.json`` is ``{"format": "geojax-scene", "version": 1, "frames": [...]}`` with one entry
per view, in view order::

  {"name": "000000.png", "width": W, "height": H, "fx": ..., "fy": ..., "cx": ..., "cy": ...,
   "extrinsics": [[r00, r01, r02, t0], [...], [...], [0, 0, 0, 1]]}

``name`` is the file name inside ``images/``; ``extrinsics`` is the world-to-camera matrix
(``x_cam = R x_world + t``), row-major, OpenCV camera axes (x right, y down, z forward).
Intrinsics are in pixels with geojax's pixel convention: pixel ``(u, v)`` at integer coordinates
is the *centre* of column ``u``, row ``v`` (so ``cx = (W - 1) / 2`` is the exact image centre).

Depth is z-depth (distance along the optical axis), 0 marks an invalid pixel in both encodings.

Depth precision: ``.npy`` stores the float32 values bit-exactly. ``png16`` stores
``round(depth * 1000)`` as uint16 millimetres: reading it back is exact to 0.5 mm (we test 1 mm),
positive depths below 0.5 mm are stored as 1 mm (so they stay valid), and the range ends at
65.535 m -- :func:`write_scene` refuses larger finite depths rather than clipping them silently.

EXIF orientation: images are read upright (their EXIF ``Orientation`` tag applied, as photo
viewers do; ``exif=False`` reads the stored pixels). ``width`` / ``height`` in ``cameras.json``
say which grid a camera was calibrated on: the stored pixels (what COLMAP and most tools see;
also the reading for a 180-degree tag, which keeps the size), in which case the camera, the
view's depth, mask and normals are turned with the image (see
:mod:`geojax.data.formats.orientation`), or the upright image, in which case they are used as
they are. Mirroring tags cannot carry a camera and are refused when cameras are given.

Normals are stored as ``.npy`` float32 (lossless; a 16-bit PNG encoding would quantise them).
Masks hold the ``valid`` array; on read, ``valid`` is ``mask & (depth > 0)`` when both exist.

Reading returns the same keys, shapes and dtypes as :func:`geojax.data.synthetic.render_scene`
(``images`` (S, H, W, 3) uint8, ``depth`` (S, H, W) float32, ``valid`` (S, H, W) bool,
``normals`` (S, H, W, 3) float32, ``intrinsics`` (S, 3, 3) float32, ``extrinsics``
(S, 4, 4) float32) plus ``names`` (list of S image file names). All views of a scene must have
the same size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from geojax.data.formats import orientation

CAMERAS_FILE = "cameras.json"
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
PNG16_MAX_M = 65.535  # largest depth a 16-bit millimetre PNG can hold


class MissingFileError(FileNotFoundError, ValueError):
  """A file a scene needs is absent; catchable as ``FileNotFoundError`` or ``ValueError``."""


# ------------------------------------------------------------------------------------------------
# Single-file helpers (shared with the COLMAP and video readers).


def read_rgb(path: str | os.PathLike, *, exif: bool = True) -> tuple[np.ndarray, int]:
  """The stored pixels of an image file as ``(H, W, 3)`` uint8 RGB, and its EXIF orientation.

  The orientation is 1 when ``exif`` is False or the file has no tag; the pixels are *not* turned
  (:func:`load_rgb` does that). Grey, grey+alpha, palette, RGBA, CMYK and YCbCr images become
  RGB (alpha is dropped); 16-bit grey images are scaled to 8 bits (``v / 257``, rounded).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise MissingFileError(f"{path}: image file not found")
  try:
    with Image.open(path) as im:
      im.load()
      o = orientation.read_tag(im) if exif else 1
      if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        g = np.asarray(im).astype(np.int64)
        if g.size and (g.min() < 0 or g.max() > 65535):
          raise ValueError(f"{path}: 32-bit integer image with values outside 0-65535 is not a "
                           "photo (a depth map?); expected an 8- or 16-bit image")
        g = ((g * 255 + 32767) // 65535).astype(np.uint8)
        arr = np.repeat(g[..., None], 3, axis=-1)
      elif im.mode == "F":
        raise ValueError(f"{path}: floating-point image (PIL mode F) is not a photo (a depth "
                         "map?); expected an 8- or 16-bit image")
      else:
        arr = np.asarray(im.convert("RGB"))
  except ValueError:
    raise
  except (OSError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f"{path}: cannot decode image (corrupt or unsupported): {e}") from e
  if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
    raise ValueError(f"{path}: decoded to an empty image {arr.shape}")
  return np.ascontiguousarray(arr, dtype=np.uint8), o


def load_rgb(path: str | os.PathLike, *, exif: bool = True) -> np.ndarray:
  """Decode an image file to ``(H, W, 3)`` uint8 RGB, turned upright by its EXIF orientation
  (``exif=False``: the stored pixels, as the official DA3 input processor reads them); errors
  name the file and the problem. Modes: see :func:`read_rgb`."""
  arr, o = read_rgb(path, exif=exif)
  return orientation.apply(arr, o)


def orient_view(arr: np.ndarray, o: int, cam_hw: tuple[int, int], k: np.ndarray, w2c: np.ndarray,
                where: str) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
  """An image read with EXIF tag ``o`` whose camera was calibrated for a ``cam_hw`` image.

  Returns ``(upright image, aux orientation, K, w2c)``. A camera whose size is that of the stored
  pixels (the COLMAP convention, and the only reading of a 180-degree tag) is turned with the
  image, and so are the view's depth, mask and normal files (``aux orientation`` is ``o``); a
  camera whose size is that of the upright image is already upright (``aux orientation`` 1).
  Sizes matching neither raise ``ValueError`` naming ``where``.
  """
  stored = tuple(arr.shape[:2])
  up = orientation.upright_size(stored, o)
  if o == 1 or (tuple(cam_hw) == up and tuple(cam_hw) != stored):
    if tuple(cam_hw) != up:
      raise ValueError(f"{where}: image is {up[1]}x{up[0]} (WxH) but its camera says "
                       f"{cam_hw[1]}x{cam_hw[0]}")
    return orientation.apply(arr, o), 1, k, w2c
  if tuple(cam_hw) != stored:
    raise ValueError(f"{where}: image is {up[1]}x{up[0]} (WxH) upright, {stored[1]}x{stored[0]} "
                     f"stored (EXIF orientation {o}), but its camera says "
                     f"{cam_hw[1]}x{cam_hw[0]}")
  k2, e2 = orientation.camera(k, w2c, o, stored, where=where)
  return orientation.apply(arr, o), o, k2, e2


def _load_gray(path: str, what: str) -> np.ndarray:
  """Decode a single-channel PNG (8 or 16 bit) to its integer array."""
  try:
    with Image.open(path) as im:
      im.load()
      arr = np.asarray(im)
  except (OSError, SyntaxError) as e:
    raise ValueError(f"{path}: cannot decode {what} PNG (corrupt or unsupported): {e}") from e
  if arr.ndim != 2:
    raise ValueError(f"{path}: {what} PNG must be single-channel, got shape {arr.shape}")
  return arr


def _load_npy(path: str, what: str) -> np.ndarray:
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f"{path}: cannot read {what} .npy (corrupt or unsupported): {e}") from e


def _check_hw(path: str, what: str, arr: np.ndarray, hw: tuple[int, int]) -> None:
  if tuple(arr.shape[:2]) != tuple(hw):
    raise ValueError(f"{path}: {what} has size {arr.shape[1]}x{arr.shape[0]} (WxH) but the image "
                     f"is {hw[1]}x{hw[0]}")


def _find(folder: str, stem: str, exts: Sequence[str]) -> str | None:
  for ext in exts:
    p = os.path.join(folder, stem + ext)
    if os.path.isfile(p):
      return p
  return None


def encode_depth_png16(depth: np.ndarray, where: str = "depth") -> np.ndarray:
  """Metres (H, W) float -> uint16 millimetres; 0 (or non-finite) = invalid; > 65.535 m raises."""
  d = np.asarray(depth, np.float64)
  ok = np.isfinite(d) & (d > 0)
  if np.any(d[ok] > PNG16_MAX_M + 0.0005):
    raise ValueError(f"{where}: max depth {d[ok].max():.3f} m exceeds the 65.535 m range of "
                     "16-bit millimetre PNG; use depth_format='npy'")
  mm = np.where(ok, np.maximum(np.round(d * 1000.0), 1.0), 0.0)
  return mm.astype(np.uint16)


def decode_depth_png16(mm: np.ndarray) -> np.ndarray:
  """uint16 millimetres -> float32 metres (0 stays 0 = invalid)."""
  return (np.asarray(mm).astype(np.float64) / 1000.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# cameras.json


def _parse_frame(frame: Any, idx: int, path: str) -> tuple[str, int, int, np.ndarray, np.ndarray]:
  where = f"{path}: frames[{idx}]"
  if not isinstance(frame, dict):
    raise ValueError(f"{where}: expected an object, got {type(frame).__name__}")
  missing = [k for k in ("name", "width", "height", "fx", "fy", "cx", "cy", "extrinsics")
             if k not in frame]
  if missing:
    raise ValueError(f"{where}: missing entries {missing}")
  name = frame["name"]
  if not isinstance(name, str) or not name or os.path.basename(name) != name:
    raise ValueError(f"{where}: 'name' must be a plain file name inside images/, got {name!r}")
  where = f"{path}: frame {name!r}"
  try:
    w, h = int(frame["width"]), int(frame["height"])
    vals = [float(frame[k]) for k in ("fx", "fy", "cx", "cy")]
    ext = np.asarray(frame["extrinsics"], np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: malformed camera values: {e}") from e
  if w < 1 or h < 1:
    raise ValueError(f"{where}: width/height must be positive, got {w}x{h}")
  if ext.shape == (3, 4):
    ext = np.concatenate([ext, [[0.0, 0.0, 0.0, 1.0]]], 0)
  if ext.shape != (4, 4):
    raise ValueError(f"{where}: extrinsics must be 4x4 (or 3x4), got shape {ext.shape}")
  if not all(math.isfinite(v) for v in vals) or not np.all(np.isfinite(ext)):
    raise ValueError(f"{where}: non-finite camera values (fx, fy, cx, cy = {vals}; extrinsics "
                     f"finite: {bool(np.all(np.isfinite(ext)))})")
  if vals[0] <= 0 or vals[1] <= 0:
    raise ValueError(f"{where}: focal lengths must be positive, got fx={vals[0]}, fy={vals[1]}")
  k = np.array([[vals[0], 0, vals[2]], [0, vals[1], vals[3]], [0, 0, 1]], np.float64)
  return name, h, w, k, ext


def read_cameras_json(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Parse and validate ``cameras.json``: list of ``{name, height, width, K (3,3), w2c (4,4)}``."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise MissingFileError(f"{path}: cameras file not found")
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot parse JSON: {e}") from e
  frames = data.get("frames") if isinstance(data, dict) else None
  if not isinstance(frames, list) or not frames:
    raise ValueError(f"{path}: expected a non-empty 'frames' list")
  out, seen = [], set()
  for i, fr in enumerate(frames):
    name, h, w, k, ext = _parse_frame(fr, i, path)
    if name in seen:
      raise ValueError(f"{path}: image {name!r} is listed twice")
    seen.add(name)
    out.append({"name": name, "height": h, "width": w, "K": k, "w2c": ext})
  return out


# ------------------------------------------------------------------------------------------------
# Reading and writing whole scenes.


def _on_grid(path: str, what: str, arr: np.ndarray, frame: dict, turn: int) -> np.ndarray:
  """A per-pixel map on its view's camera grid, turned upright with the view's image."""
  _check_hw(path, what, arr, (frame["height"], frame["width"]))
  return orientation.apply(arr, turn)


def read_scene(path: str | os.PathLike, *, load_depth: bool = True, load_normals: bool = True,
               load_masks: bool = True, require_depth: bool = False,
               exif: bool = True) -> dict[str, Any]:
  """Read a scene folder into a dict shaped like :func:`~geojax.data.synthetic.render_scene`.

  Args:
    path: the scene folder (holding ``cameras.json`` and ``images/``).
    load_depth: read ``depth/`` when present (per view, ``.npy`` wins over ``.png``).
    load_normals: read ``normals/`` when present.
    load_masks: read ``masks/`` when present (folded into ``valid``).
    require_depth: raise if some view has no depth file (otherwise depth is returned only when
      every view has one; a partial set raises, because the stack would be ragged).
    exif: turn images upright by their EXIF orientation (see "EXIF orientation" in the module
      docstring); False reads the stored pixels.

  Returns:
    ``names`` (list of S str), ``images`` (S, H, W, 3) uint8, ``intrinsics`` (S, 3, 3) float32,
    ``extrinsics`` (S, 4, 4) float32 world-to-camera; when available ``depth`` (S, H, W) float32
    metres (0 = invalid), ``valid`` (S, H, W) bool, ``normals`` (S, H, W, 3) float32.

  Raises:
    MissingFileError (a ``FileNotFoundError`` and a ``ValueError``) for a missing folder,
    ``cameras.json`` or image; ``ValueError`` for corrupt files, sizes that disagree with
    ``cameras.json``, non-finite or malformed camera values. Messages name the file.
  """
  root = os.fspath(path)
  if not os.path.isdir(root):
    raise MissingFileError(f"{root}: scene folder not found")
  frames = read_cameras_json(os.path.join(root, CAMERAS_FILE))
  img_dir = os.path.join(root, "images")
  images, hw0, turns = [], None, []
  for fr in frames:
    p = os.path.join(img_dir, fr["name"])
    img, o = read_rgb(p, exif=exif)
    img, turn, fr["K"], fr["w2c"] = orient_view(img, o, (fr["height"], fr["width"]), fr["K"],
                                                fr["w2c"], f"{p} (cameras.json)")
    turns.append(turn)
    hw = img.shape[:2]
    if hw0 is None:
      hw0 = hw
    elif hw != hw0:
      raise ValueError(f"{p}: image size {hw[1]}x{hw[0]} differs from the first view's "
                       f"{hw0[1]}x{hw0[0]}; all views of a scene must share one size")
    images.append(img)
  out: dict[str, Any] = {
      "names": [fr["name"] for fr in frames],
      "images": np.stack(images),
      "intrinsics": np.stack([fr["K"] for fr in frames]).astype(np.float32),
      "extrinsics": np.stack([fr["w2c"] for fr in frames]).astype(np.float32),
  }
  stems = [os.path.splitext(fr["name"])[0] for fr in frames]

  depth = None
  if load_depth or require_depth:
    d_dir = os.path.join(root, "depth")
    files = [_find(d_dir, s, (".npy", ".png")) for s in stems]
    have = [f is not None for f in files]
    if any(have) or require_depth:
      if not all(have):
        miss = os.path.join(d_dir, stems[have.index(False)] + ".npy|.png")
        raise MissingFileError(f"{miss}: depth file not found ({sum(have)} of {len(have)} views "
                               "have depth)")
      maps = []
      for i, f in enumerate(files):
        if f.endswith(".npy"):
          d = _load_npy(f, "depth")
          if d.ndim == 3 and d.shape[-1] == 1:
            d = d[..., 0]
          if d.ndim != 2 or not np.issubdtype(d.dtype, np.floating):
            raise ValueError(f"{f}: depth must be a float (H, W) array, got {d.dtype} {d.shape}")
          d = d.astype(np.float32)
        else:
          d = _load_gray(f, "depth")
          if d.dtype not in (np.uint16, np.int32):
            raise ValueError(f"{f}: depth PNG must be 16-bit, got {d.dtype}")
          d = decode_depth_png16(d)
        d = _on_grid(f, "depth map", d, frames[i], turns[i])
        if not np.all(np.isfinite(d)):
          d = np.where(np.isfinite(d), d, 0).astype(np.float32)
        maps.append(d)
      depth = np.stack(maps)
      out["depth"] = depth

  mask = None
  if load_masks:
    m_dir = os.path.join(root, "masks")
    files = [_find(m_dir, s, (".png",)) for s in stems]
    if any(f is not None for f in files):
      ms = []
      for i, (s, f) in enumerate(zip(stems, files)):
        if f is None:
          raise MissingFileError(f"{os.path.join(m_dir, s + '.png')}: mask file not found")
        m = _on_grid(f, "mask", _load_gray(f, "mask"), frames[i], turns[i])
        ms.append(m != 0)
      mask = np.stack(ms)
  if depth is not None:
    out["valid"] = (depth > 0) if mask is None else (mask & (depth > 0))
  elif mask is not None:
    out["valid"] = mask

  if load_normals:
    n_dir = os.path.join(root, "normals")
    files = [_find(n_dir, s, (".npy",)) for s in stems]
    if any(f is not None for f in files):
      ns = []
      for i, (s, f) in enumerate(zip(stems, files)):
        if f is None:
          raise MissingFileError(f"{os.path.join(n_dir, s + '.npy')}: normals file not found")
        n = _load_npy(f, "normals")
        if n.ndim != 3 or n.shape[-1] != 3:
          raise ValueError(f"{f}: normals must be (H, W, 3), got shape {n.shape}")
        n = _on_grid(f, "normal map", n, frames[i], turns[i])
        if turns[i] != 1:  # camera-frame vectors turn with the camera
          n = n @ orientation.frame_rotation(turns[i]).T
        ns.append(n.astype(np.float32))
      out["normals"] = np.stack(ns)
  return out


def _default_names(n: int, ext: str) -> list[str]:
  return [f"{i:06d}{ext}" for i in range(n)]


def write_scene(scene: dict[str, Any], path: str | os.PathLike, *, depth_format: str = "npy",
                image_format: str = "png", names: Sequence[str] | None = None,
                overwrite: bool = False) -> str:
  """Write a scene dict (the :func:`read_scene` / ``render_scene`` layout) as a scene folder.

  The folder is built in a temporary sibling directory and renamed into place, so readers never
  see a half-written scene. An existing ``path`` is refused unless ``overwrite=True`` (then it is
  replaced as a whole).

  Args:
    scene: needs ``images`` (S, H, W, 3) uint8, ``intrinsics`` (S, 3, 3), ``extrinsics``
      (S, 4, 4) or (S, 3, 4) world-to-camera; optional ``depth`` (S, H, W) metres, ``valid``
      (S, H, W) bool (written to ``masks/``), ``normals`` (S, H, W, 3), ``names``.
    path: the scene folder to create.
    depth_format: ``"npy"`` (float32 metres, lossless) or ``"png16"`` (uint16 millimetres).
    image_format: ``"png"`` (lossless) or ``"jpg"`` (quality 95).
    names: image file names (default: ``scene["names"]`` or ``000000.<ext>``, ...).
    overwrite: replace an existing ``path``.

  Returns:
    the path written.
  """
  if depth_format not in ("npy", "png16"):
    raise ValueError(f"depth_format must be 'npy' or 'png16', got {depth_format!r}")
  if image_format not in ("png", "jpg", "jpeg"):
    raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
  dst = os.path.abspath(os.fspath(path))
  if os.path.lexists(dst) and not overwrite:
    raise FileExistsError(f"{dst}: already exists; pass overwrite=True to replace it")
  images = np.asarray(scene["images"])
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"scene['images'] must be (S, H, W, 3) uint8, got {images.dtype} "
                     f"{images.shape}")
  s, h, w = images.shape[:3]
  ks = np.asarray(scene["intrinsics"], np.float64)
  ext = np.asarray(scene["extrinsics"], np.float64)
  if ks.shape != (s, 3, 3) or ext.shape not in ((s, 4, 4), (s, 3, 4)):
    raise ValueError(f"intrinsics must be ({s}, 3, 3) and extrinsics ({s}, 4, 4); got "
                     f"{ks.shape} and {ext.shape}")
  if not (np.all(np.isfinite(ks)) and np.all(np.isfinite(ext))):
    bad = np.nonzero(~np.isfinite(ks).all((1, 2)) | ~np.isfinite(ext).all((1, 2)))[0].tolist()
    raise ValueError(f"write_scene({dst}): non-finite camera values in views {bad}")
  ext_ext = "jpg" if image_format in ("jpg", "jpeg") else "png"
  if names is None:
    names = scene.get("names") or _default_names(s, "." + ext_ext)
  names = list(names)
  if len(names) != s or len(set(os.path.splitext(n)[0] for n in names)) != s:
    raise ValueError(f"need {s} image names with distinct stems, got {names}")

  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
  try:
    for sub in ("images",) + (("depth",) if "depth" in scene else ()) + \
        (("masks",) if "valid" in scene else ()) + (("normals",) if "normals" in scene else ()):
      os.mkdir(os.path.join(tmp, sub))
    frames = []
    for i, name in enumerate(names):
      stem, ext_i = os.path.splitext(name)
      fmt = "JPEG" if ext_i.lower() in (".jpg", ".jpeg") else "PNG"
      kw = {"quality": 95} if fmt == "JPEG" else {}
      Image.fromarray(images[i]).save(os.path.join(tmp, "images", name), format=fmt, **kw)
      k = ks[i]
      frames.append({"name": name, "width": int(w), "height": int(h), "fx": float(k[0, 0]),
                     "fy": float(k[1, 1]), "cx": float(k[0, 2]), "cy": float(k[1, 2]),
                     "extrinsics": [[float(x) for x in row] for row in
                                    (ext[i] if ext.shape[1] == 4 else
                                     np.concatenate([ext[i], [[0, 0, 0, 1]]], 0))]})
      if "depth" in scene:
        d = np.asarray(scene["depth"][i])
        if d.shape != (h, w):
          raise ValueError(f"scene['depth'][{i}] has shape {d.shape}, expected {(h, w)}")
        if depth_format == "npy":
          np.save(os.path.join(tmp, "depth", stem + ".npy"), d.astype(np.float32))
        else:
          mm = encode_depth_png16(d, where=f"scene['depth'][{i}] ({name})")
          Image.fromarray(mm).save(os.path.join(tmp, "depth", stem + ".png"), format="PNG")
      if "valid" in scene:
        m = np.asarray(scene["valid"][i]).astype(bool)
        Image.fromarray(m.astype(np.uint8) * 255).save(os.path.join(tmp, "masks", stem + ".png"),
                                                       format="PNG")
      if "normals" in scene:
        np.save(os.path.join(tmp, "normals", stem + ".npy"),
                np.asarray(scene["normals"][i], np.float32))
    with open(os.path.join(tmp, CAMERAS_FILE), "w", encoding="utf-8") as f:
      json.dump({"format": "geojax-scene", "version": 1, "frames": frames}, f, indent=1)
    os.chmod(tmp, 0o755)  # mkdtemp creates 0700
    if os.path.lexists(dst):
      trash = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
      old = os.path.join(trash, "old")
      os.rename(dst, old)
      os.rename(tmp, dst)
      shutil.rmtree(trash, ignore_errors=True)
    else:
      os.rename(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return dst


# ------------------------------------------------------------------------------------------------
# Grain random-access source.


class SceneFolderSource:
  """Random-access source over a root directory holding many scene folders (Grain-compatible).

  Scene folders are the immediate sub-directories of ``root`` that contain ``cameras.json``,
  sorted by name. ``source[i]`` returns :func:`read_scene` of the ``i``-th folder (with
  ``names`` plus a ``scene`` key holding the folder name).

  ``on_error="raise"`` propagates read errors. ``on_error="skip"`` logs the error (absl
  ``logging.warning``), increments :attr:`skipped`, remembers the folder as bad and returns the
  next readable scene instead (wrapping around), so the source keeps its length and stays
  deterministic. If no scene is readable it raises. ``skipped`` counts in the current process
  only (Grain worker processes each keep their own count).
  """

  def __init__(self, root: str | os.PathLike, *, on_error: str = "raise", load_depth: bool = True,
               load_normals: bool = True, load_masks: bool = True, exif: bool = True):
    if on_error not in ("raise", "skip"):
      raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    self.root = os.fspath(root)
    if not os.path.isdir(self.root):
      raise MissingFileError(f"{self.root}: scene root folder not found")
    self.scenes = sorted(d for d in os.listdir(self.root)
                         if os.path.isfile(os.path.join(self.root, d, CAMERAS_FILE)))
    if not self.scenes:
      raise ValueError(f"{self.root}: no scene folders (sub-directories with {CAMERAS_FILE})")
    self.on_error = on_error
    self.skipped = 0
    self._bad: set[int] = set()
    self._kw = dict(load_depth=load_depth, load_normals=load_normals, load_masks=load_masks,
                    exif=bool(exif))

  def __len__(self) -> int:
    return len(self.scenes)

  def __repr__(self) -> str:
    return f"SceneFolderSource({self.root!r}, scenes={len(self)}, on_error={self.on_error!r})"

  def _read(self, i: int) -> dict[str, Any]:
    out = read_scene(os.path.join(self.root, self.scenes[i]), **self._kw)
    out["scene"] = self.scenes[i]
    return out

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self.scenes)
    index = int(index)
    if not -n <= index < n:
      raise IndexError(f"index {index} out of range for {n} scenes")
    index %= n
    if self.on_error == "raise":
      return self._read(index)
    for j in range(n):
      i = (index + j) % n
      if i in self._bad:
        continue
      try:
        return self._read(i)
      except (ValueError, OSError) as e:
        self._bad.add(i)
        self.skipped += 1
        logging.warning("SceneFolderSource: skipping scene %s: %s", self.scenes[i], e)
    raise ValueError(f"{self.root}: no readable scene folders ({len(self._bad)} failed)")
