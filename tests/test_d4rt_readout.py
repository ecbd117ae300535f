"""D4RT read-outs fed geometrically exact answers made from the synthetic ground truth (no
network): depth, point clouds, cameras, intrinsics and tracks come back exact; dense tracking
covers every pixel with fewer starts than pixels; long videos chain chunks of arbitrary scale by
Sim(3). And the model's answer function equals direct decoding."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from geojax.data import transforms as T
from geojax.data.synthetic import render_scene
from geojax.models import d4rt
from geojax.models import d4rt_readout as R

H, W, NF = 24, 32, 5
ROOM = render_scene(7, 1, num_views=NF, height=H, width=W, dynamic=True, num_tracks=300,
                    scene_type="room", trajectory="orbit")


def oracle(scene, scale=1.0, conf=None):
  """Exact answers of a scene: nearest-pixel ground truth (``d4rt_targets``), points in the
  scene's units times ``scale``."""
  s, h, w = scene["depth"].shape

  def answer(q):
    q = np.asarray(q, np.float64)
    u = np.clip(np.floor(q[:, 0] * w), 0, w - 1).astype(int)
    v = np.clip(np.floor(q[:, 1] * h), 0, h - 1).astype(int)
    ts, tt, tc = (np.round(q[:, i]).astype(int) for i in (2, 3, 4))
    g = T.d4rt_targets(scene, u, v, ts, tt, tc)
    c = np.ones(len(q)) if conf is None else conf[ts, v, u]
    return {"points": scale * g["points"], "uv": g["uv"], "visibility": g["visible"].astype(np.float32),
            "confidence": np.where(g["valid"], c, 0.0), "normal": g["normal"],
            "displacement": scale * g["displacement"]}
  answer.calls = 0
  return answer


def test_depth_point_cloud_extrinsics_intrinsics_exact():
  sc, ans = ROOM, oracle(ROOM)
  dm = R.depth_maps(ans, NF, (H, W))
  np.testing.assert_allclose(dm["depth"], sc["depth"], rtol=1e-5)
  e = sc["extrinsics"].astype(np.float64)
  k = sc["intrinsics"].astype(np.float64)
  # point cloud of every frame at its own time, in camera 2: GT unprojection moved to camera 2
  pc = R.point_cloud(ans, NF, (H, W), t_cam=2)["points"]
  v, u = np.mgrid[0:H, 0:W]
  for t in range(NF):
    ray = np.stack([u, v, np.ones_like(u)], -1).reshape(-1, 3) @ np.linalg.inv(k[t]).T
    xc = ray * sc["depth"][t].reshape(-1, 1)
    rel = e[2] @ np.linalg.inv(e[t])
    want = xc @ rel[:3, :3].T + rel[:3, 3]
    np.testing.assert_allclose(pc[t].reshape(-1, 3), want, atol=2e-4)
  # cameras: the world is camera 0; the recovered poses are the GT ones relative to it
  w2c = R.extrinsics(ans, NF, grid=(6, 8), ref=0)
  for t in range(NF):
    np.testing.assert_allclose(w2c[t], e[t] @ np.linalg.inv(e[0]), atol=2e-4)
  w2c_ref3 = R.extrinsics(ans, NF, grid=(6, 8), ref=3)
  np.testing.assert_allclose(w2c_ref3[1], e[1] @ np.linalg.inv(e[3]), atol=2e-4)
  # intrinsics by the median rule, with the scene's principal point (normalised)
  pp = ((k[0, 0, 2] + 0.5) / W, (k[0, 1, 2] + 0.5) / H)
  kk = R.intrinsics(ans, NF, (H, W), grid=(H, W), principal=pp)
  np.testing.assert_allclose(kk, k, rtol=1e-4)
  # an image twice as large: the same normalised camera in its pixels
  k2 = R.intrinsics(ans, NF, (2 * H, 2 * W), grid=(H, W), principal=pp)
  np.testing.assert_allclose(k2[:, 0, 0], 2 * k[:, 0, 0], rtol=1e-4)


