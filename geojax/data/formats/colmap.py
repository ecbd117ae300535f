"""COLMAP sparse models (``cameras``, ``images``, ``points3D``; ``.txt`` and ``.bin``).

Format facts (COLMAP's documented output of ``colmap model_converter`` / the mapper):

- Text files: ``#`` comment lines, whitespace-separated values. ``cameras.txt``:
  ``CAMERA_ID MODEL WIDTH HEIGHT PARAMS...``. ``images.txt``: two lines per image,
  ``IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME`` then ``X Y POINT3D_ID`` triples (possibly an
  empty line). ``points3D.txt``: ``POINT3D_ID X Y Z R G B ERROR`` then ``IMAGE_ID POINT2D_IDX``
  pairs (the track).
- Binary files, little endian: ``cameras.bin`` = u64 count, then per camera i32 id, i32 model id,
  u64 width, u64 height, f64 params. ``images.bin`` = u64 count, then per image i32 id, f64 qvec
  (wxyz), f64 tvec, i32 camera id, NUL-terminated name, u64 number of 2D points, then
  (f64 x, f64 y, i64 point3D id) per point. ``points3D.bin`` = u64 count, then per point u64 id,
  f64 xyz, u8 rgb, f64 error, u64 track length, then (i32 image id, i32 point2D index) pairs.

Geometry conventions: COLMAP stores world-to-camera poses (``x_cam = R(q) x_world + t``, q
scalar-first ``wxyz``) in OpenCV camera axes, exactly geojax's extrinsics. COLMAP puts the
centre of the top-left pixel at ``(0.5, 0.5)`` whereas geojax puts it at ``(0, 0)``: principal
points and 2D observations are shifted by ``-0.5`` when converted to geojax (see
:func:`camera_to_pinhole`) and by ``+0.5`` the other way (see :func:`pinhole_camera`,
:func:`model_from_scene`). The model dataclasses themselves keep COLMAP's raw values, so
``read_model`` -> ``write_model`` is lossless (text floats are written with Python's shortest
round-trip ``repr``).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from geojax.data.formats.scene_folder import MissingFileError, orient_view, read_rgb

# name -> (model id, parameter names). Fisheye models are not pinholes even without distortion.
CAMERA_MODELS: dict[str, tuple[int, tuple[str, ...]]] = {
    "SIMPLE_PINHOLE": (0, ("f", "cx", "cy")),
    "PINHOLE": (1, ("fx", "fy", "cx", "cy")),
    "SIMPLE_RADIAL": (2, ("f", "cx", "cy", "k")),
    "RADIAL": (3, ("f", "cx", "cy", "k1", "k2")),
    "OPENCV": (4, ("fx", "fy", "cx", "cy", "k1", "k2", "p1", "p2")),
    "OPENCV_FISHEYE": (5, ("fx", "fy", "cx", "cy", "k1", "k2", "k3", "k4")),
    "FULL_OPENCV": (6, ("fx", "fy", "cx", "cy", "k1", "k2", "p1", "p2", "k3", "k4", "k5", "k6")),
    "FOV": (7, ("fx", "fy", "cx", "cy", "omega")),
    "SIMPLE_RADIAL_FISHEYE": (8, ("f", "cx", "cy", "k")),
    "RADIAL_FISHEYE": (9, ("f", "cx", "cy", "k1", "k2")),
    "THIN_PRISM_FISHEYE": (10, ("fx", "fy", "cx", "cy", "k1", "k2", "p1", "p2", "k3", "k4", "sx1",
                                "sy1")),
    "RAD_TAN_THIN_PRISM_FISHEYE": (11, ("fx", "fy", "cx", "cy", "k0", "k1", "k2", "k3", "k4",
                                        "k5", "p0", "p1", "s0", "s1", "s2", "s3")),
}
_MODEL_BY_ID = {v[0]: k for k, v in CAMERA_MODELS.items()}
_FISHEYE = {"OPENCV_FISHEYE", "SIMPLE_RADIAL_FISHEYE", "RADIAL_FISHEYE", "THIN_PRISM_FISHEYE",
            "RAD_TAN_THIN_PRISM_FISHEYE"}
_UNDISTORT_HINT = ("undistort the images first with colmap image_undistorter and read the "
                   "undistorted model")

_P2D = np.dtype([("x", "<f8"), ("y", "<f8"), ("id", "<i8")])
_TRACK = np.dtype([("image_id", "<i4"), ("idx", "<i4")])


@dataclasses.dataclass(eq=False)
class Camera:
  """A COLMAP camera: ``params`` (float64) in COLMAP's order for ``model`` (pixel centre 0.5)."""
  id: int
  model: str
  width: int
  height: int
  params: np.ndarray


