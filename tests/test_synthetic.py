"""Synthetic scenes (geojax.data.synthetic): determinism, multi-view geometric consistency against
exact ray casts and the rendered depth maps, normals, ray maps, sky, dynamic tracks, tiling."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from geojax.data import synthetic as syn  # noqa: E402
from geojax.data.synthetic import render_image, render_scene  # noqa: E402

H, W = 60, 90


def _digest(sample: dict) -> str:
  h = hashlib.sha256()
  for k in sorted(sample):
    h.update(k.encode())
    h.update(str(sample[k].dtype).encode() + str(sample[k].shape).encode())
    h.update(np.ascontiguousarray(sample[k]).tobytes())
  return h.hexdigest()


def _cast_world(scene, time, cam, x):
  """Exact ray cast from ``cam`` through world points ``x`` (N, 3): ``(t, sid, z)``.

  The ray is scaled to camera-frame z = 1, so ``t`` is the z-depth of the first hit and ``z``
  the point's own z-depth.
  """
  r = cam.w2c[:3, :3].astype(np.float64)
  z = (x @ r.T + cam.w2c[:3, 3].astype(np.float64))[:, 2]
  d = ((x - np.array(cam.eye)) / z[:, None]).astype(np.float32)[None]
  t, sid = syn._cast(scene, time, cam.eye, d[..., 0], d[..., 1], d[..., 2])
  return t[0].astype(np.float64), sid[0], z


def _project(x, k, w2c):
  pc = x @ w2c[:3, :3].T.astype(np.float64) + w2c[:3, 3].astype(np.float64)
  z = pc[:, 2]
  uv = pc[:, :2] / z[:, None] * np.diag(k)[:2].astype(np.float64) + k[:2, 2].astype(np.float64)
  return uv, z


def _planar_depth_check(x, uv, z, s, b):
  """Compare z-depths ``z`` of world points ``x`` projecting to ``uv`` in view ``b`` with the
  rendered depth map of ``b``, on 2x2 pixel patches lying on one plane through ``x``.

  On a plane ``1/z`` is affine in the pixel coordinates, so bilinear interpolation of the
  inverse depth of the four surrounding pixel centres is exact. Returns ``(ok, rel_err[ok])``.
  """
  h, w = s["depth"].shape[1:]
  u0 = np.clip(np.floor(uv[:, 0]).astype(int), 0, w - 2)
  v0 = np.clip(np.floor(uv[:, 1]).astype(int), 0, h - 2)
  fu, fv = uv[:, 0] - u0, uv[:, 1] - v0
  depth_b, rm_b = s["depth"][b].astype(np.float64), s["ray_map"][b].astype(np.float64)
  nb = s["normals"][b].astype(np.float64) @ s["extrinsics"][b][:3, :3].astype(np.float64)
  n0 = nb[v0, u0]
  ok = np.ones(len(x), bool)
  inv = np.zeros(len(x))
  for dv in (0, 1):
    for du in (0, 1):
      dk = depth_b[v0 + dv, u0 + du]
      pk = rm_b[v0 + dv, u0 + du, 3:] + dk[:, None] * rm_b[v0 + dv, u0 + du, :3]
      ok &= (dk > 0) & (np.abs(nb[v0 + dv, u0 + du] - n0).max(-1) < 1e-6)
      ok &= np.abs(((pk - x) * n0).sum(-1)) < 1e-5 * z
      wgt = (fu if du else 1 - fu) * (fv if dv else 1 - fv)
      inv += wgt * np.where(dk > 0, 1.0 / np.maximum(dk, 1e-9), 0.0)
  return ok, np.abs(1.0 / inv[ok] - z[ok]) / z[ok]


def test_deterministic_and_distinct():
  kw = dict(num_views=3, height=H, width=W, dynamic=True, num_tracks=32)
  a = render_scene(3, 5, **kw)
  b = render_scene(3, 5, **kw)
  assert _digest(a) == _digest(b)
  code = ("import sys, hashlib, numpy as np; sys.path.insert(0, %r);"
          "from tests.test_synthetic import _digest;"
          "from geojax.data.synthetic import render_scene;"
          "print(_digest(render_scene(3, 5, num_views=3, height=%d, width=%d, dynamic=True,"
          " num_tracks=32)))" % (ROOT, H, W))
  env = dict(os.environ, OMP_NUM_THREADS="1")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, check=True).stdout.strip()
  assert out == _digest(a)
  c = render_scene(3, 6, **kw)
  assert not np.array_equal(a["images"], c["images"])
  assert not np.array_equal(a["depth"], c["depth"])
  # the static layout of a dynamic scene equals the static scene at time 0
  s = render_scene(3, 5, num_views=3, height=H, width=W)
  np.testing.assert_array_equal(s["depth"][0], a["depth"][0])
  # keys, shapes and dtypes
  shapes = {"images": ((3, H, W, 3), np.uint8), "depth": ((3, H, W), np.float32),
            "valid": ((3, H, W), bool), "sky": ((3, H, W), bool),
            "normals": ((3, H, W, 3), np.float32), "ray_map": ((3, H, W, 6), np.float32),
            "intrinsics": ((3, 3, 3), np.float32), "extrinsics": ((3, 4, 4), np.float32),
            "tracks": ((3, 32, 3), np.float32), "track_visible": ((3, 32), bool),
            "time": ((3,), np.float32), "segment": ((3, H, W), np.int16),
            "object_poses": ((3, 16, 4, 4), np.float32)}
  assert set(a) == set(shapes)
  for k, (shape, dtype) in shapes.items():
    assert a[k].shape == shape and a[k].dtype == dtype, k


@pytest.mark.parametrize("seed,index,scene_type,trajectory",
                         [(0, 0, "room", "orbit"), (1, 2, "open", "wide"),
                          (2, 4, "room", "walk"), (4, 1, "open", "orbit")])
def test_reprojection_consistency(seed, index, scene_type, trajectory):
  """Points seen by view A are, in view B, either occluded or exactly on B's rendered surface."""
  h, w = 72, 108
  kw = dict(num_views=3, height=h, width=w, trajectory=trajectory, scene_type=scene_type)
  s = render_scene(seed, index, **kw)
  scene, cams = syn._build(seed, index, 3, h, w, False, trajectory, scene_type)
  n_checked = n_interp = 0
  for a, b in ((0, 1), (1, 2), (2, 0)):
    valid = s["valid"][a]
    rm = s["ray_map"][a][valid].astype(np.float64)
    x = rm[:, 3:] + s["depth"][a][valid][:, None].astype(np.float64) * rm[:, :3]
    n_world = s["normals"][a][valid].astype(np.float64) @ s["extrinsics"][a][:3, :3].astype(
        np.float64)  # camera -> world: R^T n, as row vectors n R
    uv, z = _project(x, s["intrinsics"][b], s["extrinsics"][b])
    inside = (z > 1e-3) & (uv[:, 0] >= -0.5) & (uv[:, 0] <= w - 0.5) & (uv[:, 1] >= -0.5) & (
        uv[:, 1] <= h - 0.5)
    to_b = np.array(cams[b].eye) - x
    cos_a = np.abs((n_world * rm[:, :3]).sum(-1)) / np.linalg.norm(rm[:, :3], axis=-1)
    cos_b = (n_world * to_b).sum(-1) / np.linalg.norm(to_b, axis=-1)
    sel = inside & (cos_a > 0.1) & (cos_b > 0.1)  # front-facing, non-grazing in both views
    t, _, zz = _cast_world(scene, 0.0, cams[b], x[sel])
    rel = (t - zz) / zz
    # nothing is ever seen *through*: the first hit is never behind the surface point
    assert np.mean(rel > 1e-4) < 1e-3, np.sort(rel)[-5:]
    vis = np.abs(rel) <= 1e-4
    assert vis.mean() > 0.2
    n_checked += int(vis.sum())
    # non-circular check against B's rendered depth map
    ok, err = _planar_depth_check(x[sel][vis], uv[sel][vis], zz[vis], s, b)
    assert ok.sum() > 20
    assert err.max() < 1e-4, err.max()
    n_interp += int(ok.sum())
  assert n_checked > 500 and n_interp > 100