def test_extrinsics_keep_most_confident():
  """Wrong answers at low confidence do not move the fit when ``keep`` drops them."""
  rng = np.random.default_rng(0)
  base = oracle(ROOM)

  def noisy(q):
    a = base(q)
    bad = rng.random(len(q)) < 0.2
    a["points"] = np.where(bad[:, None], a["points"] + rng.normal(0, 1, (len(q), 3)), a["points"])
    a["confidence"] = np.where(bad, 0.1, 1.0 + rng.random(len(q)))
    return a

  e = ROOM["extrinsics"].astype(np.float64)
  w2c = R.extrinsics(noisy, NF, grid=(6, 8), keep=0.6)
  np.testing.assert_allclose(w2c[4], e[4] @ np.linalg.inv(e[0]), atol=2e-4)
  assert np.abs(R.extrinsics(noisy, NF, grid=(6, 8), keep=1.0)[4] - w2c[4]).max() > 1e-3


def test_tracks_camera_and_world_frames():
  sc, ans = ROOM, oracle(ROOM)
  tr, vis = sc["tracks"].astype(np.float64), sc["track_visible"]
  e, k = sc["extrinsics"].astype(np.float64), sc["intrinsics"].astype(np.float64)
  t0 = np.argmax(vis, 0)
  keep = vis.any(0)
  p = np.flatnonzero(keep)
  x = tr[t0[p], p]
  xc = np.einsum("nij,nj->ni", e[t0[p], :3, :3], x) + e[t0[p], :3, 3]
  uvw = np.einsum("nij,nj->ni", k[t0[p]], xc)
  px = uvw[:, :2] / uvw[:, 2:]
  ctr = np.floor(px + 0.5)  # the pixel the query lands on; its centre is ``ctr``
  qp = np.stack([t0[p], (ctr[:, 0] + 0.5) / W, (ctr[:, 1] + 0.5) / H], -1)
  cam = R.tracks(ans, NF, qp)
  world = R.tracks(ans, NF, qp, t_cam=0)
  assert cam["points"].shape == (NF, len(p), 3) and cam["visibility"].shape == (NF, len(p))
  for t in range(NF):  # the two frames differ by the GT relative pose
    rel = e[t] @ np.linalg.inv(e[0])
    np.testing.assert_allclose(cam["points"][t], world["points"][t] @ rel[:3, :3].T + rel[:3, 3],
                               atol=2e-4)
  # each track moves rigidly with its GT neighbour: the offset's length is kept over time
  gtc = np.einsum("tij,tnj->tni", e[:, :3, :3], tr[:, p]) + e[:, None, :3, 3]
  off = np.linalg.norm(cam["points"] - gtc, axis=-1)
  same = sc["segment"][t0[p], ctr[:, 1].astype(int).clip(0, H - 1), ctr[:, 0].astype(int).clip(0, W - 1)] >= 0
  close = same & (off[t0[p], np.arange(len(p))] < 0.15)
  assert close.sum() > 20
  np.testing.assert_allclose(off[:, close], np.broadcast_to(off[t0[p[close]], np.flatnonzero(close)], off[:, close].shape), atol=3e-4)
  # visibility agrees with the GT track visibility for most of them
  assert np.mean((cam["visibility"][:, close] > 0.5) == vis[:, p[close]]) > 0.75
  with pytest.raises(ValueError, match=r"\(N, 3\)"):
    R.tracks(ans, NF, qp[:, :2])
  with pytest.raises(ValueError, match="does not exist"):
    R.tracks(ans, NF, qp, t_cam=NF)