@dataclasses.dataclass(eq=False)
class Image:
  """A registered COLMAP image.

  ``qvec`` (4,) float64 scalar-first ``wxyz`` and ``tvec`` (3,) float64 give the world-to-camera
  pose; ``xys`` (N, 2) float64 are 2D keypoints in COLMAP pixels (top-left pixel centre at
  (0.5, 0.5)); ``point3D_ids`` (N,) int64 with -1 for keypoints without a 3D point.
  """
  id: int
  qvec: np.ndarray
  tvec: np.ndarray
  camera_id: int
  name: str
  xys: np.ndarray
  point3D_ids: np.ndarray


@dataclasses.dataclass(eq=False)
class Point3D:
  """A COLMAP 3D point: ``xyz`` (3,) float64 world, ``rgb`` (3,) uint8, reprojection ``error``,
  track ``image_ids`` (L,) int32 and ``point2D_idxs`` (L,) int32 (indices into ``Image.xys``)."""
  id: int
  xyz: np.ndarray
  rgb: np.ndarray
  error: float
  image_ids: np.ndarray
  point2D_idxs: np.ndarray


@dataclasses.dataclass(eq=False)
class Model:
  """A sparse model: dicts keyed by id, in file order."""
  cameras: dict[int, Camera] = dataclasses.field(default_factory=dict)
  images: dict[int, Image] = dataclasses.field(default_factory=dict)
  points3D: dict[int, Point3D] = dataclasses.field(default_factory=dict)


def _num_params(model: str, where: str) -> int:
  if model not in CAMERA_MODELS:
    raise ValueError(f"{where}: unknown COLMAP camera model {model!r}")
  return len(CAMERA_MODELS[model][1])


def _arr_equal(a: np.ndarray, b: np.ndarray) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))


def models_equal(a: Model, b: Model) -> bool:
  """Exact equality of two models (ids, order-insensitive; every value bit-exact)."""
  if a.cameras.keys() != b.cameras.keys() or a.images.keys() != b.images.keys() or \
      a.points3D.keys() != b.points3D.keys():
    return False
  for k, c in a.cameras.items():
    d = b.cameras[k]
    if (c.id, c.model, c.width, c.height) != (d.id, d.model, d.width, d.height) or \
        not _arr_equal(c.params, d.params):
      return False
  for k, i in a.images.items():
    j = b.images[k]
    if (i.id, i.camera_id, i.name) != (j.id, j.camera_id, j.name) or not all(
        _arr_equal(getattr(i, f), getattr(j, f)) for f in ("qvec", "tvec", "xys", "point3D_ids")):
      return False
  for k, p in a.points3D.items():
    q = b.points3D[k]
    if p.id != q.id or not np.array_equal(p.error, q.error) or not all(
        _arr_equal(getattr(p, f), getattr(q, f))
        for f in ("xyz", "rgb", "image_ids", "point2D_idxs")):
      return False
  return True


# ------------------------------------------------------------------------------------------------
# Text format.


def _data_lines(path: str) -> list[tuple[int, str]]:
  """(line number, stripped line) of a text file, comments dropped, empty lines kept."""
  try:
    with open(path, encoding="utf-8") as f:
      return [(n, s.strip()) for n, s in enumerate(f, 1) if not s.lstrip().startswith("#")]
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: cannot read: {e}") from e


