"""Built-in synthetic scenes with exact ground truth, rendered by analytic ray casting.

A scene is either a textured *room* (the inside of an axis-aligned box) or an *open space* (an
infinite ground plane under a sky), holding boxes (optionally rotated about the vertical axis),
spheres, vertical cylinders and (open spaces) free-standing vertical panels. Surfaces carry
procedural textures (fractal value noise, checkers, stripes, gradients, always mixed with noise so
that they can be matched) under Lambert + ambient shading. Everything is derived from
``(seed, index)`` alone, so tests, the demo and ``evaluate.py`` need no files and get
byte-identical samples everywhere.

Conventions (shared with DA3 and the rest of geojax):

- World axes: y points *down* (the floor / ground is at positive y), x and z are horizontal.
- OpenCV camera axes: x right, y down, z forward; extrinsics are world-to-camera 4x4.
- Pixel ``(u, v)`` at integer coordinates is the *centre* of the pixel in column ``u`` and row
  ``v`` (pixel offset 0); the ray of that pixel is ``d = R_c2w K^-1 [u, v, 1]^T`` (not unit
  length: its camera-frame z is 1, so the ray parameter of a hit equals its z-depth).
- ``depth`` is z-depth (distance along the optical axis), ``normals`` are unit vectors in camera
  coordinates facing the camera, ``valid`` marks pixels that hit a surface. ``sky`` marks pixels
  of open spaces whose ray hits nothing (infinite depth): there ``depth`` is 0, ``valid`` is
  False and ``normals`` are 0. Rooms are closed, so they have no sky.
- ``ray_map`` is DA3's ray layout: ``[..., :3]`` the unnormalised world direction ``d`` above,
  ``[..., 3:]`` the camera centre, so ``ray_map[..., 3:] + depth[..., None] * ray_map[..., :3]``
  is the world point of a valid pixel.

Dynamic scenes (``dynamic=True``) move every object rigidly (translation on the ground plus a
rotation about the vertical axis); view ``i`` shows time ``i``. Ground-truth tracks follow
surface points of the objects (see :func:`render_scene`).

Everything is computed in float32 with element-wise NumPy operations on structure-of-arrays ray
bundles, so a pixel's values do not depend on how the image is split into tiles. Objects are
only intersected inside a conservative pixel box of their bounding sphere, textures use one
gather per lookup from a precomputed periodic fractal value-noise table, and shading runs once
per surface on the rays grouped by surface id. ``bench/synthetic_render.py`` measures the
single-core rate (about 20-27 views/s at 504 x 336 on the development machine).
"""

from __future__ import annotations

import math

import numpy as np

_INF = np.float32(np.inf)
_BOX, _SPHERE, _CYL, _PANEL = range(4)
TRAJECTORIES = ("orbit", "walk", "jitter", "wide")
SCENE_TYPES = ("room", "open")
_TRACK_RTOL = 1e-4  # relative depth tolerance of the track occlusion test
MAX_OBJECTS = 16  # rows of ``object_poses`` (dynamic scenes), padded with identities
_NOISE_N = 256  # side of the (periodic) fractal value-noise table
_NOISE_TABLE: np.ndarray | None = None


def _noise_table() -> np.ndarray:
  """Periodic fractal value noise on a 256 x 256 lattice, values in [0, 1] (built once, fixed).

  Returned as ``(256 * 256,)`` complex128 whose 16 bytes pack the float32 lattice values at
  cell ``(i, j)``, ``(i, j + 1)``, ``(i + 1, j)``, ``(i + 1, j + 1)`` (row ``i`` is y), so one
  gather fetches the four corners of a bilinear lookup.
  """
  global _NOISE_TABLE
  if _NOISE_TABLE is None:
    n = _NOISE_N
    rng = np.random.default_rng(0x5EED)
    acc = np.zeros((n, n), np.float64)
    amp, total = 1.0, 0.0
    for cells in (4, 8, 16, 32, 64, 128, 256):
      lat = rng.random((cells, cells))
      x = np.arange(n) * (cells / n)
      i0 = np.floor(x).astype(np.int64)
      f = x - i0
      f = f * f * (3 - 2 * f)
      i1 = (i0 + 1) % cells
      rows = lat[i0] * (1 - f)[:, None] + lat[i1] * f[:, None]  # interpolate along y
      layer = rows[:, i0] * (1 - f)[None] + rows[:, i1] * f[None]  # then along x
      acc += amp * layer
      total += amp
      amp *= 0.6
    acc /= total
    tab = ((acc - acc.min()) / (acc.max() - acc.min())).astype(np.float32)
    right = np.roll(tab, -1, 1)
    quad = np.stack([tab, right, np.roll(tab, -1, 0), np.roll(right, -1, 0)], -1)
    _NOISE_TABLE = np.ascontiguousarray(quad).view(np.complex128).reshape(-1)
  return _NOISE_TABLE