def test_dense_tracking_covers_every_pixel_with_fewer_starts():
  sc, ans = ROOM, oracle(ROOM)
  out = R.dense_tracks(ans, NF, (H, W), batch=256)
  assert out["visited"].all()
  m = len(out["starts"])
  assert out["points"].shape == (m, NF, 3) and out["num_queries"] == m * NF
  assert m < 0.5 * NF * H * W, m  # the camera orbits: most pixels are crossed by earlier tracks
  # every track passes through its start: at its own frame it is the start pixel's point
  ts = out["starts"][:, 0].astype(int)
  u = np.floor(out["starts"][:, 1] * W).astype(int)
  v = np.floor(out["starts"][:, 2] * H).astype(int)
  np.testing.assert_allclose(out["points"][np.arange(m), ts, 2], sc["depth"][ts, v, u], rtol=1e-5)
  # the starts are unique pixels
  assert len({(a, b, c) for a, b, c in zip(ts, u, v)}) == m


def test_long_video_chunks_aligned_by_sim3():
  sc = render_scene(7, 2, num_views=8, height=H, width=W, dynamic=True, num_tracks=16,
                    scene_type="room", trajectory="walk")
  scales = {0: 1.0, 2: 0.37, 4: 2.9, 6: 1.6}
  calls = []

  def answer_for(s, e):  # each chunk in its own first camera and its own arbitrary scale
    calls.append((s, e))
    return oracle(T.select_views(sc, np.arange(s, e)), scale=scales.get(s, 0.8))

  out = R.reconstruct_long(answer_for, 8, chunk=4, overlap=2, hw=(H, W), grid=(6, 8))
  assert out["chunks"] == [(0, 4), (2, 6), (4, 8)] == calls
  e = sc["extrinsics"].astype(np.float64)
  for t in range(8):
    np.testing.assert_allclose(out["extrinsics"][t], e[t] @ np.linalg.inv(e[0]), atol=5e-4)
  np.testing.assert_allclose(out["depth"], sc["depth"], rtol=1e-3, atol=1e-4)
  with pytest.raises(ValueError, match="overlap"):
    R.reconstruct_long(answer_for, 8, chunk=4, overlap=4, hw=(H, W))


def test_long_video_tracks_chained_across_chunks():
  """Tracks on a video of three chunks at arbitrary scales: queries in the first and in the last
  chunk follow their points over all 8 frames (forward and backward hand-overs), in the video's
  frame, as one oracle over the whole video says up to the half-pixel re-query of a hand-over."""
  sc = render_scene(7, 2, num_views=8, height=H, width=W, dynamic=True, num_tracks=16,
                    scene_type="room", trajectory="walk")
  scales = {0: 1.0, 2: 0.37, 4: 2.9, 6: 1.6}
  calls = []

  def answer_for(s, e):
    calls.append((s, e))
    return oracle(T.select_views(sc, np.arange(s, e)), scale=scales.get(s, 0.8))

  rec = R.reconstruct_long(answer_for, 8, chunk=4, overlap=2, hw=(H, W), grid=(6, 8))
  assert len(rec["sim3"]) == 3 and rec["sim3"][0][0] == 1.0
  # static pixels (segment -1) of frames 0 and 7, well inside the image
  pick = []
  for t in (0, 7):
    v, u = np.nonzero(sc["segment"][t] < 0)
    ok = (u > 2) & (u < W - 3) & (v > 2) & (v < H - 3)
    sel = np.random.default_rng(t).choice(np.flatnonzero(ok), 12, replace=False)
    pick += [(t, (u[j] + 0.5) / W, (v[j] + 0.5) / H) for j in sel]
  qp = np.array(pick)
  calls.clear()
  out = R.long_tracks(answer_for, 8, rec["chunks"], rec["sim3"], qp)
  assert out["points"].shape == (8, 24, 3) and np.isfinite(out["points"]).all()
  assert set(calls) == {(0, 4), (2, 6), (4, 8)}
  want = R.tracks(oracle(sc), 8, qp, t_cam=0)["points"]  # one clip: the camera-0 frame
  err = np.linalg.norm(out["points"] - want, axis=-1)
  # the query's own chunk is exact; hand-overs land within a pixel's footprint of the point
  np.testing.assert_allclose(out["points"][:4, :12], want[:4, :12], atol=1e-3)
  np.testing.assert_allclose(out["points"][4:, 12:], want[4:, 12:], atol=1e-3)
  footprint = 1.5 * sc["depth"].max() / sc["intrinsics"][0, 0, 0]
  assert err.max() < footprint, (err.max(), footprint)
  # without the Sim(3) the far chunk's 2.9x scale would be metres off
  raw = R.long_tracks(answer_for, 8, rec["chunks"], [(1.0, np.eye(3), np.zeros(3))] * 3, qp)
  assert np.linalg.norm(raw["points"] - want, axis=-1).max() > 5 * footprint
  assert (out["visibility"][:, :12] > 0.5).mean() > 0.5
  with pytest.raises(ValueError, match="does not exist"):
    R.long_tracks(answer_for, 8, rec["chunks"], rec["sim3"], np.array([[8, 0.5, 0.5]]))