def _read_cameras_txt(path: str) -> dict[int, Camera]:
  cams = {}
  for n, line in _data_lines(path):
    if not line:
      continue
    tok = line.split()
    where = f"{path}:{n}"
    try:
      cid, model, w, h = int(tok[0]), tok[1], int(tok[2]), int(tok[3])
      params = np.array([float(x) for x in tok[4:]], np.float64)
    except (IndexError, ValueError) as e:
      raise ValueError(f"{where}: malformed camera line: {e}") from e
    if len(params) != _num_params(model, where):
      raise ValueError(f"{where}: {model} needs {_num_params(model, where)} params, got "
                       f"{len(params)}")
    cams[cid] = Camera(cid, model, w, h, params)
  return cams


def _read_images_txt(path: str) -> dict[int, Image]:
  lines = _data_lines(path)
  images, k = {}, 0
  while k < len(lines):
    n, line = lines[k]
    k += 1
    if not line:
      continue
    where = f"{path}:{n}"
    tok = line.split(maxsplit=9)
    try:
      iid = int(tok[0])
      qvec = np.array([float(x) for x in tok[1:5]], np.float64)
      tvec = np.array([float(x) for x in tok[5:8]], np.float64)
      cid, name = int(tok[8]), tok[9]
    except (IndexError, ValueError) as e:
      raise ValueError(f"{where}: malformed image line: {e}") from e
    pts = lines[k][1].split() if k < len(lines) else []
    k += 1
    if len(pts) % 3:
      raise ValueError(f"{path}:{n + 1}: POINTS2D needs (X, Y, POINT3D_ID) triples, got "
                       f"{len(pts)} values")
    try:
      xys = np.array([float(x) for x in pts[0::3]] + [float(y) for y in pts[1::3]], np.float64)
      xys = xys.reshape(2, -1).T.copy()
      ids = np.array([int(x) for x in pts[2::3]], np.int64)
    except ValueError as e:
      raise ValueError(f"{path}:{n + 1}: malformed POINTS2D: {e}") from e
    images[iid] = Image(iid, qvec, tvec, cid, name, xys, ids)
  return images


def _read_points3d_txt(path: str) -> dict[int, Point3D]:
  pts = {}
  for n, line in _data_lines(path):
    if not line:
      continue
    tok = line.split()
    try:
      pid = int(tok[0])
      xyz = np.array([float(x) for x in tok[1:4]], np.float64)
      rgb = np.array([int(x) for x in tok[4:7]], np.uint8)
      err = float(tok[7])
      track = np.array([int(x) for x in tok[8:]], np.int32)
    except (IndexError, ValueError, OverflowError) as e:
      raise ValueError(f"{path}:{n}: malformed point line: {e}") from e
    if len(xyz) != 3 or len(rgb) != 3 or len(track) % 2:
      raise ValueError(f"{path}:{n}: malformed point line")
    pts[pid] = Point3D(pid, xyz, rgb, err, track[0::2].copy(), track[1::2].copy())
  return pts


def _f(x: float) -> str:
  return repr(float(x))


def _write_text(path: str, header: Sequence[str], rows) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for h in header:
      f.write(f"# {h}\n")
    for r in rows:
      f.write(r + "\n")
  os.replace(tmp, path)


def _write_model_txt(model: Model, path: str) -> None:
  _write_text(os.path.join(path, "cameras.txt"), [
      "Camera list with one line of data per camera:",
      "  CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]",
      f"Number of cameras: {len(model.cameras)}"],
      (" ".join([str(c.id), c.model, str(c.width), str(c.height)] + [_f(p) for p in c.params])
       for c in model.cameras.values()))
  nobs = sum(len(i.xys) for i in model.images.values())
  mean_obs = nobs / max(len(model.images), 1)

  def image_rows():
    for im in model.images.values():
      yield " ".join([str(im.id)] + [_f(x) for x in im.qvec] + [_f(x) for x in im.tvec]
                     + [str(im.camera_id), im.name])
      yield " ".join(f"{_f(x)} {_f(y)} {int(p)}" for (x, y), p in zip(im.xys, im.point3D_ids))
  _write_text(os.path.join(path, "images.txt"), [
      "Image list with two lines of data per image:",
      "  IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
      "  POINTS2D[] as (X, Y, POINT3D_ID)",
      f"Number of images: {len(model.images)}, mean observations per image: {mean_obs}"],
      image_rows())
  tl = sum(len(p.image_ids) for p in model.points3D.values()) / max(len(model.points3D), 1)
  _write_text(os.path.join(path, "points3D.txt"), [
      "3D point list with one line of data per point:",
      "  POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)",
      f"Number of points: {len(model.points3D)}, mean track length: {tl}"],
      (" ".join([str(p.id)] + [_f(x) for x in p.xyz] + [str(int(c)) for c in p.rgb]
                + [_f(p.error)] + [f"{int(a)} {int(b)}" for a, b in
                                   zip(p.image_ids, p.point2D_idxs)])
       for p in model.points3D.values()))