def test_exact_recast_matches_rendered_depth():
  """Re-casting the pixel-centre rays without culling windows reproduces depth bit-exactly."""
  for seed, index, st in ((0, 3, "room"), (2, 1, "open")):
    s = render_scene(seed, index, num_views=2, height=H, width=W, scene_type=st)
    scene, cams = syn._build(seed, index, 2, H, W, False, None, st)
    for i, cam in enumerate(cams):
      rm = s["ray_map"][i]
      t, sid = syn._cast(scene, 0.0, cam.eye, rm[..., 0].ravel()[None], rm[..., 1].ravel()[None],
                         rm[..., 2].ravel()[None])
      t = np.where(sid >= 0, t, 0).reshape(H, W)
      np.testing.assert_array_equal(t, s["depth"][i])
      np.testing.assert_array_equal(sid.reshape(H, W) >= 0, s["valid"][i])


def test_ray_map_and_normals():
  import jax.numpy as jnp

  from geojax.geometry.normals import normals_from_depth
  from geojax.geometry.unproject import depth_to_world_points

  s = render_scene(0, 7, num_views=2, height=96, width=144, scene_type="room")
  k, w2c = s["intrinsics"], s["extrinsics"]
  # ray map layout: R_c2w K^-1 [u, v, 1] (pixel offset 0), then the camera centre
  v, u = np.mgrid[0:96, 0:144].astype(np.float64)
  pix = np.stack([u, v, np.ones_like(u)], -1)
  for i in range(2):
    r = w2c[i, :3, :3].astype(np.float64)
    d = pix @ np.linalg.inv(k[i].astype(np.float64)).T @ r
    np.testing.assert_allclose(s["ray_map"][i, ..., :3], d, rtol=1e-5, atol=1e-6)
    centre = -r.T @ w2c[i, :3, 3].astype(np.float64)
    np.testing.assert_allclose(s["ray_map"][i, ..., 3:], np.broadcast_to(centre, (96, 144, 3)),
                               atol=1e-5)
  pts = s["ray_map"][..., 3:] + s["depth"][..., None] * s["ray_map"][..., :3]
  ref = np.asarray(depth_to_world_points(jnp.asarray(s["depth"]), jnp.asarray(k),
                                         jnp.asarray(w2c)))
  np.testing.assert_allclose(pts, ref, rtol=1e-5, atol=1e-5)
  # unit normals facing the camera
  n = s["normals"]
  np.testing.assert_allclose(np.linalg.norm(n[s["valid"]], axis=-1), 1.0, atol=1e-5)
  d_cam = pix @ np.linalg.inv(k[0].astype(np.float64)).T
  assert ((n[0] * d_cam).sum(-1)[s["valid"][0]] < 1e-6).all()
  # normals agree with depth-derived ones where the 5x5 window holds one plane
  nd, nv = normals_from_depth(jnp.asarray(s["depth"]), jnp.asarray(k), window=5)
  nd, nv = np.asarray(nd), np.asarray(nv)
  win = np.lib.stride_tricks.sliding_window_view(np.pad(n, ((0, 0), (2, 2), (2, 2), (0, 0)),
                                                         mode="edge"), (5, 5), axis=(1, 2))
  spread = np.abs(win - n[..., None, None]).max(axis=(-1, -2)).max(-1)
  planar = nv & s["valid"] & (spread < 1e-6)
  planar[:, :2] = planar[:, -2:] = planar[:, :, :2] = planar[:, :, -2:] = False
  assert planar.mean() > 0.3
  cos = (nd * n).sum(-1)[planar]
  assert cos.min() > 0.999, cos.min()


