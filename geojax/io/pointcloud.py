"""Point clouds out of predictions: confidence filtering, PLY files and GLB scenes.

Conventions (as everywhere in geojax):

- Points are world coordinates, ``float32 (N, 3)``; colours are ``uint8 (N, 3)`` RGB.
- Cameras: ``extrinsics`` are world-to-camera ``(S, 4, 4)`` or ``(S, 3, 4)`` matrices with OpenCV
  axes (x right, y down, z forward); ``intrinsics`` ``(S, 3, 3)`` are in pixels, where pixel
  ``(u, v)`` at integer coordinates is the centre of column ``u`` / row ``v``.
- Files are written atomically (a temporary file in the same folder, then ``os.replace``) and an
  existing file is never replaced unless ``overwrite=True``.

:func:`filter_points` follows the GLB export of the official Depth Anything 3 package: an adaptive
confidence threshold clamped between two percentiles, then a uniform random subsample without
replacement when too many points remain.

PLY files are written as binary little-endian PLY 1.0 with one ``vertex`` element (``float x, y,
z`` and optionally ``uchar red, green, blue``). :func:`read_ply` also reads ASCII and big-endian
files, ``double`` coordinates, extra vertex properties and elements after ``vertex``.

GLB scenes keep the vertices in geojax world coordinates; every node carries the transform
``diag(1, -1, -1)`` that turns OpenCV axes into glTF axes (y up, z backward), so a viewer shows a
scene whose world frame is a camera frame upright and in front of its default camera.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import numpy as np

# Defaults of the official DA3 GLB export (depth_anything_3/utils/export/glb.py, export_to_glb).
DA3_CONF_PERCENTILE = 40.0  # lower percentile of the adaptive confidence threshold
DA3_CONF_BASE = 1.05  # base confidence threshold, clamped into [lower, upper] percentiles
DA3_CONF_CAP_PERCENTILE = 90.0  # upper percentile: the threshold never exceeds it
DA3_MAX_POINTS = 1_000_000  # uniform random subsample above this many points
DA3_CAMERA_SIZE = 0.03  # frustum depth as a fraction of the scene diagonal
# Family-neutral names of the export defaults above, for every model's point clouds.
DEFAULT_CONF_PERCENTILE = DA3_CONF_PERCENTILE
DEFAULT_MAX_POINTS = DA3_MAX_POINTS

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_PLY_FORMATS = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}
_GLB_EXTRA = "install the optional extra: pip install 'geojax[glb]'"


# ------------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------------


def _write_atomic(path: str, payload: bytes, overwrite: bool, who: str) -> str:
  """Write ``payload`` to ``path`` through a temporary sibling file; return ``path``."""
  if os.path.isdir(path):
    raise FileExistsError(f"{who}: {path} is a directory, expected a file path")
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{who}: {path} exists; pass overwrite=True to replace it")
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode follows the umask
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def _check_xyz(xyz: Any, who: str, name: str = "xyz") -> np.ndarray:
  """``(N, 3)`` real numbers -> float32 (non-finite values are kept)."""
  a = np.asarray(xyz)
  if a.ndim != 2 or a.shape[1] != 3:
    raise ValueError(f"{who}: {name} must have shape (N, 3), got {a.shape}")
  if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
    raise ValueError(f"{who}: {name} must hold real numbers, got dtype {a.dtype}")
  return a.astype(np.float32, copy=False)


def _check_rgb(rgb: Any, n: int, who: str, name: str = "rgb") -> np.ndarray:
  """``uint8 (n, 3)`` colours, checked."""
  a = np.asarray(rgb)
  if a.shape != (n, 3):
    raise ValueError(f"{who}: {name} must have shape ({n}, 3) to match the points, got {a.shape}")
  if a.dtype != np.uint8:
    raise ValueError(f"{who}: {name} must be uint8, got dtype {a.dtype}")
  return a


# ------------------------------------------------------------------------------------------------
# Filtering
# ------------------------------------------------------------------------------------------------


def confidence_threshold(conf: np.ndarray, conf_percentile: float = DA3_CONF_PERCENTILE, *,
                         conf_base: float = DA3_CONF_BASE,
                         conf_cap_percentile: float = DA3_CONF_CAP_PERCENTILE) -> float:
  """The official adaptive threshold ``min(max(conf_base, P_p), P_q)`` over the candidate
  confidences ``conf`` (finite, non-empty), ``P_x = np.percentile(conf, x)``."""
  lower, upper = np.percentile(conf, [conf_percentile, conf_cap_percentile])
  return min(max(float(conf_base), float(lower)), float(upper))


def filter_points(points: Any, colors: Any, conf: Any = None, *, valid: Any = None,
                  conf_percentile: float = DA3_CONF_PERCENTILE,
                  max_points: int | None = DA3_MAX_POINTS, seed: int = 0,
                  conf_base: float = DA3_CONF_BASE,
                  conf_cap_percentile: float = DA3_CONF_CAP_PERCENTILE,
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Flatten, clean, confidence-filter and cap a point map the way the official GLB export does.

  Args:
    points: world points ``(S, H, W, 3)`` or ``(N, 3)`` (any leading shape ``L`` followed by 3).
    colors: ``uint8`` RGB with shape ``L + (3,)``.
    conf: confidence with shape ``L`` (larger is better), or None to skip the confidence step.
    valid: boolean mask with shape ``L``; False entries are dropped (e.g. sky or missing depth).
    conf_percentile: lower percentile ``p`` of the adaptive threshold (official default 40); 0
      disables the confidence step.
    max_points: keep at most this many points (official default 1,000,000); None disables the cap.
    seed: seed of the subsample, so equal inputs give equal outputs.
    conf_base: the base threshold of the official export (1.05; DA3 confidences are ``1 + exp``).
    conf_cap_percentile: upper percentile ``q`` of the adaptive threshold (official default 90).

  The rule, in order:

  1. Candidates are the points with all three coordinates finite, a finite confidence (when
     ``conf`` is given) and ``valid`` True.
  2. With ``conf`` given and ``conf_percentile > 0``: the threshold is
     ``min(max(conf_base, P_p), P_q)`` with ``P_x = np.percentile(candidate_conf, x)`` (linear
     interpolation); a candidate is kept when its confidence is ``>=`` the threshold. So at least
     ``100 - q`` percent and at most ``100 - p`` percent of the candidates survive (up to ties).
     The official export computes the percentiles over the non-sky pixels; here ``valid`` plays
     that role.
  3. If more than ``max_points`` remain, exactly ``max_points`` of them are drawn uniformly
     without replacement (``np.random.default_rng(seed).choice``) and returned in their original
     order.

  Returns:
    ``(xyz, rgb)``: ``float32 (N, 3)`` and ``uint8 (N, 3)``.
  """
  who = "filter_points"
  p = np.asarray(points)
  if p.ndim < 2 or p.shape[-1] != 3:
    raise ValueError(f"{who}: points must have shape (..., 3), e.g. (S, H, W, 3), got {p.shape}")
  lead = p.shape[:-1]
  c = np.asarray(colors)
  if c.shape != p.shape:
    raise ValueError(f"{who}: colors must have shape {p.shape} like points, got {c.shape}")
  if c.dtype != np.uint8:
    raise ValueError(f"{who}: colors must be uint8, got dtype {c.dtype}")
  if not 0 <= conf_percentile <= 100 or not 0 <= conf_cap_percentile <= 100:
    raise ValueError(f"{who}: conf_percentile and conf_cap_percentile must lie in [0, 100], got "
                     f"{conf_percentile} and {conf_cap_percentile}")
  if max_points is not None and (int(max_points) != max_points or max_points < 0):
    raise ValueError(f"{who}: max_points must be a non-negative integer or None, got {max_points}")
  xyz = _check_xyz(p.reshape(-1, 3), who, "points")
  rgb = c.reshape(-1, 3)
  keep = np.isfinite(xyz).all(axis=1)
  if valid is not None:
    m = np.asarray(valid)
    if m.shape != lead or m.dtype != np.bool_:
      raise ValueError(f"{who}: valid must be a bool array of shape {lead}, got {m.dtype} "
                       f"{m.shape}")
    keep &= m.reshape(-1)
  if conf is not None:
    cf = np.asarray(conf)
    if cf.shape != lead:
      raise ValueError(f"{who}: conf must have shape {lead} like points[..., 0], got {cf.shape}")
    cf = cf.reshape(-1).astype(np.float64)
    keep &= np.isfinite(cf)
    if conf_percentile > 0 and keep.any():
      keep &= cf >= confidence_threshold(cf[keep], conf_percentile, conf_base=conf_base,
                                         conf_cap_percentile=conf_cap_percentile)
  idx = np.flatnonzero(keep)
  if max_points is not None and idx.size > max_points:
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(idx, size=int(max_points), replace=False))
  return np.ascontiguousarray(xyz[idx]), np.ascontiguousarray(rgb[idx])