# ------------------------------------------------------------------------------------------------
# Binary format.


class _Reader:
  """Little-endian cursor over a file's bytes; truncation raises a ValueError naming the file."""

  def __init__(self, path: str):
    self.path = path
    try:
      with open(path, "rb") as f:
        self.buf = f.read()
    except OSError as e:
      raise ValueError(f"{path}: cannot read: {e}") from e
    self.pos = 0

  def unpack(self, fmt: str) -> tuple:
    size = struct.calcsize("<" + fmt)
    if self.pos + size > len(self.buf):
      raise ValueError(f"{self.path}: truncated at byte {self.pos} (corrupt binary model)")
    out = struct.unpack_from("<" + fmt, self.buf, self.pos)
    self.pos += size
    return out

  def array(self, dtype: np.dtype, count: int) -> np.ndarray:
    size = dtype.itemsize * count
    if count < 0 or self.pos + size > len(self.buf):
      raise ValueError(f"{self.path}: truncated at byte {self.pos} (corrupt binary model)")
    out = np.frombuffer(self.buf, dtype, count, self.pos).copy()
    self.pos += size
    return out

  def cstring(self) -> str:
    end = self.buf.find(b"\0", self.pos)
    if end < 0:
      raise ValueError(f"{self.path}: unterminated image name at byte {self.pos}")
    s = self.buf[self.pos:end].decode("utf-8")
    self.pos = end + 1
    return s

  def done(self) -> None:
    if self.pos != len(self.buf):
      raise ValueError(f"{self.path}: {len(self.buf) - self.pos} trailing bytes (corrupt model)")


def _read_cameras_bin(path: str) -> dict[int, Camera]:
  r = _Reader(path)
  cams = {}
  for _ in range(r.unpack("Q")[0]):
    cid, mid, w, h = r.unpack("iiQQ")
    if mid not in _MODEL_BY_ID:
      raise ValueError(f"{path}: camera {cid} has unknown model id {mid}")
    model = _MODEL_BY_ID[mid]
    cams[cid] = Camera(cid, model, w, h, r.array(np.dtype("<f8"), len(CAMERA_MODELS[model][1])))
  r.done()
  return cams


def _read_images_bin(path: str) -> dict[int, Image]:
  r = _Reader(path)
  images = {}
  for _ in range(r.unpack("Q")[0]):
    iid, qw, qx, qy, qz, tx, ty, tz, cid = r.unpack("idddddddi")
    name = r.cstring()
    p2d = r.array(_P2D, r.unpack("Q")[0])
    images[iid] = Image(iid, np.array([qw, qx, qy, qz]), np.array([tx, ty, tz]), cid, name,
                        np.stack([p2d["x"], p2d["y"]], -1).astype(np.float64),
                        p2d["id"].astype(np.int64))
  r.done()
  return images


def _read_points3d_bin(path: str) -> dict[int, Point3D]:
  r = _Reader(path)
  pts = {}
  for _ in range(r.unpack("Q")[0]):
    pid, x, y, z, cr, cg, cb, err = r.unpack("QdddBBBd")
    tr = r.array(_TRACK, r.unpack("Q")[0])
    pts[pid] = Point3D(pid, np.array([x, y, z]), np.array([cr, cg, cb], np.uint8), err,
                       tr["image_id"].astype(np.int32), tr["idx"].astype(np.int32))
  r.done()
  return pts


def _write_bin(path: str, chunks) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    for c in chunks:
      f.write(c)
  os.replace(tmp, path)