def test_sky_open_space():
  s = render_scene(1, 0, num_views=3, height=H, width=W, scene_type="open", trajectory="orbit")
  sky = s["sky"]
  assert sky.any() and (~sky).any()
  np.testing.assert_array_equal(s["valid"], ~sky)
  assert (s["depth"][sky] == 0).all() and (s["normals"][sky] == 0).all()
  assert (s["ray_map"][..., 1][sky] <= 0).all()  # sky rays point up (world y is down)
  room = render_scene(1, 0, num_views=2, height=H, width=W, scene_type="room")
  assert not room["sky"].any() and room["valid"].all()


@pytest.mark.parametrize("trajectory", syn.TRAJECTORIES)
def test_trajectories_cameras_free(trajectory):
  for index in range(3):
    scene, cams = syn._build(5, index, 6, H, W, True, trajectory, None)
    for i, cam in enumerate(cams):
      assert scene.camera_ok(np.array(cam.eye, np.float64), float(i))
      fov = 2 * np.degrees(np.arctan(W / 2 / cam.k[0, 0]))
      assert 49.9 < fov < 90.1
    eyes = np.array([c.eye for c in cams])
    spread = np.linalg.norm(eyes - eyes.mean(0), axis=-1).max()
    if trajectory == "jitter":
      assert spread < 0.15
    else:
      assert spread > 0.1