def _noise(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Bilinear lookup of the periodic noise table at float32 lattice coordinates ``(x, y)``."""
  fx = np.floor(x)
  fy = np.floor(y)
  ax = x - fx
  ay = y - fy
  idx = (fy.astype(np.intp) & (_NOISE_N - 1)) * _NOISE_N + (fx.astype(np.intp) & (_NOISE_N - 1))
  q = _noise_table()[idx].view(np.float32).reshape(-1, 4)
  a, b, c, d = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
  top = a + (b - a) * ax
  bot = c + (d - c) * ax
  return top + (bot - top) * ay


class _Surface:
  """Texture parameters of one surface id: pattern kind, frequencies, two colours."""

  def __init__(self, rng: np.random.Generator):
    self.kind = int(rng.integers(0, 4))  # 0 noise, 1 checkers, 2 stripes, 3 gradient
    self.freq = float(rng.uniform(1.0, 4.0))  # pattern periods per metre
    self.nscale = float(rng.uniform(12.0, 40.0))  # noise lattice cells per metre
    self.off = (float(rng.uniform(0, _NOISE_N)), float(rng.uniform(0, _NOISE_N)))
    ang = rng.uniform(0, np.pi)
    self.dir = (float(np.cos(ang)), float(np.sin(ang)))
    c1 = rng.uniform(0.05, 0.45, 3)
    c2 = rng.uniform(0.55, 1.0, 3)
    if rng.random() < 0.5:
      c1, c2 = c2, c1
    self.c1 = tuple(float(v) for v in c1)
    self.c2 = tuple(float(v) for v in c2)

  def pattern(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pattern value in [0, 1] at float32 surface coordinates ``(u, v)`` in metres."""
    n = _noise(u * self.nscale + self.off[0], v * self.nscale + self.off[1])
    if self.kind == 0:
      n2 = _noise(u * (self.nscale * 0.21) + self.off[1], v * (self.nscale * 0.21) + self.off[0])
      return 0.55 * n + 0.45 * n2
    if self.kind == 1:
      c = (np.floor(u * self.freq) + np.floor(v * self.freq)) * 0.5
      c = (c - np.floor(c)) * 2.0  # 0 or 1
      return 0.15 + 0.55 * c + 0.3 * n
    w = u * self.dir[0] + v * self.dir[1]
    if self.kind == 2:
      s = w * self.freq
      s = np.abs(2.0 * (s - np.floor(s)) - 1.0)  # triangle wave in [0, 1]
      return 0.6 * s + 0.4 * n
    g = np.clip(0.5 + 0.3 * w, 0.0, 1.0)
    return 0.5 * g + 0.5 * n


class _Object:
  """A rigid primitive: ``kind``, pose at time 0 (centre, yaw about +y), motion, size."""

  def __init__(self, kind: int, centre, yaw: float, size, sid: int):
    self.kind = kind
    self.centre = np.asarray(centre, np.float64)
    self.yaw = float(yaw)
    # box: half extents (x, y, z); sphere: (r, r, r); cylinder: (r, half height, r);
    # panel: (half width, half height, 0)
    self.size = tuple(float(s) for s in size)
    self.sid = sid
    self.vel = np.zeros(3)
    self.omega = 0.0

  def radius(self) -> float:
    """Bounding-sphere radius around the centre."""
    sx, sy, sz = self.size
    if self.kind == _SPHERE:
      return sx
    if self.kind == _CYL:
      return math.hypot(sx, sy)
    return math.sqrt(sx * sx + sy * sy + sz * sz)

  def pose(self, time: float):
    """``(centre (3 floats), cos, sin)`` at ``time``, rounded to float32 values."""
    c = self.centre + self.vel * time
    yaw = self.yaw + self.omega * time
    f = lambda v: float(np.float32(v))  # noqa: E731
    return (f(c[0]), f(c[1]), f(c[2])), f(math.cos(yaw)), f(math.sin(yaw))

  def contains(self, p: np.ndarray, time: float, margin: float) -> bool:
    """Whether world point ``p`` lies inside the object grown by ``margin``."""
    (cx, cy, cz), co, si = self.pose(time)
    rx, ry, rz = p[0] - cx, p[1] - cy, p[2] - cz
    lx, lz = _to_local(co, si, rx, rz)
    sx, sy, sz = self.size
    if self.kind == _SPHERE:
      return rx * rx + ry * ry + rz * rz < (sx + margin) ** 2
    if self.kind == _CYL:
      return lx * lx + lz * lz < (sx + margin) ** 2 and abs(ry) < sy + margin
    return abs(lx) < sx + margin and abs(ry) < sy + margin and abs(lz) < sz + margin


def _to_local(co: float, si: float, x, z):
  """World offsets ``(x, z)`` to object-local ones for a yaw with ``(cos, sin)``.

  The object-to-world rotation about +y maps local ``(x, z)`` to
  ``(cos x + sin z, -sin x + cos z)``; this is its transpose.
  """
  if si == 0.0 and co == 1.0:
    return x, z
  return co * x - si * z, si * x + co * z


def _to_world(co: float, si: float, x, z):
  """Object-local ``(x, z)`` directions to world ones (inverse of :func:`_to_local`)."""
  if si == 0.0 and co == 1.0:
    return x, z
  return co * x + si * z, -si * x + co * z


class _Scene:
  """Primitives of one scene in world coordinates (y points down, the floor is at +y)."""

  def __init__(self, rng: np.random.Generator, scene_type: str):
    self.room = scene_type == "room"
    objs: list[_Object] = []
    if self.room:
      self.half = tuple(float(v) for v in rng.uniform([2.5, 1.2, 2.5], [4.5, 1.8, 4.5]))
      self.floor = self.half[1]
      n_bg = 6
      spread = (self.half[0] - 0.9, self.half[2] - 0.9)
      counts = (rng.integers(1, 4), rng.integers(1, 3), rng.integers(0, 3), 0)
    else:
      self.half = None
      self.floor = float(rng.uniform(1.2, 1.8))
      n_bg = 1
      spread = (4.0, 4.0)
      counts = (rng.integers(2, 5), rng.integers(1, 4), rng.integers(1, 4), rng.integers(0, 3))
    self.n_background = n_bg
    sid = n_bg
    for kind, count in zip((_BOX, _SPHERE, _CYL, _PANEL), counts):
      for _ in range(int(count)):
        x, z = rng.uniform(-spread[0], spread[0]), rng.uniform(-spread[1], spread[1])
        yaw = rng.uniform(-np.pi, np.pi) if rng.random() < 0.7 else 0.0
        if kind == _BOX:
          size = rng.uniform(0.2, 0.6, 3)
          y = self.floor - size[1]
        elif kind == _SPHERE:
          r = rng.uniform(0.25, 0.55)
          size = (r, r, r)
          y = self.floor - r - rng.uniform(0.0, 0.6)
        elif kind == _CYL:
          r, hh = rng.uniform(0.15, 0.45), rng.uniform(0.3, 0.9)
          size = (r, hh, r)
          y = self.floor - hh
        else:
          hw, hh = rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.2)
          size = (hw, hh, 0.0)
          y = self.floor - hh
        objs.append(_Object(kind, (x, y, z), yaw, size, sid))
        sid += 1
    self.objects = objs
    self.surfaces = [_Surface(rng) for _ in range(sid)]
    light = np.array([rng.uniform(-0.5, 0.5), 1.0, rng.uniform(-0.5, 0.5)])
    self.light = tuple(float(v) for v in light / np.linalg.norm(light))  # direction of travel
    self.ambient = float(rng.uniform(0.35, 0.5))
    hue = rng.uniform(0.0, 0.15, 3)
    self.sky_zenith = (0.25 + hue[0], 0.45 + hue[1], 0.85)
    self.sky_horizon = (0.75 + hue[2], 0.82, 0.92)
    self.target = np.array([0.0, self.floor - 0.6, 0.0])
    if not self.room and objs:  # open spaces: cameras circle the objects' centroid
      self.target[[0, 2]] = np.mean([ob.centre[[0, 2]] for ob in objs], 0)

  def set_motion(self, rng: np.random.Generator) -> None:
    """Give every non-panel object a constant ground velocity and yaw rate (per frame)."""
    for ob in self.objects:
      if ob.kind == _PANEL:
        continue
      ang, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0.03, 0.1)
      ob.vel = np.array([speed * np.cos(ang), 0.0, speed * np.sin(ang)])
      ob.omega = float(rng.uniform(-0.15, 0.15))

  def camera_ok(self, eye: np.ndarray, time: float) -> bool:
    """Whether a camera at ``eye`` is inside the free space at ``time`` (with a margin)."""
    if self.room:
      if any(abs(eye[a]) > self.half[a] - 0.3 for a in range(3)):
        return False
    elif eye[1] > self.floor - 0.3:
      return False
    return not any(ob.contains(eye, time, 0.3) for ob in self.objects)