def _write_model_bin(model: Model, path: str) -> None:
  def cams():
    yield struct.pack("<Q", len(model.cameras))
    for c in model.cameras.values():
      mid, names = CAMERA_MODELS[c.model]
      params = np.asarray(c.params, "<f8")
      if params.shape != (len(names),):
        raise ValueError(f"camera {c.id}: {c.model} needs {len(names)} params, got "
                         f"{params.shape}")
      yield struct.pack("<iiQQ", c.id, mid, c.width, c.height) + params.tobytes()

  def imgs():
    yield struct.pack("<Q", len(model.images))
    for im in model.images.values():
      p2d = np.empty(len(im.xys), _P2D)
      xys = np.asarray(im.xys, np.float64).reshape(-1, 2)
      p2d["x"], p2d["y"], p2d["id"] = xys[:, 0], xys[:, 1], im.point3D_ids
      yield (struct.pack("<i7di", im.id, *map(float, im.qvec), *map(float, im.tvec),
                         im.camera_id) + im.name.encode("utf-8") + b"\0"
             + struct.pack("<Q", len(p2d)) + p2d.tobytes())

  def pts():
    yield struct.pack("<Q", len(model.points3D))
    for p in model.points3D.values():
      tr = np.empty(len(p.image_ids), _TRACK)
      tr["image_id"], tr["idx"] = p.image_ids, p.point2D_idxs
      yield (struct.pack("<Q3d3Bd", p.id, *map(float, p.xyz), *map(int, p.rgb), float(p.error))
             + struct.pack("<Q", len(tr)) + tr.tobytes())

  _write_bin(os.path.join(path, "cameras.bin"), cams())
  _write_bin(os.path.join(path, "images.bin"), imgs())
  _write_bin(os.path.join(path, "points3D.bin"), pts())


# ------------------------------------------------------------------------------------------------
# Public API.

_FILES = ("cameras", "images", "points3D")