def test_clip_answers_equal_direct_decoding():
  model = d4rt.D4RT.from_preset("d4rt-tiny", rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  video = rng.random((4, 64, 64, 3), dtype=np.float32)
  frames = rng.random((4, 96, 128, 3), dtype=np.float32)
  q = np.stack([rng.random(50), rng.random(50), rng.integers(0, 4, 50), rng.integers(0, 4, 50),
                rng.integers(0, 4, 50)], -1).astype(np.float32)
  direct = model(video[None], q[None], frames=frames[None], aspect=4 / 3)
  ans = R.ClipAnswers(model, video, frames=frames, aspect=4 / 3, chunk=16)
  a = ans(q)
  assert ans.num_queries == 50
  for k in ("points", "uv", "visibility", "confidence"):
    np.testing.assert_allclose(a[k], np.asarray(direct[k][0]), rtol=2e-5, atol=2e-6)
  # read-outs run on the model: shapes and finite values
  dm = R.depth_maps(ans, 4, (8, 8))
  assert dm["depth"].shape == (4, 8, 8) and np.isfinite(dm["depth"]).all()
  with pytest.raises(ValueError, match="frame 4"):
    ans(np.array([[0.5, 0.5, 4, 0, 0]], np.float32))


def test_track_video_frames_and_mp4(tmp_path):
  """``track_frames`` draws every frame (the tiles of ``draw_tracks`` are among them) and
  ``write_video`` writes an mp4 of odd-sized frames atomically (no temporary file left)."""
  import imageio.v3 as iio

  from geojax.data.formats import video
  from geojax.io import visualize
  rng = np.random.default_rng(0)
  frames = np.full((5, 61, 95, 3), 40, np.uint8)
  uv = rng.uniform(3, 58, (5, 4, 2))
  vis = np.ones((5, 4))
  vis[2, 1] = 0
  vid = visualize.track_frames(frames, uv, vis)
  assert vid.shape == frames.shape and (vid != 40).any(axis=-1).sum(axis=(1, 2)).min() > 0
  tiles = visualize.draw_tracks(frames, uv, vis, max_frames=5)
  np.testing.assert_array_equal(tiles, np.concatenate(list(vid), 1))
  path = tmp_path / "t.mp4"
  video.write_video(str(path), vid, fps=5)
  back = iio.imread(path)
  assert back.shape == (5, 62, 96, 3)  # padded to even sides
  err = np.abs(back[:, None, :61, :95].astype(int) - vid[None].astype(int)).mean(axis=(2, 3, 4))
  assert err.diagonal().max() < 8  # lossy, but each decoded frame is its own frame's picture
  assert (err.argmin(axis=1) == np.arange(5)).all()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["t.mp4"]
  with pytest.raises(ValueError, match="uint8"):
    video.write_video(str(tmp_path / "bad.mp4"), vid.astype(np.float32))