# ------------------------------------------------------------------------------------------------
# PLY
# ------------------------------------------------------------------------------------------------


def write_ply(path: str | os.PathLike, xyz: Any, rgb: Any = None, *,
              overwrite: bool = False) -> str:
  """Write points (and colours) as a binary little-endian PLY 1.0 file; return the path.

  ``xyz`` is ``(N, 3)`` real numbers (stored as ``float``), ``rgb`` ``uint8 (N, 3)`` or None.
  """
  who, path = "write_ply", os.fspath(path)
  xyz = _check_xyz(xyz, who)
  n = xyz.shape[0]
  fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
  header = ["ply", "format binary_little_endian 1.0", "comment written by geojax",
            f"element vertex {n}", "property float x", "property float y", "property float z"]
  if rgb is not None:
    rgb = _check_rgb(rgb, n, who)
    fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    header += ["property uchar red", "property uchar green", "property uchar blue"]
  header.append("end_header")
  rows = np.empty(n, dtype=np.dtype(fields))
  rows["x"], rows["y"], rows["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
  if rgb is not None:
    rows["red"], rows["green"], rows["blue"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
  payload = ("\n".join(header) + "\n").encode("ascii") + rows.tobytes()
  return _write_atomic(path, payload, overwrite, who)


def _parse_ply_header(data: bytes, path: str) -> tuple[str, list[dict[str, Any]], int]:
  """``(format, elements, data_offset)``; each element is ``{name, count, props}`` and each
  property ``(name, type)`` or ``(name, ("list", count_type, item_type))``."""
  def fail(msg: str) -> ValueError:
    return ValueError(f"read_ply: {path}: {msg}")

  pos, lineno, fmt, elements = 0, 0, None, []
  while True:
    end = data.find(b"\n", pos)
    if end < 0:
      raise fail("bad header: no 'end_header' line (not a PLY file, or truncated)")
    raw, pos, lineno = data[pos:end].rstrip(b"\r"), end + 1, lineno + 1
    if lineno == 1 and raw.strip() != b"ply":
      raise fail("bad header: the first line must be 'ply' (not a PLY file)")
    try:
      words = raw.decode("ascii").split()
    except UnicodeDecodeError:
      raise fail(f"bad header: line {lineno} is not ASCII text") from None
    if lineno == 1:
      continue
    if not words or words[0] in ("comment", "obj_info"):
      continue
    key = words[0]
    if key == "end_header":
      break
    if key == "format":
      if fmt is not None:
        raise fail(f"bad header: second 'format' line (line {lineno})")
      if len(words) != 3 or words[1] not in _PLY_FORMATS or words[2] != "1.0":
        raise fail(f"bad header: unsupported format line {raw.decode()!r}, expected 'format "
                   "ascii|binary_little_endian|binary_big_endian 1.0'")
      fmt = words[1]
    elif key == "element":
      if len(words) != 3 or not words[2].isdigit():
        raise fail(f"bad header: malformed element line {raw.decode()!r} (line {lineno})")
      elements.append({"name": words[1], "count": int(words[2]), "props": []})
    elif key == "property":
      if not elements:
        raise fail(f"bad header: property before any element (line {lineno})")
      if len(words) == 5 and words[1] == "list":
        if words[2] not in _PLY_TYPES or words[3] not in _PLY_TYPES:
          raise fail(f"bad header: unknown list types in {raw.decode()!r} (line {lineno})")
        elements[-1]["props"].append((words[4], ("list", words[2], words[3])))
      elif len(words) == 3 and words[1] in _PLY_TYPES:
        elements[-1]["props"].append((words[2], words[1]))
      else:
        raise fail(f"bad header: malformed property line {raw.decode()!r} (line {lineno})")
    else:
      raise fail(f"bad header: unknown keyword {key!r} on line {lineno}")
  if fmt is None:
    raise fail("bad header: no 'format' line")
  return fmt, elements, pos


def read_ply(path: str | os.PathLike) -> dict[str, np.ndarray | None]:
  """Read the ``vertex`` element of a PLY file.

  Supports ``ascii``, ``binary_little_endian`` and ``binary_big_endian``; coordinates of any
  numeric type (usually ``float`` or ``double``), colours as ``uchar red, green, blue``; other
  vertex properties are skipped by their declared types, elements after ``vertex`` are ignored.

  Returns:
    ``{"xyz": float32 (N, 3), "rgb": uint8 (N, 3) or None}``.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"read_ply: {path} does not exist or is not a file")
  with open(path, "rb") as f:
    data = f.read()
  fmt, elements, offset = _parse_ply_header(data, path)

  def fail(msg: str) -> ValueError:
    return ValueError(f"read_ply: {path}: {msg}")

  names = [e["name"] for e in elements]
  if "vertex" not in names:
    raise fail("no 'vertex' element in the header")
  k = names.index("vertex")
  vertex, before = elements[k], elements[:k]
  props = vertex["props"]
  prop_names = [name for name, _ in props]
  for want in ("x", "y", "z"):
    if want not in prop_names:
      raise fail(f"the vertex element has no {want!r} property")
  if any(not isinstance(t, str) for _, t in props):
    raise fail("list properties in the vertex element are not supported")
  color_names = [c for c in ("red", "green", "blue") if c in prop_names]
  if color_names and len(color_names) != 3:
    raise fail(f"the vertex element has only {color_names} of red/green/blue")
  for c in color_names:
    t = props[prop_names.index(c)][1]
    if _PLY_TYPES[t] != "u1":
      raise fail(f"vertex property {c!r} must be uchar, got {t}")
  n = vertex["count"]
  # Unnamed fields so that repeated property names do not clash; columns found by first name.
  col = {name: i for i, name in reversed(list(enumerate(prop_names)))}

  if fmt == "ascii":
    lines = [ln for ln in data[offset:].split(b"\n") if ln.strip()]
    skip = sum(e["count"] for e in before)
    rows = lines[skip:skip + n]
    if len(rows) < n:
      raise fail(f"truncated: {n} vertex lines expected after {skip} earlier lines, found "
                 f"{len(rows)}")
    tokens = b" ".join(rows).split()
    if len(tokens) != n * len(props):
      raise fail(f"vertex lines must hold {len(props)} values each ({n * len(props)} in all), "
                 f"found {len(tokens)}")
    try:
      table = np.array(tokens, dtype=np.bytes_).astype(np.float64).reshape(n, len(props))
    except ValueError:
      raise fail("vertex lines hold values that are not numbers") from None
    columns = [table[:, i] for i in range(len(props))]
  else:
    order = _PLY_FORMATS[fmt]
    for e in before:
      if any(not isinstance(t, str) for _, t in e["props"]):
        raise fail(f"binary element {e['name']!r} with list properties before 'vertex' is not "
                   "supported")
      size = sum(np.dtype(order + _PLY_TYPES[t]).itemsize for _, t in e["props"])
      offset += size * e["count"]
    dt = np.dtype([(f"f{i}", order + _PLY_TYPES[t]) for i, (_, t) in enumerate(props)])
    need, have = n * dt.itemsize, max(len(data) - offset, 0)
    if have < need:
      raise fail(f"truncated: the vertex data needs {need} bytes, found {have}")
    table = np.frombuffer(data, dtype=dt, count=n, offset=offset)
    columns = [table[f"f{i}"] for i in range(len(props))]

  xyz = np.stack([columns[col[c]] for c in ("x", "y", "z")], axis=-1).astype(np.float32)
  rgb = None
  if color_names:
    rgb_f = np.stack([columns[col[c]] for c in ("red", "green", "blue")], axis=-1)
    if fmt == "ascii" and (np.any(rgb_f != np.round(rgb_f)) or np.any((rgb_f < 0) | (rgb_f > 255))):
      raise fail("uchar colours must be integers in [0, 255]")
    rgb = np.ascontiguousarray(rgb_f.astype(np.uint8))
  return {"xyz": xyz, "rgb": rgb}


# ------------------------------------------------------------------------------------------------
# GLB
# ------------------------------------------------------------------------------------------------


def scene_scale(xyz: np.ndarray, fallback: float = 1.0) -> float:
  """Diagonal of the 5th-95th percentile box of the finite points (the official scene scale)."""
  xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
  xyz = xyz[np.isfinite(xyz).all(axis=1)]
  if xyz.shape[0] < 2:
    return float(fallback)
  lo, hi = np.percentile(xyz, [5, 95], axis=0)
  diag = float(np.linalg.norm(hi - lo))
  return diag if np.isfinite(diag) and diag > 0 else float(fallback)


def write_glb(path: str | os.PathLike, xyz: Any, rgb: Any, *, extrinsics: Any = None,
              intrinsics: Any = None, image_hw: Any = None, overwrite: bool = False,
              camera_size: float = DA3_CAMERA_SIZE) -> str:
  """Write a binary glTF (GLB) scene with the point cloud and a wireframe frustum per camera.

  Args:
    path: output file (``.glb``).
    xyz: ``(N, 3)`` world points; ``rgb``: ``uint8 (N, 3)`` colours or None.
    extrinsics: world-to-camera ``(S, 4, 4)`` / ``(S, 3, 4)`` (or one matrix), or None for no
      cameras; needs ``intrinsics`` ``(S, 3, 3)`` or ``(3, 3)``.
    image_hw: ``(H, W)`` or ``(S, 2)``; None infers it from the principal points.
    camera_size: frustum depth as a fraction of :func:`scene_scale` (official default 0.03).

  The cloud is the node ``points`` (a glTF ``POINTS`` primitive with vertex colours); camera ``i``
  is the node ``camera_{i:03d}``, eight line segments (apex to the four image corners, then the
  image rectangle, as :func:`geojax.io.render.frustum_lines`) coloured per camera. Points with a
  non-finite coordinate are left out. Needs ``trimesh`` (the ``glb`` extra).
  """
  who, path = "write_glb", os.fspath(path)
  try:
    import trimesh
  except ImportError:
    raise ImportError(f"{who} needs trimesh; {_GLB_EXTRA}") from None
  from geojax.io.render import camera_colors, frustum_lines

  xyz = _check_xyz(xyz, who)
  if rgb is not None:
    rgb = _check_rgb(rgb, xyz.shape[0], who)
  finite = np.isfinite(xyz).all(axis=1)
  if not finite.all():
    xyz, rgb = xyz[finite], (rgb[finite] if rgb is not None else None)
  if not (np.isfinite(camera_size) and camera_size > 0):
    raise ValueError(f"{who}: camera_size must be a positive number, got {camera_size}")
  if extrinsics is None and (intrinsics is not None or image_hw is not None):
    raise ValueError(f"{who}: intrinsics/image_hw were given without extrinsics")
  if os.path.exists(path) and not overwrite:  # fail before the (slow) export
    raise FileExistsError(f"{who}: {path} exists; pass overwrite=True to replace it")

  to_gltf = np.diag([1.0, -1.0, -1.0, 1.0])
  scene = trimesh.Scene()
  if xyz.shape[0]:
    colors = None
    if rgb is not None:
      colors = np.concatenate([rgb, np.full((rgb.shape[0], 1), 255, np.uint8)], axis=1)
    cloud = trimesh.points.PointCloud(vertices=xyz, colors=colors)
    scene.add_geometry(cloud, node_name="points", geom_name="points", transform=to_gltf)
  if extrinsics is not None:
    segs = frustum_lines(extrinsics, intrinsics, image_hw, camera_size * scene_scale(xyz))
    palette = camera_colors(segs.shape[0])
    for i, cam in enumerate(segs):
      lines = trimesh.load_path(cam)
      lines.colors = np.tile(np.append(palette[i], 255).astype(np.uint8),
                             (len(lines.entities), 1))
      name = f"camera_{i:03d}"
      scene.add_geometry(lines, node_name=name, geom_name=name, transform=to_gltf)
  if not scene.geometry:
    raise ValueError(f"{who}: nothing to write: no points and no cameras")
  payload = scene.export(file_type="glb")
  return _write_atomic(path, payload, overwrite, who)