def _hit_object(ob: _Object, time: float, o, dx, dy, dz) -> np.ndarray:
  """Ray parameter of the first hit of ``ob`` (``inf`` where missed); ``o`` is outside ``ob``."""
  (cx, cy, cz), co, si = ob.pose(time)
  rx, ry, rz = o[0] - cx, o[1] - cy, o[2] - cz
  olx, olz = _to_local(co, si, rx, rz)
  oly = ry
  sx, sy, sz = ob.size
  if ob.kind == _SPHERE:
    b = dx * rx + dy * ry + dz * rz
    a = dx * dx + dy * dy + dz * dz
    cq = rx * rx + ry * ry + rz * rz - sx * sx
    disc = b * b - a * cq
    q = np.sqrt(disc) - b  # -b + sqrt(disc): the stable form of the near root is cq / q
    t = cq / q
    return np.where((disc >= 0) & (q > 0), t, _INF)
  lx, lz = _to_local(co, si, dx, dz)
  ly = dy
  if ob.kind == _BOX:
    tn = tf = None
    for l, ol, h in ((lx, olx, sx), (ly, oly, sy), (lz, olz, sz)):
      inv = 1.0 / l
      a = (-h - ol) * inv
      b = (h - ol) * inv
      lo = np.minimum(a, b)
      hi = np.maximum(a, b)
      tn = lo if tn is None else np.maximum(tn, lo, out=tn)
      tf = hi if tf is None else np.minimum(tf, hi, out=tf)
    return np.where((tn <= tf) & (tn > 0), tn, _INF)
  if ob.kind == _PANEL:
    t = -olz / lz
    x = olx + t * lx
    y = oly + t * ly
    return np.where((t > 0) & (np.abs(x) <= sx) & (np.abs(y) <= sy), t, _INF)
  # vertical cylinder: side (infinite cylinder clipped to |y| <= h) and the cap facing the camera
  a = lx * lx + lz * lz
  b = lx * olx + lz * olz
  cq = olx * olx + olz * olz - sx * sx
  disc = b * b - a * cq
  q = np.sqrt(disc) - b
  t = cq / q
  y = oly + t * ly
  t = np.where((disc >= 0) & (q > 0) & (t > 0) & (np.abs(y) <= sy), t, _INF)
  if abs(oly) > sy:
    yc = -sy if oly < 0 else sy
    tc = (yc - oly) / ly
    x = olx + tc * lx
    z = olz + tc * lz
    t = np.where((tc > 0) & (x * x + z * z <= sx * sx) & (tc < t), tc, t)
  return t