def detect_model_format(path: str | os.PathLike) -> str:
  """``".bin"`` or ``".txt"`` for a sparse-model folder (binary wins when both are complete)."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise MissingFileError(f"{path}: COLMAP model folder not found")
  for ext in (".bin", ".txt"):
    if all(os.path.isfile(os.path.join(path, f + ext)) for f in _FILES):
      return ext
  have = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".txt")))
  raise MissingFileError(f"{path}: no complete COLMAP model (need cameras, images, points3D as "
                         f"all .bin or all .txt; found {have})")


def read_model(path: str | os.PathLike, ext: str | None = None) -> Model:
  """Read a COLMAP sparse model folder; ``ext`` (``".bin"``/``".txt"``) or auto-detected."""
  path = os.fspath(path)
  ext = ext or detect_model_format(path)
  if ext not in (".bin", ".txt"):
    raise ValueError(f"ext must be '.bin' or '.txt', got {ext!r}")
  for f in _FILES:
    if not os.path.isfile(os.path.join(path, f + ext)):
      raise MissingFileError(f"{os.path.join(path, f + ext)}: COLMAP model file not found")
  if ext == ".bin":
    readers = (_read_cameras_bin, _read_images_bin, _read_points3d_bin)
  else:
    readers = (_read_cameras_txt, _read_images_txt, _read_points3d_txt)
  return Model(*(rd(os.path.join(path, f + ext)) for rd, f in zip(readers, _FILES)))


def write_model(model: Model, path: str | os.PathLike, binary: bool = True) -> str:
  """Write ``model`` to ``path`` (created if needed) as ``.bin`` (default) or ``.txt`` files."""
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  for c in model.cameras.values():
    _num_params(c.model, f"camera {c.id}")
  (_write_model_bin if binary else _write_model_txt)(model, path)
  return path


def camera_to_pinhole(camera: Camera, dtype: Any = np.float32) -> np.ndarray:
  """geojax intrinsics ``K`` (3, 3) of an undistorted COLMAP camera (principal point -0.5).

  Accepted: ``SIMPLE_PINHOLE``, ``PINHOLE``, and ``SIMPLE_RADIAL``, ``RADIAL``, ``OPENCV``,
  ``FULL_OPENCV``, ``FOV`` when all their distortion parameters are exactly zero. Fisheye models
  are rejected always (their zero-distortion projection is equidistant, not pinhole).

  Raises:
    ValueError naming the camera id, model and the non-zero distortion parameters.
  """
  model = camera.model
  _, names = CAMERA_MODELS.get(model, (None, None))
  if names is None:
    raise ValueError(f"camera {camera.id}: unknown COLMAP model {model!r}")
  p = np.asarray(camera.params, np.float64)
  if p.shape != (len(names),):
    raise ValueError(f"camera {camera.id} ({model}): expected {len(names)} params, got {p.shape}")
  if not np.all(np.isfinite(p)):
    raise ValueError(f"camera {camera.id} ({model}): non-finite params {p.tolist()}")
  if model in _FISHEYE:
    raise ValueError(f"camera {camera.id} uses the fisheye model {model}, which is not a pinhole "
                     f"camera even with zero distortion; {_UNDISTORT_HINT}")
  if names[0] == "f":
    fx = fy = p[0]
    cx, cy, dist = p[1], p[2], 3
  else:
    fx, fy, cx, cy, dist = p[0], p[1], p[2], p[3], 4
  nonzero = {n: float(v) for n, v in zip(names[dist:], p[dist:]) if v != 0}
  if nonzero:
    raise ValueError(f"camera {camera.id} ({model}) has non-zero distortion {nonzero}; "
                     f"{_UNDISTORT_HINT}")
  return np.array([[fx, 0, cx - 0.5], [0, fy, cy - 0.5], [0, 0, 1]], dtype)


def pinhole_camera(camera_id: int, intrinsics: np.ndarray, width: int, height: int) -> Camera:
  """COLMAP ``PINHOLE`` camera from geojax intrinsics ``K`` (3, 3) (principal point +0.5)."""
  k = np.asarray(intrinsics, np.float64)
  return Camera(int(camera_id), "PINHOLE", int(width), int(height),
                np.array([k[0, 0], k[1, 1], k[0, 2] + 0.5, k[1, 2] + 0.5], np.float64))


def qvec_to_rotmat(qvec: np.ndarray) -> np.ndarray:
  """Rotation matrix (3, 3) of a scalar-first quaternion ``wxyz`` (normalised first)."""
  w, x, y, z = np.asarray(qvec, np.float64) / np.linalg.norm(qvec)
  return np.array([
      [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
      [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
      [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def rotmat_to_qvec(r: np.ndarray) -> np.ndarray:
  """Scalar-first unit quaternion ``wxyz`` (w >= 0) of a rotation matrix (3, 3)."""
  r = np.asarray(r, np.float64)
  tr = np.trace(r)
  cands = np.array([tr, r[0, 0], r[1, 1], r[2, 2]])
  i = int(np.argmax(cands))
  if i == 0:
    s = 2 * np.sqrt(max(1 + tr, 1e-300))
    q = [s / 4, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s]
  elif i == 1:
    s = 2 * np.sqrt(max(1 + r[0, 0] - r[1, 1] - r[2, 2], 1e-300))
    q = [(r[2, 1] - r[1, 2]) / s, s / 4, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s]
  elif i == 2:
    s = 2 * np.sqrt(max(1 + r[1, 1] - r[0, 0] - r[2, 2], 1e-300))
    q = [(r[0, 2] - r[2, 0]) / s, (r[0, 1] + r[1, 0]) / s, s / 4, (r[1, 2] + r[2, 1]) / s]
  else:
    s = 2 * np.sqrt(max(1 + r[2, 2] - r[0, 0] - r[1, 1], 1e-300))
    q = [(r[1, 0] - r[0, 1]) / s, (r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, s / 4]
  q = np.array(q)
  q /= np.linalg.norm(q)
  return -q if q[0] < 0 else q


def image_to_w2c(image: Image, dtype: Any = np.float32) -> np.ndarray:
  """World-to-camera extrinsics (4, 4) of a COLMAP image (OpenCV axes, same as geojax)."""
  q, t = np.asarray(image.qvec, np.float64), np.asarray(image.tvec, np.float64)
  if not (np.all(np.isfinite(q)) and np.all(np.isfinite(t))) or np.linalg.norm(q) == 0:
    raise ValueError(f"image {image.id} ({image.name}): invalid pose qvec={q.tolist()} "
                     f"tvec={t.tolist()}")
  w2c = np.eye(4)
  w2c[:3, :3] = qvec_to_rotmat(q)
  w2c[:3, 3] = t
  return w2c.astype(dtype)


def read_colmap_scene(sparse_dir: str | os.PathLike, images_dir: str | os.PathLike, *,
                      load_images: bool = True, exif: bool = True) -> dict[str, Any]:
  """Read a COLMAP reconstruction as a geojax scene dict, views sorted by image name.

  Returns ``names`` (list of S), ``image_ids`` (S,) int64, ``images`` (S, H, W, 3) uint8 (when
  ``load_images``), ``intrinsics`` (S, 3, 3) float32 (geojax pixel centres, see
  :func:`camera_to_pinhole`), ``extrinsics`` (S, 4, 4) float32 world-to-camera. All images must
  share one size and use undistorted (pinhole) cameras.

  ``exif``: images are turned upright by their EXIF orientation. A camera of the stored pixels'
  size (COLMAP calibrates what it decodes, the stored pixels) is turned with its image; one of
  the upright size is used as it is (see :func:`geojax.data.formats.scene_folder.orient_view`).
  ``exif=False`` reads the stored pixels.

  Raises:
    ValueError (a ``MissingFileError`` for absent files) naming the image file that is missing,
    corrupt or of a size different from its camera's, or the camera that is not a pinhole.
  """
  sparse_dir, images_dir = os.fspath(sparse_dir), os.fspath(images_dir)
  model = read_model(sparse_dir)
  if not model.images:
    raise ValueError(f"{sparse_dir}: the model has no registered images")
  ims = sorted(model.images.values(), key=lambda im: im.name)
  ks, exts, pix, hw0 = [], [], [], None
  for im in ims:
    if im.camera_id not in model.cameras:
      raise ValueError(f"{sparse_dir}: image {im.id} ({im.name}) references missing camera "
                       f"{im.camera_id}")
    cam = model.cameras[im.camera_id]
    hw = (cam.height, cam.width)
    if hw0 is None:
      hw0 = hw
    elif hw != hw0:
      raise ValueError(f"{sparse_dir}: image {im.name} is {hw[1]}x{hw[0]} but {ims[0].name} is "
                       f"{hw0[1]}x{hw0[0]}; all views must share one size")
    try:
      ks.append(camera_to_pinhole(cam))
      exts.append(image_to_w2c(im))
    except ValueError as e:
      raise ValueError(f"{sparse_dir}: {e}") from None
    if load_images:
      p = os.path.join(images_dir, im.name)
      if not os.path.isfile(p):
        raise MissingFileError(f"{p}: image file not found (image {im.id} of the model in "
                               f"{sparse_dir})")
      a, o = read_rgb(p, exif=exif)
      a, _, ks[-1], exts[-1] = orient_view(a, o, hw, ks[-1], exts[-1],
                                           f"{p} (camera {cam.id} of {sparse_dir})")
      if pix and a.shape != pix[0].shape:
        raise ValueError(f"{p}: upright image is {a.shape[1]}x{a.shape[0]} but {ims[0].name} is "
                         f"{pix[0].shape[1]}x{pix[0].shape[0]}; all views must share one size")
      pix.append(a)
  out: dict[str, Any] = {
      "names": [im.name for im in ims],
      "image_ids": np.array([im.id for im in ims], np.int64),
      "intrinsics": np.stack(ks).astype(np.float32),
      "extrinsics": np.stack(exts).astype(np.float32),
  }
  if load_images:
    out["images"] = np.stack(pix)
  return out


def model_from_scene(scene: dict[str, Any], *, points_per_view: int = 200, seed: int = 0,
                     rel_depth_tol: float = 0.01, names: Sequence[str] | None = None) -> Model:
  """A COLMAP model of a scene with ground-truth depth (e.g. from ``render_scene``).

  One ``PINHOLE`` camera and one image per view (ids 1..S). Each view contributes up to
  ``points_per_view`` 3D points: random valid pixels lifted with their depth; a point is also
  observed in every other view where it projects inside the image with a depth within
  ``rel_depth_tol`` (relative) of that view's depth map. 2D observations are in COLMAP pixels
  (+0.5), colours come from the source view, reprojection errors are 0.

  Args:
    scene: ``images`` (S, H, W, 3) uint8, ``depth`` (S, H, W), ``intrinsics`` (S, 3, 3),
      ``extrinsics`` (S, 4, 4) world-to-camera; optional ``names``.
  """
  images = np.asarray(scene["images"])
  depth = np.asarray(scene["depth"], np.float64)
  ks = np.asarray(scene["intrinsics"], np.float64)
  w2c = np.asarray(scene["extrinsics"], np.float64)
  s, h, w = depth.shape
  names = list(names or scene.get("names") or [f"{i:06d}.png" for i in range(s)])
  rng = np.random.default_rng(seed)
  model = Model()
  xys: list[list[np.ndarray]] = [[] for _ in range(s)]
  ids: list[list[np.ndarray]] = [[] for _ in range(s)]
  counts = [0] * s
  next_id = 1
  tracks: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
  xyz_all, rgb_all, pid_all = [], [], []
  for i in range(s):
    vs, us = np.nonzero(np.isfinite(depth[i]) & (depth[i] > 0))
    if len(vs) == 0:
      continue
    sel = rng.choice(len(vs), min(points_per_view, len(vs)), replace=False)
    v, u = vs[sel], us[sel]
    z = depth[i, v, u]
    cam = (np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(ks[i]).T) * z[:, None]
    r, t = w2c[i, :3, :3], w2c[i, :3, 3]
    world = (cam - t) @ r  # R^T (x - t)
    pids = np.arange(next_id, next_id + len(z))
    next_id += len(z)
    xyz_all.append(world)
    rgb_all.append(images[i, v, u])
    pid_all.append(pids)
    for j in range(s):
      pc = world @ w2c[j, :3, :3].T + w2c[j, :3, 3]
      zc = pc[:, 2]
      with np.errstate(divide="ignore", invalid="ignore"):
        pp = pc @ ks[j].T
        px, py = pp[:, 0] / zc, pp[:, 1] / zc
      if j == i:
        px, py, ok = u.astype(np.float64), v.astype(np.float64), np.ones(len(z), bool)
      else:
        ok = (zc > 1e-6) & (px > -0.5) & (px < w - 0.5) & (py > -0.5) & (py < h - 0.5)
        ri = np.clip(np.round(py).astype(np.int64), 0, h - 1)
        ci = np.clip(np.round(px).astype(np.int64), 0, w - 1)
        dj = depth[j, ri, ci]
        ok &= (dj > 0) & (np.abs(dj - zc) <= rel_depth_tol * zc)
      idx = np.arange(counts[j], counts[j] + int(ok.sum()))
      counts[j] += int(ok.sum())
      xys[j].append(np.stack([px[ok] + 0.5, py[ok] + 0.5], -1))
      ids[j].append(pids[ok])
      for pid, k in zip(pids[ok], idx):
        tracks.setdefault(int(pid), []).append((j + 1, int(k)))
  for i in range(s):
    model.cameras[i + 1] = pinhole_camera(i + 1, ks[i], w, h)
    q = rotmat_to_qvec(w2c[i, :3, :3])
    model.images[i + 1] = Image(
        i + 1, q, w2c[i, :3, 3].copy(), i + 1, names[i],
        np.concatenate(xys[i]) if xys[i] else np.zeros((0, 2)),
        np.concatenate(ids[i]).astype(np.int64) if ids[i] else np.zeros((0,), np.int64))
  for xyz, rgb, pids in zip(xyz_all, rgb_all, pid_all):
    for p, c, pid in zip(xyz, rgb, pids):
      tr = tracks[int(pid)]
      model.points3D[int(pid)] = Point3D(
          int(pid), p.copy(), np.asarray(c, np.uint8), 0.0,
          np.array([a for a, _ in tr], np.int32), np.array([b for _, b in tr], np.int32))
  return model
