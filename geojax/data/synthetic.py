"""Built-in synthetic scenes with exact ground truth, rendered by analytic ray casting.

A scene is a textured room (the inside of an axis-aligned box) holding a few boxes and spheres,
seen by ``num_views`` pinhole cameras. Everything is derived from ``(seed, index)`` alone, so
tests, the demo and ``evaluate.py`` need no files and get byte-identical samples everywhere.

Conventions (shared with DA3 and the rest of geojax):

- OpenCV camera axes: x right, y down, z forward; extrinsics are world-to-camera 4x4.
- Pixel ``(u, v)`` at integer coordinates is the *centre* of the pixel in column ``u`` and row
  ``v``; the ray of that pixel is ``R_c2w K^-1 [u, v, 1]^T``.
- ``depth`` is z-depth (distance along the optical axis), ``normals`` are unit vectors in camera
  coordinates facing the camera, ``valid`` marks pixels that hit a surface (rooms are closed, so
  every pixel is valid unless a camera looks out of an open scene).
"""

from __future__ import annotations

import numpy as np

_BIG = np.float32(1e10)


def _hash_noise(p: np.ndarray, scale: float, seed: int) -> np.ndarray:
  """Smooth value noise in [0, 1] at 3D points ``p`` (..., 3): trilinear over a hashed lattice."""
  q = p * scale
  i = np.floor(q).astype(np.int64)
  f = q - i
  f = f * f * (3 - 2 * f)  # smoothstep

  def lattice(ix, iy, iz):
    h = (ix * 73856093) ^ (iy * 19349663) ^ (iz * 83492791) ^ (seed * 2654435761)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h ^ (h >> 16)) & 0xFFFF).astype(np.float32) / 65535.0

  out = 0.0
  for dx in (0, 1):
    for dy in (0, 1):
      for dz in (0, 1):
        w = ((f[..., 0] if dx else 1 - f[..., 0]) * (f[..., 1] if dy else 1 - f[..., 1])
             * (f[..., 2] if dz else 1 - f[..., 2]))
        out = out + w * lattice(i[..., 0] + dx, i[..., 1] + dy, i[..., 2] + dz)
  return out


def _texture(p: np.ndarray, kind: int, freq: float, seed: int) -> np.ndarray:
  """Procedural pattern in [0, 1] at surface points ``p`` (..., 3)."""
  noise = _hash_noise(p, 4.0 * freq, seed)
  if kind == 0:  # checkers
    c = np.floor(p * freq).astype(np.int64).sum(-1) % 2
    return 0.55 + 0.3 * c + 0.15 * noise
  if kind == 1:  # stripes
    s = 0.5 + 0.5 * np.sin(p @ np.array([1.0, 0.6, 0.3], np.float32) * freq * 3.0)
    return 0.4 + 0.4 * s + 0.2 * noise
  if kind == 2:  # multi-octave noise
    n2 = _hash_noise(p, 12.0 * freq, seed + 1)
    return 0.3 + 0.5 * noise + 0.2 * n2
  return 0.5 + 0.5 * np.clip(p[..., 1] * 0.2 + 0.5, 0, 1) * noise  # gradient


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