def _cast(scene: _Scene, time: float, o, dx: np.ndarray, dy: np.ndarray, dz: np.ndarray,
          windows=None) -> tuple[np.ndarray, np.ndarray]:
  """Nearest hit along rays ``o + t d`` (``d`` not unit, float32 arrays of one shape).

  Args:
    scene: the scene; objects are placed at ``time``.
    o: ray origin, 3 floats.
    dx, dy, dz: float32 ray direction components, any (same) shape.
    windows: optional per-object 2-D slices ``(r0, r1, c0, c1)`` of 2-D ray arrays outside of
      which the object is known not to be hit (``None`` entry: test everywhere, ``False``:
      skip). Culling never changes the values of tested rays.

  Returns:
    ``(t, sid)``: float32 ray parameter (``inf`` where nothing is hit) and int16 surface id
    (``-1`` for sky). Room walls are ``2 * axis + (wall at +half)``; the ground is 0; objects
    follow the background surfaces.
  """
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    if scene.room:
      hx, hy, hz = scene.half
      tx = (np.copysign(np.float32(hx), dx) - o[0]) / dx
      ty = (np.copysign(np.float32(hy), dy) - o[1]) / dy
      tz = (np.copysign(np.float32(hz), dz) - o[2]) / dz
      tyz = np.minimum(ty, tz)
      t = np.minimum(tx, tyz)
      sid = np.where(tx <= tyz, (dx > 0).astype(np.int16),
                     np.where(ty <= tz, (dy > 0) + np.int16(2), (dz > 0) + np.int16(4)))
      sid = sid.astype(np.int16)
    else:
      down = dy > 0
      t = np.where(down, (scene.floor - o[1]) / dy, _INF)
      sid = np.where(down, np.int16(0), np.int16(-1)).astype(np.int16)
    for j, ob in enumerate(scene.objects):
      win = None if windows is None else windows[j]
      if win is False:
        continue
      if win is None:
        sl = (Ellipsis,)
      else:
        sl = (slice(win[0], win[1]), slice(win[2], win[3]))
      tb = t[sl]
      th = _hit_object(ob, time, o, dx[sl], dy[sl], dz[sl])
      m = th < tb
      np.copyto(tb, th, where=m)
      np.copyto(sid[sl], np.int16(ob.sid), where=m)
  return t, sid


def _surface_frame(scene: _Scene, time: float, s: int, px, py, pz):
  """World normals (outward / into the room) and texture coordinates of surface ``s`` points."""
  if s < scene.n_background:
    one = np.ones_like(px)
    zero = np.zeros_like(px)
    if not scene.room:  # ground: normal points up (-y)
      return (zero, -one, zero), (px, pz)
    axis, sign = s // 2, (1.0 if s % 2 else -1.0)
    n = [zero, zero, zero]
    n[axis] = -sign * one
    uv = ((pz, py), (px, pz), (px, py))[axis]
    return tuple(n), uv
  ob = scene.objects[s - scene.n_background]
  (cx, cy, cz), co, si = ob.pose(time)
  rx, ly, rz = px - cx, py - cy, pz - cz
  lx, lz = _to_local(co, si, rx, rz)
  sx, sy, sz = ob.size
  if ob.kind == _SPHERE:
    inv = 1.0 / np.sqrt(rx * rx + ly * ly + rz * rz)  # renormalised: p carries float32 error
    nx, ny, nz = rx * inv, ly * inv, rz * inv
    ax, ay, az = np.abs(lx), np.abs(ly), np.abs(lz)
    u = np.where(ax >= np.maximum(ay, az), lz, lx)
    v = np.where(ay >= np.maximum(ax, az), lz, ly)
    return (nx, ny, nz), (u, v)
  if ob.kind == _PANEL:
    nx, nz = _to_world(co, si, np.zeros_like(lx), np.ones_like(lx))
    return (nx, np.zeros_like(lx), nz), (lx, ly)
  if ob.kind == _CYL:
    rad = np.sqrt(lx * lx + lz * lz)
    cap = (sy - np.abs(ly)) * sx < (sx - rad) * sy
    inv = 1.0 / np.maximum(rad, np.float32(1e-12))
    nlx = np.where(cap, 0.0, lx * inv).astype(np.float32)
    nlz = np.where(cap, 0.0, lz * inv).astype(np.float32)
    ny = np.where(cap, np.sign(ly), 0.0).astype(np.float32)
    nx, nz = _to_world(co, si, nlx, nlz)
    u = np.where(cap, lx, np.arctan2(lz, lx) * sx)
    v = np.where(cap, lz, ly)
    return (nx, ny, nz), (u, v)
  # box: the face is the axis where the hit point is relatively farthest out
  ax, ay, az = np.abs(lx) / sx, np.abs(ly) / sy, np.abs(lz) / sz
  fx = ax >= np.maximum(ay, az)
  fy = ~fx & (ay >= az)
  fz = ~fx & ~fy
  nlx = np.where(fx, np.sign(lx), 0.0).astype(np.float32)
  nlz = np.where(fz, np.sign(lz), 0.0).astype(np.float32)
  ny = np.where(fy, np.sign(ly), 0.0).astype(np.float32)
  nx, nz = _to_world(co, si, nlx, nlz)
  u = np.where(fx, lz, lx)
  v = np.where(fy, lz, ly)
  return (nx, ny, nz), (u, v)


class _Camera:
  """Pinhole camera: float32 ``K`` (3, 3) and world-to-camera ``w2c`` (4, 4)."""

  def __init__(self, k: np.ndarray, w2c: np.ndarray):
    self.k = k.astype(np.float32)
    self.w2c = w2c.astype(np.float32)
    r = self.w2c[:3, :3].astype(np.float64)
    t = self.w2c[:3, 3].astype(np.float64)
    self.eye = tuple(float(v) for v in (-r.T @ t).astype(np.float32))
    self.r = [[float(v) for v in row] for row in self.w2c[:3, :3]]  # R_w2c as floats

  def rays(self, r0: int, r1: int, c0: int, c1: int):
    """World directions ``R_c2w K^-1 [u, v, 1]`` of pixel rows ``r0:r1``, columns ``c0:c1``."""
    fx, cx, fy, cy = (float(self.k[0, 0]), float(self.k[0, 2]), float(self.k[1, 1]),
                      float(self.k[1, 2]))
    xc = (np.arange(c0, c1, dtype=np.float32) - cx) / fx
    yc = (np.arange(r0, r1, dtype=np.float32) - cy) / fy
    r = self.r  # R_c2w[i][j] = R_w2c[j][i]
    out = []
    for i in range(3):
      out.append((r[0][i] * xc)[None, :] + (r[1][i] * yc)[:, None] + r[2][i])
    return out

  def pixel_windows(self, scene: _Scene, time: float, h: int, w: int):
    """Conservative pixel boxes ``(r0, r1, c0, c1)`` of each object (``None``: anywhere)."""
    fx, cx, fy, cy = (float(self.k[0, 0]), float(self.k[0, 2]), float(self.k[1, 1]),
                      float(self.k[1, 2]))
    r = np.array(self.r)
    e = np.array(self.eye)
    wins = []
    for ob in scene.objects:
      c, _, _ = ob.pose(time)
      pc = r @ (np.array(c) - e)
      rad = ob.radius() * 1.01 + 1e-3
      if pc[2] - rad <= 1e-3:
        wins.append(None)
        continue
      zs = (pc[2] - rad, pc[2] + rad)
      us = [fx * x / z + cx for x in (pc[0] - rad, pc[0] + rad) for z in zs]
      vs = [fy * y / z + cy for y in (pc[1] - rad, pc[1] + rad) for z in zs]
      c0, c1 = max(int(math.floor(min(us))) - 2, 0), min(int(math.ceil(max(us))) + 3, w)
      r0, r1 = max(int(math.floor(min(vs))) - 2, 0), min(int(math.ceil(max(vs))) + 3, h)
      wins.append((r0, r1, c0, c1) if (c1 > c0 and r1 > r0) else False)
    return wins


