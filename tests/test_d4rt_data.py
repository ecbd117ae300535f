"""D4RT training data and objective: exact query targets from the dynamic synthetic scenes (the
pipeline's ``d4rt`` path) and the composite per-query loss (``geojax.losses.d4rt``)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from geojax.data import transforms as T  # noqa: E402
from geojax.data.pipeline import PipelineConfig, SyntheticSource, make_dataset  # noqa: E402
from geojax.data.synthetic import render_scene  # noqa: E402
from geojax.losses import d4rt as L  # noqa: E402

H, W, S = 48, 64, 5
SCENE = render_scene(4, 2, num_views=S, height=H, width=W, dynamic=True, num_tracks=400,
                     scene_type="open")


def _project(k, e, x):
  pc = x @ e[:3, :3].T + e[:3, 3]
  uvw = pc @ k.T
  return uvw[:, :2] / uvw[:, 2:], pc[:, 2]


def test_targets_exact_motion_against_tracks():
  """Each visible GT track, queried at its pixel, moves rigidly with its object: the query's
  point stays at the same distance from the track at every time, and static pixels stay put."""
  sc = SCENE
  tr, vis = sc["tracks"].astype(np.float64), sc["track_visible"]
  k, e = sc["intrinsics"].astype(np.float64), sc["extrinsics"].astype(np.float64)
  checked = 0
  for t0 in range(S):
    sel = np.flatnonzero(vis[t0])
    uv, _ = _project(k[t0], e[t0], tr[t0, sel])
    u, v = np.clip(np.rint(uv).astype(int), 0, [W - 1, H - 1]).T
    for t1 in range(S):
      tg = T.d4rt_targets(sc, u, v, np.full(u.size, t0), np.full(u.size, t1), np.full(u.size, t1))
      src = T.d4rt_targets(sc, u, v, np.full(u.size, t0), np.full(u.size, t0), np.full(u.size, t1))
      assert tg["exact"]
      g1 = tr[t1, sel] @ e[t1, :3, :3].T + e[t1, :3, 3]
      g0 = tr[t0, sel] @ e[t1, :3, :3].T + e[t1, :3, 3]
      same = sc["segment"][t0, v, u] >= 0  # the pixel shows a moving object
      d1 = np.linalg.norm(tg["points"] - g1, axis=-1)
      d0 = np.linalg.norm(src["points"] - g0, axis=-1)
      ok = same & (d0 < 0.05)  # the pixel's point is the track's neighbour on its object
      np.testing.assert_allclose(d1[ok], d0[ok], atol=2e-4)
      # displacement = X(t1) - X(t0) in the t_cam frame
      np.testing.assert_allclose(tg["displacement"], tg["points"] - src["points"], atol=1e-4)
      checked += ok.sum()
  assert checked > 200
  # the static background never moves: displacement exactly zero; objects do move
  u, v = np.meshgrid(np.arange(W), np.arange(H))
  u, v = u.ravel(), v.ravel()
  n = u.size
  tg = T.d4rt_targets(sc, u, v, np.zeros(n), np.full(n, S - 1), np.zeros(n))
  bg = (sc["segment"][0].ravel() < 0) & tg["valid"]
  assert bg.sum() > 100 and np.abs(tg["displacement"][bg]).max() == 0
  assert np.linalg.norm(tg["displacement"][~bg & tg["valid"]], axis=-1).max() > 0.05


def test_targets_same_frame_uv_normal_visibility():
  sc = SCENE
  u, v = np.meshgrid(np.arange(W), np.arange(H))
  u, v = u.ravel(), v.ravel()
  n = u.size
  for t in (0, 3):
    tt = np.full(n, t)
    tg = T.d4rt_targets(sc, u, v, tt, tt, tt)
    ok = tg["valid"]
    np.testing.assert_array_equal(ok, sc["valid"][t].ravel())
    # same frame: the point is the unprojected pixel, uv its own centre, visible, normal = map
    np.testing.assert_allclose(tg["points"][ok, 2], sc["depth"][t].ravel()[ok], rtol=1e-5)
    np.testing.assert_allclose(tg["uv"][ok], np.stack([(u + 0.5) / W, (v + 0.5) / H], -1)[ok],
                               atol=1e-5)
    assert tg["visible"][ok].mean() > 0.99
    np.testing.assert_allclose(tg["normal"][ok], sc["normals"][t].reshape(-1, 3)[ok], atol=1e-5)
  # other time: visible points project (uv) onto the rendered depth of frame t_tgt
  ts, tt = np.zeros(n), np.full(n, S - 1)
  tg = T.d4rt_targets(sc, u, v, ts, tt, tt)
  m = tg["visible"]
  assert 0.2 < m.mean() < 1.0
  x = np.clip(np.rint(tg["uv"][m] * [W, H] - 0.5).astype(int), 0, [W - 1, H - 1])
  d = sc["depth"][S - 1][x[:, 1], x[:, 0]]
  np.testing.assert_allclose(d, tg["points"][m, 2], rtol=T.VISIBILITY_RTOL + 1e-6)
  # occluded or out of view: not visible
  assert (~tg["visible"][tg["valid"]]).any()


def test_strided_views():
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(50):
    idx = T.sample_views(20, 4, rng, "strided")
    d = np.diff(idx)
    assert (d == d[0]).all() and d[0] >= 1 and idx[0] >= 0 and idx[-1] < 20
    seen.add(int(d[0]))
  assert seen == set(range(1, 7))


def test_pipeline_dynamic_queries():
  cfg = PipelineConfig(family="d4rt", buckets=((48, 48),), min_views=4, max_views=4,
                       batch_size=2, patch_size=16, num_queries=512, view_order="strided")
  src = SyntheticSource(5, 2, 6, 48, 64, dynamic=True)
  b = make_dataset(src, cfg, seed=0, process_index=0, process_count=1)[0]
  assert b["queries"].shape == (2, 512, 5) and b["images"].shape == (2, 4, 48, 48, 3)
  for key, shape in (("query_points", (3,)), ("query_uv", (2,)), ("query_visible", ()),
                     ("query_displacement", (3,)), ("query_normal", (3,)),
                     ("query_normal_valid", ()), ("query_uv_valid", ())):
    assert b[key].shape == (2, 512) + shape, key
  assert b["query_exact"].all()
  # targets are those of the cropped clip the model sees: same-frame queries land on its depth
  for i in range(2):
    q, px = b["queries"][i], b["query_pixels"][i]
    ts, tc = q[:, 2].astype(int), q[:, 4].astype(int)
    m = (ts == tc) & (q[:, 3].astype(int) == ts) & b["query_valid"][i]
    assert m.sum() > 10
    np.testing.assert_allclose(b["query_points"][i][m, 2], b["depth"][i][ts[m], px[m, 1], px[m, 0]],
                               rtol=1e-5)


def test_crop_box_area_and_log_uniform_aspect():
  rng = np.random.default_rng(0)
  boxes = np.array([T.sample_crop_box(rng, (300, 300), (0.3, 0.6), (0.75, 4 / 3))
                    for _ in range(4000)])
  top, left, ch, cw = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (top + ch <= 300).all() and (left + cw <= 300).all()
  area, log_r = ch * cw / 300 ** 2, np.log(cw / ch)
  assert area.min() > 0.29 and area.max() < 0.61 and abs(area.mean() - 0.45) < 0.01
  assert log_r.min() > np.log(0.74) and log_r.max() < np.log(4 / 3 * 1.01)
  # log-uniform: mean log-aspect 0 and mean aspect (4/3 - 3/4) / log(16/9) = 1.0138, where a
  # uniform aspect would give 1.0417
  assert abs(log_r.mean()) < 0.015 and abs(np.mean(cw / ch) - 1.0138) < 0.008
  box = T.sample_crop_box(rng, (200, 300), (0.3, 1.0), (0.75, 4 / 3))
  assert box[0] + box[2] <= 200 and box[1] + box[3] <= 300
  # an impossible request falls back to the largest centred crop of the middle aspect
  assert T.sample_crop_box(rng, (10, 100), (0.9, 1.0), (1.0, 1.0)) == (0, 45, 10, 10)


def test_crop_resize_views_keeps_geometry_exact():
  """Per-view boxes (a zoom-in) resized to a square: every GT track projects, with the new
  per-view intrinsics, to where its old position lands after crop and resize; per-pixel depth stays
  the depth of the source pixel (nearest)."""
  sc = SCENE
  box = (6, 10, 30, 40)
  boxes = T.zoom_boxes(box, S, 0.6, (H, W))
  assert tuple(boxes[0]) == box and boxes[-1, 2] == 18 and boxes[-1, 3] == 24
  assert (np.diff(boxes[:, 2]) <= 0).all()
  out = T.crop_resize_views(sc, boxes, (32, 32))
  assert out["images"].shape == (S, 32, 32, 3) and out["depth"].shape == (S, 32, 32)
  for i in range(S):
    t, l, ch, cw = boxes[i]
    x = sc["tracks"][i].astype(np.float64)
    uv0, _ = _project(sc["intrinsics"][i].astype(np.float64), sc["extrinsics"][i], x)
    uv1, _ = _project(out["intrinsics"][i].astype(np.float64), out["extrinsics"][i], x)
    # pixel centres at integers: u' + 1/2 = (u - left + 1/2) * 32 / width
    np.testing.assert_allclose(uv1, (uv0 - [l, t] + 0.5) * [32 / cw, 32 / ch] - 0.5, atol=1e-3)
    src = T.resize_nearest(sc["depth"][i:i + 1, t:t + ch, l:l + cw], (32, 32))[0]
    np.testing.assert_array_equal(out["depth"][i], src)
  # one box for all views takes the batched path and agrees with the per-view one
  same = T.crop_resize_views(sc, np.tile(box, (S, 1)), (32, 32))
  np.testing.assert_array_equal(same["images"][0], out["images"][0])
  np.testing.assert_allclose(same["intrinsics"][0], out["intrinsics"][0], rtol=1e-6)


def test_photometric_drop_and_blur():
  img = SCENE["images"][:2]
  grey = T.color_drop(img)
  assert grey.dtype == np.uint8 and (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
  want = img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
  assert np.abs(grey[..., 0] - want).max() <= 0.5 + 1e-3
  blur = T.random_blur(img, 1.5)
  assert blur.shape == img.shape and blur.dtype == np.uint8
  # a blur lowers the image's high frequencies and keeps its mean; the two views get the same one
  hf = lambda x: np.abs(np.diff(x.astype(np.float32), axis=2)).mean()
  assert hf(blur) < 0.7 * hf(img) and abs(blur.mean() - img.mean()) < 1.0
  np.testing.assert_array_equal(T.random_blur(img[1:], 1.5), blur[1:])


def test_pipeline_d4rt_augmentation():
  """The paper's augmentations in the pipeline: a random-resized (zooming) crop, colour drop and
  blur, with the query targets still exact for the clip the model sees and the box's aspect
  ratio in the batch; bad values name the field."""
  cfg = PipelineConfig(family="d4rt", buckets=((48, 48),), min_views=4, max_views=4,
                       batch_size=4, patch_size=16, num_queries=256, view_order="strided",
                       crop_area=(0.3, 1.0), zoom_prob=1.0, color_drop_prob=1.0, blur_prob=1.0)
  src = SyntheticSource(5, 4, 6, 48, 64, dynamic=True)
  b = make_dataset(src, cfg, seed=0, process_index=0, process_count=1)[0]
  im = b["images"].astype(int)
  assert (im[..., 0] == im[..., 1]).all()  # colour drop
  assert b["aspect"].shape == (4,) and (b["aspect"] > 0.74).all() and (b["aspect"] < 1.34).all()
  assert len(set(np.round(b["aspect"], 4))) > 1
  for i in range(4):
    q, px = b["queries"][i], b["query_pixels"][i]
    ts, tc = q[:, 2].astype(int), q[:, 4].astype(int)
    m = (ts == tc) & (q[:, 3].astype(int) == ts) & b["query_valid"][i]
    assert m.sum() > 5
    np.testing.assert_allclose(b["query_points"][i][m, 2],
                               b["depth"][i][ts[m], px[m, 1], px[m, 0]], rtol=1e-5)
    # a zoom-in: the focal length grows over the clip
    f = b["intrinsics"][i][:, 0, 0]
    assert f[-1] > 1.05 * f[0]
  plain = make_dataset(src, cfg.replace(crop_area=None), seed=0, process_index=0,
                       process_count=1)[0]
  np.testing.assert_allclose(plain["aspect"], 1.0)
  for kw, field in ((dict(crop_area=(0.0, 1.0)), "crop_area"), (dict(blur_prob=1.5), "blur_prob"),
                    (dict(crop_aspect=(2.0, 1.0)), "crop_aspect"),
                    (dict(zoom_factor=(0.5, 1.5)), "zoom_factor"), (dict(crop_area="big"), "crop_area")):
    with pytest.raises(ValueError, match=f"PipelineConfig.{field}"):
      cfg.replace(**kw)


# ----------------------------------------------------------------------------- loss


def _pred_from_targets(batch, scale=1.0):
  p = {"points": scale * batch["query_points"], "uv": batch["query_uv"],
       "visibility_logit": jnp.where(batch["query_visible"], 30.0, -30.0),
       "displacement": scale * batch["query_displacement"], "normal": batch["query_normal"],
       "confidence": jnp.ones(batch["query_valid"].shape)}
  return p


def _batch(seed=0, b=2, n=64):
  rng = np.random.default_rng(seed)
  pts = rng.uniform([-1, -1, 1], [1, 1, 4], (b, n, 3)).astype(np.float32)
  nrm = rng.normal(size=(b, n, 3))
  nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True)
  return {"query_points": pts, "query_valid": rng.random((b, n)) < 0.8,
          "query_uv": rng.random((b, n, 2)).astype(np.float32), "query_uv_valid": rng.random((b, n)) < 0.9,
          "query_visible": rng.random((b, n)) < 0.5,
          "query_displacement": rng.normal(size=(b, n, 3)).astype(np.float32) * 0.1,
          "query_normal": nrm.astype(np.float32), "query_normal_valid": rng.random((b, n)) < 0.9}


def test_loss_zero_at_truth_and_scale_invariant():
  batch = _batch()
  for s in (1.0, 3.7):
    out = L.d4rt_loss(_pred_from_targets(batch, s), batch)
    for k in ("3d", "2d", "disp", "normal", "conf", "l3d"):
      assert abs(float(out[k])) < 1e-5, (k, float(out[k]))
    assert float(out["vis"]) < 1e-6
  assert float(out["valid"]) == pytest.approx(batch["query_valid"].sum(-1).mean())


def test_loss_value_by_hand():
  batch = _batch(1, b=1, n=32)
  rng = np.random.default_rng(2)
  pred = {"points": batch["query_points"] * 2 + rng.normal(size=(1, 32, 3)).astype(np.float32) * 0.2,
          "uv": rng.random((1, 32, 2)).astype(np.float32),
          "visibility_logit": rng.normal(size=(1, 32)).astype(np.float32),
          "displacement": rng.normal(size=(1, 32, 3)).astype(np.float32),
          "normal": batch["query_normal"][:, ::-1].copy(),
          "confidence": 1 + np.exp(rng.normal(size=(1, 32))).astype(np.float32)}
  out = L.d4rt_loss(pred, batch)
  v = batch["query_valid"][0]
  P, G = pred["points"][0].astype(np.float64), batch["query_points"][0].astype(np.float64)
  sp, sg = np.abs(P[v, 2]).mean(), G[v, 2].mean()
  sl = lambda x: np.sign(x) * np.log1p(np.abs(x))  # noqa: E731
  l3d = np.abs(sl(P / sp) - sl(G / sg)).sum(-1)
  c = pred["confidence"][0]
  uvm = v & batch["query_uv_valid"][0]
  l2d = np.abs(pred["uv"][0] - batch["query_uv"][0]).sum(-1)
  z, y = pred["visibility_logit"][0].astype(np.float64), batch["query_visible"][0]
  bce = -(y * np.log(1 / (1 + np.exp(-z))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-z))))
  disp = np.abs(pred["displacement"][0] / sp - batch["query_displacement"][0] / sg).sum(-1)
  nm = v & batch["query_normal_valid"][0]
  cos = (pred["normal"][0] * batch["query_normal"][0]).sum(-1)
  nv = v.sum()
  want = {"3d": (c * l3d)[v].sum() / nv, "conf": -0.2 * np.log(c)[v].sum() / nv,
          "2d": 0.1 * l2d[uvm].sum() / nv, "vis": 0.1 * bce[v].sum() / nv,
          "disp": 0.1 * disp[v].sum() / nv, "normal": 0.5 * (1 - cos)[nm].sum() / nv}
  for k, val in want.items():
    assert float(out[k]) == pytest.approx(val, rel=1e-5, abs=1e-7), k
  assert float(out["total"]) == pytest.approx(sum(want.values()), rel=1e-5)
  # invalid queries do not count: changing their predictions changes nothing
  pred2 = dict(pred, points=np.where(v[None, :, None], pred["points"], 1e3).astype(np.float32))
  assert float(L.d4rt_loss(pred2, batch)["total"]) == pytest.approx(float(out["total"]), rel=1e-6)
  # a higher confidence on a query with a large error raises the loss; gradients are finite
  grads = jax.grad(lambda p: L.d4rt_loss(dict(pred, points=p), batch)["total"])(pred["points"])
  assert np.isfinite(np.asarray(grads)).all() and np.abs(np.asarray(grads)).max() > 0
  with pytest.raises(ValueError, match="unknown weights"):
    L.d4rt_loss(pred, batch, {"depth": 1.0})