class _Scene:
  """Primitives of one scene in world coordinates (y points down, the floor is at +y)."""

  def __init__(self, rng: np.random.Generator, seed: int):
    self.seed = seed
    self.half = rng.uniform([2.5, 1.2, 2.5], [4.5, 1.8, 4.5])  # room half-extent
    n_boxes, n_spheres = rng.integers(1, 4), rng.integers(1, 3)
    boxes = []
    for _ in range(n_boxes):
      size = rng.uniform(0.25, 0.6, 3)
      centre = np.array([rng.uniform(-1.2, 1.2), self.half[1] - size[1], rng.uniform(-1.2, 1.2)])
      boxes.append((centre - size, centre + size))
    self.boxes = boxes
    spheres = []
    for _ in range(n_spheres):
      r = rng.uniform(0.25, 0.5)
      spheres.append((np.array([rng.uniform(-1.2, 1.2), self.half[1] - r - rng.uniform(0, 0.6),
                                rng.uniform(-1.2, 1.2)]), r))
    self.spheres = spheres
    n_surf = 6 + n_boxes + n_spheres
    self.colors = rng.uniform(0.25, 1.0, (n_surf, 3)).astype(np.float32)
    self.kinds = rng.integers(0, 4, n_surf)
    self.freqs = rng.uniform(1.0, 3.0, n_surf).astype(np.float32)
    self.light = np.array([0.3, 1.0, 0.5]) / np.linalg.norm([0.3, 1.0, 0.5])

  def intersect(self, o: np.ndarray, d: np.ndarray):
    """Nearest hit along rays ``o + t d`` (d not unit): ``(t, normal_world, surface_id)``."""
    shape = d.shape[:-1]
    t_best = np.full(shape, _BIG, np.float64)
    normal = np.zeros(shape + (3,), np.float64)
    sid = np.full(shape, -1, np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
      inv = 1.0 / d
      # room: exit point of the interior; each wall is its own surface
      for axis in range(3):
        for k, sign in enumerate((-1.0, 1.0)):
          t = (sign * self.half[axis] - o[axis]) * inv[..., axis]
          hit = (t > 1e-6) & (t < t_best)
          t_best = np.where(hit, t, t_best)
          n = np.zeros(3)
          n[axis] = -sign
          normal = np.where(hit[..., None], n, normal)
          sid = np.where(hit, 2 * axis + k, sid)
      for b, (lo, hi) in enumerate(self.boxes):
        t0 = (lo - o) * inv
        t1 = (hi - o) * inv
        tn = np.minimum(t0, t1)
        tf = np.maximum(t0, t1)
        t_near = tn.max(-1)
        t_far = tf.min(-1)
        hit = (t_near <= t_far) & (t_near > 1e-6) & (t_near < t_best)
        axis = tn.argmax(-1)
        n = -np.sign(np.take_along_axis(d, axis[..., None], -1))[..., 0]
        nb = np.zeros(shape + (3,))
        np.put_along_axis(nb, axis[..., None], n[..., None], -1)
        t_best = np.where(hit, t_near, t_best)
        normal = np.where(hit[..., None], nb, normal)
        sid = np.where(hit, 6 + b, sid)
      for s, (c, r) in enumerate(self.spheres):
        oc = o - c
        a = (d * d).sum(-1)
        bq = (d * oc).sum(-1)
        cq = oc @ oc - r * r
        disc = bq * bq - a * cq
        t = (-bq - np.sqrt(np.maximum(disc, 0))) / a
        hit = (disc > 0) & (t > 1e-6) & (t < t_best)
        p = o + t[..., None] * d
        ns = (p - c) / r
        t_best = np.where(hit, t, t_best)
        normal = np.where(hit[..., None], ns, normal)
        sid = np.where(hit, 6 + len(self.boxes) + s, sid)
    return t_best, normal, sid

  def shade(self, p: np.ndarray, n: np.ndarray, sid: np.ndarray) -> np.ndarray:
    """Lambert + ambient shading of the textured surfaces; float RGB in [0, 1]."""
    rgb = np.zeros(p.shape, np.float32)
    for s in np.unique(sid):
      m = sid == s
      tex = _texture(p[m].astype(np.float32), int(self.kinds[s]), float(self.freqs[s]),
                     self.seed + int(s))
      lam = np.clip(-(n[m] @ self.light), 0, 1)  # light travels along +light; y is down
      rgb[m] = self.colors[s] * tex[:, None] * (0.45 + 0.55 * lam[:, None]).astype(np.float32)
    return np.clip(rgb, 0, 1)


def _cameras(rng: np.random.Generator, scene: _Scene, num_views: int, height: int, width: int):
  fov_w = np.deg2rad(rng.uniform(55, 80))
  f = (width / 2) / np.tan(fov_w / 2)
  k = np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], np.float64)
  # an arc of cameras around the room centre, looking at a point near the objects
  radius = rng.uniform(1.6, 2.2)
  start = rng.uniform(0, 2 * np.pi)
  span = rng.uniform(0.4, 1.2)
  target = np.array([rng.uniform(-0.3, 0.3), scene.half[1] * 0.4, rng.uniform(-0.3, 0.3)])
  ext = []
  for i in range(num_views):
    a = start + span * (i / max(num_views - 1, 1))
    eye = np.array([radius * np.cos(a), -rng.uniform(0.0, 0.6), radius * np.sin(a)])
    ext.append(_look_at(eye, target + rng.normal(0, 0.05, 3)))
  return np.repeat(k[None], num_views, 0), np.stack(ext)


def render_scene(seed: int, index: int, *, num_views: int, height: int, width: int,
                 dynamic: bool = False) -> dict[str, np.ndarray]:
  """Render scene ``index`` of the synthetic family ``seed``.

  Returns a dict of NumPy arrays: ``images`` (S, H, W, 3) uint8, ``depth`` (S, H, W) float32
  z-depth, ``valid`` (S, H, W) bool, ``normals`` (S, H, W, 3) float32 in camera coordinates,
  ``intrinsics`` (S, 3, 3) float32 in pixels, ``extrinsics`` (S, 4, 4) float32 world-to-camera.
  """
  if dynamic:
    raise NotImplementedError("dynamic synthetic scenes (3D tracks) are not available yet")
  for name, v in (("num_views", num_views), ("height", height), ("width", width)):
    if int(v) < 1:
      raise ValueError(f"render_scene: {name} must be a positive integer; got {v}")
  rng = np.random.default_rng([int(seed), int(index)])
  scene = _Scene(rng, int(seed) * 1000003 + int(index))
  ks, exts = _cameras(rng, scene, num_views, height, width)
  v, u = np.mgrid[0:height, 0:width].astype(np.float64)
  pix = np.stack([u, v, np.ones_like(u)], -1)
  out = {k: [] for k in ("images", "depth", "valid", "normals")}
  for k, w2c in zip(ks, exts):
    r_c2w = w2c[:3, :3].T
    eye = -r_c2w @ w2c[:3, 3]
    d_cam = pix @ np.linalg.inv(k).T  # z = 1: the ray parameter equals z-depth
    d = d_cam @ r_c2w.T
    t, n, sid = scene.intersect(eye, d)
    valid = sid >= 0
    p = eye + t[..., None] * d
    n_cam = n @ w2c[:3, :3].T
    flip = (n_cam * d_cam).sum(-1) > 0
    n_cam = np.where(flip[..., None], -n_cam, n_cam)
    rgb = scene.shade(p, n, np.where(valid, sid, 0))
    out["images"].append(np.round(rgb * 255).astype(np.uint8))
    out["depth"].append(np.where(valid, t, 0).astype(np.float32))
    out["valid"].append(valid)
    out["normals"].append(n_cam.astype(np.float32))
  res = {k: np.stack(v) for k, v in out.items()}
  res["intrinsics"] = ks.astype(np.float32)
  res["extrinsics"] = exts.astype(np.float32)
  return res