def _render_view(scene: _Scene, cam: _Camera, time: float, h: int, w: int, tile: int) -> dict:
  """Render one view (no leading view axis) in ``tile x tile`` pixel blocks."""
  out = {"images": np.empty((h, w, 3), np.uint8), "depth": np.empty((h, w), np.float32),
         "valid": np.empty((h, w), bool), "sky": np.empty((h, w), bool),
         "normals": np.empty((h, w, 3), np.float32), "ray_map": np.empty((h, w, 6), np.float32),
         "segment": np.empty((h, w), np.int16)}
  full = cam.pixel_windows(scene, time, h, w)
  o = cam.eye
  lx, ly, lz = scene.light
  amb = scene.ambient
  rw = cam.r
  for r0 in range(0, h, tile):
    r1 = min(r0 + tile, h)
    for c0 in range(0, w, tile):
      c1 = min(c0 + tile, w)
      wins = []
      for win in full:
        if win is None or win is False:
          wins.append(win)
          continue
        a0, a1, b0, b1 = max(win[0], r0), min(win[1], r1), max(win[2], c0), min(win[3], c1)
        wins.append((a0 - r0, a1 - r0, b0 - c0, b1 - c0) if (a1 > a0 and b1 > b0) else False)
      dx, dy, dz = cam.rays(r0, r1, c0, c1)
      t, sid = _cast(scene, time, o, dx, dy, dz, wins)
      th, tw = t.shape
      n = th * tw
      t, sid = t.ravel(), sid.ravel()
      order = np.argsort(sid, kind="stable")
      counts = np.bincount(sid.astype(np.int64) + 1, minlength=len(scene.surfaces) + 1)
      ends = np.cumsum(counts)
      # rays grouped by surface (one gather), shaded group by group into contiguous slices of
      # ``buf`` (rgb, camera-frame normal), then put back into pixel order with one scatter
      srt = [dx.ravel().take(order), dy.ravel().take(order), dz.ravel().take(order),
             t.take(order)]
      buf = np.empty((6, n), np.float32)
      for g in range(len(counts)):
        if counts[g] == 0:
          continue
        a, b = ends[g] - counts[g], ends[g]
        gx, gy, gz, tt = srt[0][a:b], srt[1][a:b], srt[2][a:b], srt[3][a:b]
        if g == 0:  # sky: vertical gradient plus clouds
          inv = 1.0 / np.sqrt(gx * gx + gy * gy + gz * gz)
          up = np.maximum(-gy * inv, 0.0)
          k = 1.0 / (up + 0.08)
          cl = _noise(gx * inv * k * 3.0 + 17.0, gz * inv * k * 3.0 + 91.0)
          cl = np.clip((cl - 0.45) * 2.5, 0.0, 1.0) * np.minimum(up * 4.0, 1.0)
          s = np.sqrt(up)
          for c in range(3):
            base = scene.sky_horizon[c] + (scene.sky_zenith[c] - scene.sky_horizon[c]) * s
            buf[c, a:b] = base + (0.97 - base) * cl
          buf[3:, a:b] = 0.0
          continue
        s_id = g - 1
        px, py, pz = o[0] + tt * gx, o[1] + tt * gy, o[2] + tt * gz
        (nx, ny, nz), (u, v) = _surface_frame(scene, time, s_id, px, py, pz)
        if s_id >= scene.n_background and scene.objects[s_id - scene.n_background].kind == _PANEL:
          # two-sided panels: face the camera (closed surfaces seen from outside already do)
          flip = np.float32(1) - np.float32(2) * (nx * gx + ny * gy + nz * gz > 0)
          nx, ny, nz = nx * flip, ny * flip, nz * flip
        lam = np.maximum(-(nx * lx + ny * ly + nz * lz), 0.0)
        shade = amb + (1.0 - amb) * lam
        surf = scene.surfaces[s_id]
        val = surf.pattern(u, v) * shade
        inv_val = shade - val
        for c in range(3):
          buf[c, a:b] = surf.c1[c] * inv_val + surf.c2[c] * val
          buf[3 + c, a:b] = rw[c][0] * nx + rw[c][1] * ny + rw[c][2] * nz
      res = np.empty_like(buf)
      for c in range(6):
        res[c][order] = buf[c]
      valid = sid >= 0
      sl = (slice(r0, r1), slice(c0, c1))
      np.clip(res[:3], 0.0, 1.0, out=res[:3])
      res[:3] *= 255.0
      res[:3] += 0.5
      out["images"][sl] = res[:3].T.astype(np.uint8).reshape(th, tw, 3)
      out["depth"][sl] = np.where(valid, t, np.float32(0)).reshape(th, tw)
      out["valid"][sl] = valid.reshape(th, tw)
      out["sky"][sl] = ~valid.reshape(th, tw)
      out["segment"][sl] = np.where(sid >= scene.n_background, sid - scene.n_background,
                                    -1).astype(np.int16).reshape(th, tw)
      out["normals"][sl] = res[3:].T.reshape(th, tw, 3)
      rm = out["ray_map"][sl]
      rm[..., 0], rm[..., 1], rm[..., 2] = dx, dy, dz
      rm[..., 3], rm[..., 4], rm[..., 5] = o
  return out