def test_dynamic_tracks():
  h, w = 80, 120
  s = render_scene(2, 3, num_views=4, height=h, width=w, dynamic=True, num_tracks=300)
  scene, cams = syn._build(2, 3, 4, h, w, True, None, None)
  tr, vis = s["tracks"].astype(np.float64), s["track_visible"]
  assert vis.any() and not vis.all()
  # objects move, and each track follows a rigid motion: per object, pairwise distances persist
  assert np.abs(tr[-1] - tr[0]).max() > 0.05
  which, _ = syn._sample_surface_points(np.random.default_rng([2, 3, 3]), scene, 300)
  for j in np.unique(which):
    p = tr[:, which == j]
    dist = np.linalg.norm(p[:, :, None] - p[:, None], axis=-1)
    np.testing.assert_allclose(dist, np.broadcast_to(dist[0], dist.shape), atol=2e-5)
  n_planar = 0
  for i in range(4):
    uv, z = _project(tr[i], s["intrinsics"][i], s["extrinsics"][i])
    m = vis[i]
    assert (z[m] > 0).all()
    assert ((uv[m] >= -0.5) & (uv[m] <= np.array([w, h]) - 0.5)).all()
    # visible tracks are on the surface the exact ray through them hits first, the object's own
    t, sid, zz = _cast_world(scene, float(i), cams[i], tr[i][m])
    np.testing.assert_allclose(t, zz, rtol=1e-4)
    assert (sid == np.array([scene.objects[j].sid for j in which[m]])).all()
    # and on the rendered depth map: exactly on planar patches, roughly at the nearest pixel
    ok, err = _planar_depth_check(tr[i][m], uv[m], z[m], s, i)
    assert err.size == 0 or err.max() < 1e-4, err.max()
    n_planar += ok.sum()
    pu = np.clip(np.rint(uv[m]).astype(int), 0, [w - 1, h - 1])
    dr = s["depth"][i][pu[:, 1], pu[:, 0]].astype(np.float64)
    assert np.mean(np.abs(dr - z[m]) / z[m] < 0.05) > 0.75
    # hidden in-frustum tracks are occluded: something is hit in front of them
    hid = ~m & (z > 0) & (uv[:, 0] >= -0.5) & (uv[:, 0] <= w - 0.5) & (uv[:, 1] >= -0.5) & (
        uv[:, 1] <= h - 0.5)
    if hid.any():
      t, _, zz = _cast_world(scene, float(i), cams[i], tr[i][hid])
      assert (t < zz * (1 + 1e-4)).all()
  assert n_planar > 20
  # object_poses move every track exactly: P[b] P[a]^-1 x_a == x_b
  poses = s["object_poses"].astype(np.float64)
  assert poses.shape == (4, syn.MAX_OBJECTS, 4, 4)
  np.testing.assert_array_equal(poses[:, len(scene.objects):], np.broadcast_to(np.eye(4), poses[:, len(scene.objects):].shape))
  for a, b in ((0, 3), (2, 1)):
    rel = poses[b, which] @ np.linalg.inv(poses[a, which])
    moved = np.einsum("nij,nj->ni", rel[:, :3, :3], tr[a]) + rel[:, :3, 3]
    np.testing.assert_allclose(moved, tr[b], atol=2e-5)
  # segment: the object index seen at each pixel; the static background is -1
  seg = s["segment"]
  assert seg.dtype == np.int16 and (seg[~s["valid"]] == -1).all()
  assert set(np.unique(seg)) - {-1} <= set(range(len(scene.objects))) and (seg >= 0).any()
  for i in range(4):
    uv, _ = _project(tr[i], s["intrinsics"][i], s["extrinsics"][i])
    m = vis[i]
    pu = np.clip(np.rint(uv[m]).astype(int), 0, [w - 1, h - 1])
    assert np.mean(seg[i][pu[:, 1], pu[:, 0]] == which[m]) > 0.75


def test_render_image_tiles():
  for seed, index in ((0, 0), (1, 4)):
    ref = render_scene(seed, index, num_views=1, height=50, width=70)
    a = render_image(seed, index, height=50, width=70, tile=16)
    b = render_image(seed, index, height=50, width=70, tile=512)
    assert set(a) == set(ref) and set(b) == set(ref)
    for k in ref:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
      np.testing.assert_array_equal(a[k], ref[k][0], err_msg=k)


def test_render_image_large_tiled():
  s = render_image(0, 1, height=540, width=960, tile=256)
  assert s["images"].shape == (540, 960, 3) and s["depth"].shape == (540, 960)
  assert s["valid"].mean() > 0.5 and s["images"].std() > 10


@pytest.mark.parametrize("kwargs,name", [
    (dict(num_views=0), "num_views"), (dict(height=-1), "height"), (dict(width=1.5), "width"),
    (dict(trajectory="spiral"), "trajectory"), (dict(scene_type="cave"), "scene_type"),
    (dict(num_tracks=0, dynamic=True), "num_tracks"), (dict(dynamic="yes"), "dynamic"),
    (dict(seed=-1), "seed"), (dict(index=True), "index")])
def test_bad_arguments(kwargs, name):
  base = dict(seed=0, index=0, num_views=2, height=8, width=8)
  base.update(kwargs)
  seed, index = base.pop("seed"), base.pop("index")
  with pytest.raises(ValueError, match=name):
    render_scene(seed, index, **base)


def test_render_image_bad_arguments():
  with pytest.raises(ValueError, match="tile"):
    render_image(0, 0, height=8, width=8, tile=0)
  with pytest.raises(ValueError, match="height"):
    render_image(0, 0, height=0, width=8)