def _look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
  """World-to-camera 4x4 of a camera at ``eye`` looking at ``target``; world +y is down."""
  z = target - eye
  z = z / np.linalg.norm(z)
  x = np.cross([0.0, 1.0, 0.0], z)  # OpenCV: x = y × z with y pointing (roughly) down
  x = x / np.linalg.norm(x)
  y = np.cross(z, x)
  r = np.stack([x, y, z])  # rows: camera axes in world coordinates (R_w2c)
  w2c = np.eye(4)
  w2c[:3, :3] = r
  w2c[:3, 3] = -r @ eye
  return w2c


def _trajectory(rng: np.random.Generator, scene: _Scene, kind: str, num_views: int):
  """Eyes and look-at targets ``(S, 3)`` of a trajectory ``kind`` (one draw, maybe invalid)."""
  tgt = scene.target + np.array([rng.uniform(-0.4, 0.4), rng.uniform(-0.3, 0.2),
                                 rng.uniform(-0.4, 0.4)])
  if scene.room:
    rmin, rmax = 1.4, min(scene.half[0], scene.half[2]) - 0.35
    hmin, hmax = -0.5 * scene.half[1], scene.half[1] - 0.9
  else:
    rmin, rmax = 3.0, 7.5
    hmin, hmax = scene.floor - 2.4, scene.floor - 1.0
  radius = rng.uniform(rmin, rmax)
  start = rng.uniform(-np.pi, np.pi)
  centre = np.array([0.0, 0.0, 0.0]) if scene.room else scene.target * np.array([1.0, 0.0, 1.0])
  height = rng.uniform(hmin, hmax)
  eyes, tgts = [], []
  if kind == "walk":
    heading = start + np.pi + rng.uniform(-0.4, 0.4)
    step = min(rng.uniform(0.08, 0.2), 1.6 * radius / max(num_views - 1, 1))
    fwd = np.array([np.cos(heading), 0.0, np.sin(heading)])
    side = np.array([-fwd[2], 0.0, fwd[0]])
    p0 = centre + np.array([radius * np.cos(start), height, radius * np.sin(start)])
    pitch = rng.uniform(0.05, 0.35)
    for i in range(num_views):
      eye = p0 + fwd * step * i + side * rng.normal(0, 0.02) + np.array([0, rng.normal(0, 0.01), 0])
      yaw = rng.normal(0, 0.05)
      look = fwd * np.cos(yaw) + side * np.sin(yaw) + np.array([0.0, pitch, 0.0])
      eyes.append(eye)
      tgts.append(eye + 2.0 * look)
    return eyes, tgts
  if kind in ("orbit", "jitter"):
    span = rng.uniform(0.3, 1.0) * rng.choice([-1.0, 1.0])
    step = span / max(num_views - 1, 1)
    for i in range(num_views):
      if kind == "orbit":
        a = start + step * i
        eye = centre + np.array([radius * np.cos(a), height + rng.normal(0, 0.05),
                                 radius * np.sin(a)])
        tg = tgt + rng.normal(0, 0.05, 3)
      else:
        eye = centre + np.array([radius * np.cos(start), height, radius * np.sin(start)])
        eye = eye + rng.normal(0, 0.02, 3)
        tg = tgt + rng.normal(0, 0.02, 3)
      eyes.append(eye)
      tgts.append(tg)
    return eyes, tgts
  for _ in range(num_views):  # wide: anywhere around the objects
    a = start + rng.uniform(-np.pi, np.pi)
    rr = rng.uniform(rmin, rmax)
    eyes.append(centre + np.array([rr * np.cos(a), rng.uniform(hmin, hmax), rr * np.sin(a)]))
    tgts.append(tgt + rng.normal(0, 0.3, 3))
  return eyes, tgts


def _cameras(rng: np.random.Generator, scene: _Scene, kind: str, num_views: int, height: int,
             width: int) -> list[_Camera]:
  """Random-FOV pinhole cameras on a trajectory; retried until no camera is inside geometry."""
  fov_w = np.deg2rad(rng.uniform(50.0, 90.0))
  f = (width / 2) / np.tan(fov_w / 2)
  k = np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], np.float64)
  for attempt in range(50):
    eyes, tgts = _trajectory(rng, scene, kind, num_views)
    if all(scene.camera_ok(e, float(i)) for i, e in enumerate(eyes)):
      break
  else:  # give up placing around objects: drop the objects any camera is inside
    bad = {id(ob) for i, e in enumerate(eyes) for ob in scene.objects
           if ob.contains(e, float(i), 0.3)}
    scene.objects = [ob for ob in scene.objects if id(ob) not in bad]
  return [_Camera(k, _look_at(e, tg)) for e, tg in zip(eyes, tgts)]


def _sample_surface_points(rng: np.random.Generator, scene: _Scene, n: int):
  """``n`` object-local surface points: ``(object index (n,), local xyz (n, 3))``."""
  movers = [j for j, ob in enumerate(scene.objects) if ob.kind != _PANEL]
  if not movers:
    movers = list(range(len(scene.objects)))
  if not movers:  # no objects left (see _cameras): static points on the floor, index -1
    pts = np.stack([rng.uniform(-2, 2, n), np.full(n, scene.floor), rng.uniform(-2, 2, n)], -1)
    return np.full(n, -1), pts
  areas = []
  for j in movers:
    sx, sy, sz = scene.objects[j].size
    kind = scene.objects[j].kind
    if kind == _BOX:
      areas.append(8 * (sx * sy + sy * sz + sx * sz))
    elif kind == _SPHERE:
      areas.append(4 * np.pi * sx * sx)
    elif kind == _CYL:
      areas.append(2 * np.pi * sx * (2 * sy) + 2 * np.pi * sx * sx)
    else:
      areas.append(8 * sx * sy)
  pr = np.array(areas) / np.sum(areas)
  which = np.array(movers)[rng.choice(len(movers), n, p=pr)]
  pts = np.zeros((n, 3))
  for i, j in enumerate(which):
    ob = scene.objects[j]
    sx, sy, sz = ob.size
    if ob.kind == _SPHERE:
      v = rng.normal(size=3)
      pts[i] = sx * v / np.linalg.norm(v)
    elif ob.kind == _CYL:
      side = 2 * sy
      if rng.random() < side / (side + sx):
        a = rng.uniform(-np.pi, np.pi)
        pts[i] = (sx * np.cos(a), rng.uniform(-sy, sy), sx * np.sin(a))
      else:
        a, rr = rng.uniform(-np.pi, np.pi), sx * np.sqrt(rng.random())
        pts[i] = (rr * np.cos(a), rng.choice([-sy, sy]), rr * np.sin(a))
    elif ob.kind == _PANEL:
      pts[i] = (rng.uniform(-sx, sx), rng.uniform(-sy, sy), 0.0)
    else:
      h = np.array([sx, sy, sz])
      fa = np.array([sy * sz, sx * sz, sx * sy])
      axis = rng.choice(3, p=fa / fa.sum())
      p = rng.uniform(-h, h)
      p[axis] = h[axis] * rng.choice([-1.0, 1.0])
      pts[i] = p
  return which, pts


def _tracks(scene: _Scene, cams: list[_Camera], which, local, h: int, w: int):
  """World tracks ``(S, P, 3)`` and visibility ``(S, P)`` of object-local surface points.

  A point is visible in view ``i`` when it projects inside the image (pixel centres span
  ``[-0.5, W - 0.5] x [-0.5, H - 0.5]``), lies in front of the camera and the exact ray from the
  camera through it first hits the scene at the point's own depth within a relative tolerance
  of ``1e-4`` (i.e. the rendered depth along that ray equals the projected depth).
  """
  num_views = len(cams)
  tracks = np.zeros((num_views, len(which), 3), np.float32)
  vis = np.zeros((num_views, len(which)), bool)
  for i, cam in enumerate(cams):
    for j in np.unique(which):
      m = which == j
      if j < 0:
        tracks[i, m] = local[m]
        continue
      (cx, cy, cz), co, si = scene.objects[j].pose(float(i))
      wx, wz = _to_world(co, si, local[m, 0], local[m, 2])
      tracks[i, m] = np.stack([wx + cx, local[m, 1] + cy, wz + cz], -1)
    x = tracks[i].astype(np.float64)
    r = cam.w2c[:3, :3].astype(np.float64)
    pc = x @ r.T + cam.w2c[:3, 3].astype(np.float64)
    z = pc[:, 2]
    zs = np.where(z > 1e-6, z, 1.0)
    u = cam.k[0, 0] * pc[:, 0] / zs + cam.k[0, 2]
    v = cam.k[1, 1] * pc[:, 1] / zs + cam.k[1, 2]
    inside = (z > 1e-6) & (u >= -0.5) & (u <= w - 0.5) & (v >= -0.5) & (v <= h - 0.5)
    # ray through the point, scaled to camera-frame z = 1 so that the hit parameter is z-depth
    d = ((x - np.array(cam.eye)) / zs[:, None]).astype(np.float32)[None]
    t, _ = _cast(scene, float(i), cam.eye, d[..., 0], d[..., 1], d[..., 2])
    vis[i] = inside & (np.abs(t[0] - z) <= _TRACK_RTOL * np.abs(z))
  return tracks, vis


def object_poses(scene: _Scene, num_views: int) -> np.ndarray:
  """Object-to-world 4x4 transforms ``(S, MAX_OBJECTS, 4, 4)`` float32 of every object at the
  time of each view (rows past the last object are identities).

  A point ``p`` of object ``j`` at time ``a`` is at ``P[b, j] P[a, j]^-1 p`` at time ``b``; the
  rotation is the yaw about +y of :func:`_to_world` and the translation the centre, both as the
  renderer uses them (rounded to float32)."""
  if len(scene.objects) > MAX_OBJECTS:
    raise ValueError(f"{len(scene.objects)} objects; object_poses holds {MAX_OBJECTS}")
  out = np.tile(np.eye(4, dtype=np.float32), (num_views, MAX_OBJECTS, 1, 1))
  for i in range(num_views):
    for j, ob in enumerate(scene.objects):
      (cx, cy, cz), co, si = ob.pose(float(i))
      # local (x, z) -> (co x + si z, -si x + co z); y unchanged
      out[i, j, :3, :3] = [[co, 0.0, si], [0.0, 1.0, 0.0], [-si, 0.0, co]]
      out[i, j, :3, 3] = (cx, cy, cz)
  return out


def _check_int(name: str, v, lo: int) -> int:
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < lo:
    raise ValueError(f"{name} must be an integer >= {lo}; got {v!r}")
  return int(v)


def _build(seed, index, num_views, height, width, dynamic, trajectory, scene_type):
  """Validated scene and cameras of ``(seed, index)`` (shared by the public renderers)."""
  seed = _check_int("seed", seed, 0)
  index = _check_int("index", index, 0)
  num_views = _check_int("num_views", num_views, 1)
  height = _check_int("height", height, 1)
  width = _check_int("width", width, 1)
  if not isinstance(dynamic, (bool, np.bool_)):
    raise ValueError(f"dynamic must be a bool; got {dynamic!r}")
  if scene_type is not None and scene_type not in SCENE_TYPES:
    raise ValueError(f"scene_type must be one of {SCENE_TYPES} or None; got {scene_type!r}")
  if trajectory is not None and trajectory not in TRAJECTORIES:
    raise ValueError(f"trajectory must be one of {TRAJECTORIES} or None; got {trajectory!r}")
  rng = np.random.default_rng([seed, index])
  drawn_type = SCENE_TYPES[int(rng.random() < 0.4)]
  drawn_traj = TRAJECTORIES[int(rng.integers(0, len(TRAJECTORIES)))]
  scene = _Scene(rng, scene_type or drawn_type)
  if dynamic:
    scene.set_motion(np.random.default_rng([seed, index, 1]))
  cams = _cameras(np.random.default_rng([seed, index, 2]), scene, trajectory or drawn_traj,
                  num_views, height, width)
  return scene, cams


def render_scene(seed: int, index: int, *, num_views: int, height: int, width: int,
                 dynamic: bool = False, num_tracks: int = 256, trajectory: str | None = None,
                 scene_type: str | None = None) -> dict[str, np.ndarray]:
  """Render scene ``index`` of the synthetic family ``seed`` from ``num_views`` cameras.

  Args:
    seed, index: non-negative integers selecting the scene (layout, textures, cameras).
    num_views: number of views ``S``.
    height, width: image size ``H x W`` in pixels.
    dynamic: move the objects rigidly; view ``i`` shows time ``i`` and ground-truth tracks are
      returned. The static layout (time 0) is the same as with ``dynamic=False``.
    num_tracks: number of tracked surface points ``P`` (dynamic scenes only).
    trajectory: ``"orbit"`` (arc around the objects), ``"walk"`` (forward motion), ``"jitter"``
      (small baseline around one pose), ``"wide"`` (wide baseline) or ``None`` to draw one per
      scene.
    scene_type: ``"room"``, ``"open"`` (ground plane and sky) or ``None`` to draw one per scene.

  Returns:
    A dict of NumPy arrays: ``images`` (S, H, W, 3) uint8, ``depth`` (S, H, W) float32 z-depth
    (0 where invalid), ``valid`` (S, H, W) bool, ``sky`` (S, H, W) bool, ``normals``
    (S, H, W, 3) float32 camera-frame unit normals facing the camera (0 where invalid),
    ``ray_map`` (S, H, W, 6) float32 (world direction ``R_c2w K^-1 [u, v, 1]`` with pixel offset
    0, then the camera centre), ``intrinsics`` (S, 3, 3) float32 pixels and ``extrinsics``
    (S, 4, 4) float32 world-to-camera. With ``dynamic=True`` also ``tracks`` (S, P, 3) float32
    world points, ``track_visible`` (S, P) bool (inside the image, in front and not occluded:
    the exactly cast ray through the point hits at its depth within ``1e-4`` relative),
    ``time`` (S,) float32, ``segment`` (S, H, W) int16 (the index of the object seen at each
    pixel; -1 for the static room, ground and sky) and ``object_poses`` (S, MAX_OBJECTS, 4, 4)
    float32 object-to-world transforms at each view's time (:func:`object_poses`), so that the
    position of any pixel's surface point at any other time is exact.
  """
  scene, cams = _build(seed, index, num_views, height, width, dynamic, trajectory, scene_type)
  num_tracks = _check_int("num_tracks", num_tracks, 1)
  tile = max(height, width)
  views = [_render_view(scene, cam, float(i) if dynamic else 0.0, height, width, tile)
           for i, cam in enumerate(cams)]
  res = {k: np.stack([v[k] for v in views]) for k in views[0]}
  segment = res.pop("segment")
  res["intrinsics"] = np.stack([c.k for c in cams])
  res["extrinsics"] = np.stack([c.w2c for c in cams])
  if dynamic:
    res["segment"] = segment
    res["object_poses"] = object_poses(scene, num_views)
    which, local = _sample_surface_points(np.random.default_rng([seed, index, 3]), scene,
                                          num_tracks)
    res["tracks"], res["track_visible"] = _tracks(scene, cams, which, local, height, width)
    res["time"] = np.arange(num_views, dtype=np.float32)
  return res


def render_image(seed: int, index: int, *, height: int, width: int, tile: int = 512,
                 trajectory: str | None = None,
                 scene_type: str | None = None) -> dict[str, np.ndarray]:
  """One high-resolution view (e.g. 2160 x 3840) of scene ``(seed, index)``, rendered in tiles.

  The camera is the first camera of ``render_scene(seed, index, num_views=1, ...)`` with the
  same size and keywords, and the result equals that view exactly (tiling is seamless: pixels
  never depend on the tile split). Memory for intermediates is bounded by ``tile x tile``.

  Returns:
    The keys of :func:`render_scene` for a static scene *without* the leading view axis:
    ``images`` (H, W, 3), ``depth``, ``valid``, ``sky`` (H, W), ``normals`` (H, W, 3),
    ``ray_map`` (H, W, 6), ``intrinsics`` (3, 3), ``extrinsics`` (4, 4).
  """
  tile = _check_int("tile", tile, 1)
  scene, cams = _build(seed, index, 1, height, width, False, trajectory, scene_type)
  cam = cams[0]
  res = _render_view(scene, cam, 0.0, height, width, tile)
  res.pop("segment")
  res["intrinsics"] = cam.k
  res["extrinsics"] = cam.w2c
  return res
