"""Grain pipeline: determinism, host sharding, checkpointable state, exact intrinsics, buckets and
the per-family targets (URGT GridMix, D4RT queries, PPD depth encoding)."""

from __future__ import annotations

import numpy as np
import pytest

from geojax.data import transforms as T
from geojax.data.pipeline import (PipelineConfig, SyntheticSource, batch_plan, make_dataset,
                                  make_iterator, restore_iterator_state, save_iterator_state,
                                  to_global_batch)
from geojax.data.synthetic import render_scene

SRC = SyntheticSource(3, 6, 4, 40, 60)
CFG = PipelineConfig(buckets=((56, 84), (42, 84)), min_views=2, max_views=4, batch_size=2)


def _eq(a: dict, b: dict) -> bool:
  bad = [k for k in a if k not in b or not np.array_equal(a[k], b[k])]
  if bad or a.keys() != b.keys():
    print("differ:", bad, set(a) ^ set(b), a.get("scene_index"), b.get("scene_index"))
  return a.keys() == b.keys() and not bad


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_same_seed_identical_batches_and_static_bucket_shapes():
  a = _take(make_iterator(SRC, CFG, seed=5, process_index=0, process_count=1), 4)
  b = _take(make_iterator(SRC, CFG, seed=5, process_index=0, process_count=1), 4)
  c = _take(make_iterator(SRC, CFG, seed=6, process_index=0, process_count=1), 4)
  assert all(_eq(x, y) for x, y in zip(a, b))
  assert not all(_eq(x, y) for x, y in zip(a, c))
  shapes = set()
  for i, batch in enumerate(a):
    plan = batch_plan(CFG, 5, i)
    s, (h, w) = plan["num_views"], plan["bucket"]
    assert batch["images"].shape == (2, s, h, w, 3) and batch["images"].dtype == np.uint8
    assert batch["depth"].shape == (2, s, h, w) and batch["intrinsics"].shape == (2, s, 3, 3)
    assert h % 14 == 0 and w % 14 == 0
    shapes.add((s, h, w))
  plans = {(batch_plan(CFG, 5, i)["num_views"], batch_plan(CFG, 5, i)["bucket"]) for i in range(64)}
  assert {p[0] for p in plans} == {2, 3, 4} and {p[1] for p in plans} == {(56, 84), (42, 84)}


def test_host_shards_disjoint_and_cover_and_reshuffle():
  cfg = CFG.replace(batch_size=2, augment=False)
  seen = []
  for p in range(2):
    it = make_iterator(SRC, cfg, seed=1, process_index=p, process_count=2)
    # per host: 3 scenes per epoch, batch 1 -> one epoch = 3 batches; take two epochs
    idx = [int(next(it)["scene_index"][0]) for _ in range(6)]
    assert sorted(idx[:3]) == sorted(idx[3:])
    seen.append(set(idx[:3]))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(6))
  # single host: epochs are permutations of all scenes, reshuffled per epoch
  it = make_iterator(SRC, CFG.replace(batch_size=1), seed=2, process_index=0, process_count=1)
  idx = [int(next(it)["scene_index"][0]) for _ in range(18)]
  epochs = [idx[i:i + 6] for i in range(0, 18, 6)]
  assert all(sorted(e) == list(range(6)) for e in epochs)
  assert len({tuple(e) for e in epochs}) > 1


def test_eval_split_one_epoch_in_order():
  ds = make_dataset(SRC, CFG.replace(batch_size=2), seed=0, split="eval", process_index=0,
                    process_count=1)
  assert len(ds) == 3
  assert [int(i) for b in ds for i in b["scene_index"]] == list(range(6))


def test_state_save_restore_file_and_orbax(tmp_path):
  import grain
  import orbax.checkpoint as ocp

  it = make_iterator(SRC, CFG, seed=7, process_index=0, process_count=1)
  _take(it, 3)
  save_iterator_state(it, tmp_path / "it.json")
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = _take(it, 3)
  fresh = restore_iterator_state(make_iterator(SRC, CFG, seed=7, process_index=0, process_count=1),
                                 tmp_path / "it.json")
  assert all(_eq(x, y) for x, y in zip(expected, _take(fresh, 3)))
  fresh = make_iterator(SRC, CFG, seed=7, process_index=0, process_count=1)
  mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert all(_eq(x, y) for x, y in zip(expected, _take(fresh, 3)))
  mngr.close()


def test_state_restore_with_two_workers():
  small = SyntheticSource(4, 4, 3, 28, 42)
  cfg = PipelineConfig(buckets=((28, 42),), min_views=2, max_views=3, batch_size=1, num_workers=2,
                       worker_buffer_size=1)
  ref = _take(make_iterator(small, cfg.replace(num_workers=0), seed=3, process_index=0,
                            process_count=1), 5)
  it = make_iterator(small, cfg, seed=3, process_index=0, process_count=1)
  first = _take(it, 2)
  state = it.get_state()
  assert all(_eq(x, y) for x, y in zip(first, ref[:2]))
  resumed = make_iterator(small, cfg, seed=3, process_index=0, process_count=1, state=state)
  assert all(_eq(x, y) for x, y in zip(_take(resumed, 3), ref[2:]))


def _unproject(k, e, u, v, d):
  """World points (N, 3) of pixels (u, v) with z-depth d under K (3, 3), w2c e (4, 4)."""
  x = np.linalg.inv(k.astype(np.float64)) @ np.stack([u, v, np.ones_like(u)]).astype(np.float64) * d
  c2w = np.linalg.inv(e.astype(np.float64))
  return (c2w[:3, :3] @ x).T + c2w[:3, 3]


def test_intrinsics_exact_under_resize_and_crop():
  scene = render_scene(1, 0, num_views=2, height=20, width=30)
  rng = np.random.default_rng(0)
  u, v = rng.integers(0, 30, 50), rng.integers(0, 20, 50)
  d = scene["depth"][0, v, u]
  xw = _unproject(scene["intrinsics"][0], scene["extrinsics"][0], u, v, d)
  # any scale: project with the new camera -> s (x + 0.5) - 0.5 - offset
  for out_hw, (top, left) in (((50, 70), (3, 5)), ((13, 17), (2, 1)), ((60, 90), (7, 11))):
    new = T.crop_scene(T.resize_scene(scene, out_hw), top, left, (out_hw[0] - top, out_hw[1] - left))
    k2, e = new["intrinsics"][0].astype(np.float64), scene["extrinsics"][0].astype(np.float64)
    pc = xw @ e[:3, :3].T + e[:3, 3]
    uv = pc @ k2.T
    sx, sy = out_hw[1] / 30, out_hw[0] / 20
    np.testing.assert_allclose(uv[:, 0] / uv[:, 2], sx * (u + 0.5) - 0.5 - left, atol=1e-4)
    np.testing.assert_allclose(uv[:, 1] / uv[:, 2], sy * (v + 0.5) - 0.5 - top, atol=1e-4)
  # x3 upscale: new pixel 3x+1-offset is the centre of old pixel x; depth and 3-D point agree
  new = T.crop_scene(T.resize_scene(scene, (60, 90)), 4, 2, (50, 80))
  u2, v2 = 3 * u + 1 - 2, 3 * v + 1 - 4
  m = (u2 >= 0) & (u2 < 80) & (v2 >= 0) & (v2 < 50)
  np.testing.assert_array_equal(new["depth"][0, v2[m], u2[m]], d[m])
  np.testing.assert_array_equal(new["images"][0, v2[m], u2[m]], scene["images"][0, v[m], u[m]])
  x2 = _unproject(new["intrinsics"][0], new["extrinsics"][0], u2[m], v2[m], new["depth"][0, v2[m], u2[m]])
  np.testing.assert_allclose(x2, xw[m], atol=1e-4)


def test_pipeline_depth_consistent_with_intrinsics():
  # 40x60 -> bucket 56x84 (x1.4) and 42x84 (x1.4 then crop): every pixel's point lies within half
  # a source pixel of the point its nearest source pixel sees (nearest depth, no mixing).
  batch = make_dataset(SRC, CFG.replace(augment=False), seed=0, process_index=0, process_count=1)[0]
  depth, k = batch["depth"][0, 0], batch["intrinsics"][0, 0].astype(np.float64)
  assert np.isin(depth, SRC[int(batch["scene_index"][0])]["depth"]).all()
  v, u = np.mgrid[0:depth.shape[0], 0:depth.shape[1]]
  rays = np.linalg.inv(k) @ np.stack([u.ravel(), v.ravel(), np.ones(u.size)])
  fx = k[0, 0]
  assert np.abs(rays[0] * fx - (u.ravel() - k[0, 2])).max() < 1e-6
  assert (depth[batch["valid"][0, 0]] > 0).all() and (depth[~batch["valid"][0, 0]] == 0).all()


def test_gridmix_probabilities_and_crop():
  rng = np.random.default_rng(0)
  draws = np.array([T.sample_gridmix(rng) for _ in range(4000)])
  freq = np.bincount(draws, minlength=5)[1:] / draws.size
  np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.025)
  cfg = CFG.replace(family="urgt", buckets=((56, 112),), augment=False)
  ds = make_dataset(SRC, cfg, seed=0, process_index=0, process_count=1)
  ns = []
  for i in range(6):
    b = ds[i]
    n = batch_plan(cfg, 0, i)["grid_n"]
    ns.append(n)
    assert b["images"].shape[2:4] == (14 * n, 28 * n) and (b["grid_n"] == n).all()
    assert (b["grid_origin"] >= 0).all() and (b["grid_origin"] + n <= 4).all()
  scene = T.fit_to_bucket(SRC[0], (56, 112))
  crop = T.gridmix_crop(scene, 2, np.random.default_rng(1))
  r0, c0 = crop["grid_origin"]
  np.testing.assert_array_equal(crop["depth"], scene["depth"][:, 14 * r0:14 * r0 + 28, 28 * c0:28 * c0 + 56])
  np.testing.assert_allclose(crop["intrinsics"][:, :2, 2], scene["intrinsics"][:, :2, 2] - [28 * c0, 14 * r0])


def test_d4rt_queries():
  cfg = CFG.replace(family="d4rt", buckets=((56, 84),), augment=False, min_views=4, max_views=4,
                    batch_size=1)
  # native bucket resolution: nearest up-sampling would put staircases on every slanted surface
  src = SyntheticSource(3, 2, 4, 56, 84)
  b = make_dataset(src, cfg, seed=0, process_index=0, process_count=1)[0]
  q, pts, ok = b["queries"][0], b["query_points"][0], b["query_valid"][0]
  assert q.shape == (2048, 5) and ok.all()
  assert abs(b["query_near_edge"][0].mean() - 0.3) < 0.01
  assert abs((q[:, 3] == q[:, 4]).mean() - 0.4) < 0.05
  assert (q[:, :2] > 0).all() and (q[:, :2] < 1).all()
  edges = T.query_boundaries(b["depth"][0], b["valid"][0])
  px = b["query_pixels"][0]
  near = b["query_near_edge"][0]
  ts = q[:, 2].astype(int)
  assert edges[ts[near], px[near, 1], px[near, 0]].all()
  assert edges[ts, px[:, 1], px[:, 0]].mean() < 0.6  # the rest is uniform, not all boundary
  # GT: project each point into t_cam's camera; where it is visible, its depth matches the map
  k, e = b["intrinsics"][0].astype(np.float64), b["extrinsics"][0].astype(np.float64)
  tc = q[:, 4].astype(int)
  uvw = np.einsum("nij,nj->ni", k[tc], pts.astype(np.float64))
  uu, vv = uvw[:, 0] / uvw[:, 2], uvw[:, 1] / uvw[:, 2]
  same_src = ts == tc
  np.testing.assert_allclose(uu[same_src], px[same_src, 0], atol=1e-3)
  np.testing.assert_allclose(pts[same_src, 2], b["depth"][0][ts, px[:, 1], px[:, 0]][same_src], rtol=1e-5)
  # any camera: the world point equals the unprojection in t_src
  xw = np.einsum("nij,nj->ni", np.linalg.inv(e[tc])[:, :3, :3], pts) + np.linalg.inv(e[tc])[:, :3, 3]
  d = b["depth"][0][ts, px[:, 1], px[:, 0]]
  for t in range(4):
    m = ts == t
    np.testing.assert_allclose(xw[m], _unproject(k[t], e[t], px[m, 0], px[m, 1], d[m]), atol=1e-3)


def test_ppd_encoding_range_and_inverse():
  scene = SRC[0]
  # ppd: clip(x, -0.5, 1) - 0.5 reaches -1 only for depths far below the 2 % quantile
  for rng_name, lo, hi, q2 in (("symmetric", -1, 1, -1), ("unit", 0, 1, 0), ("ppd", -1, 0.5, -0.5)):
    enc, q_lo, q_hi = T.encode_depth_ppd(scene["depth"], scene["valid"], out_range=rng_name)
    assert enc.min() >= lo and np.isclose(enc.max(), hi)
    mask = scene["valid"] & (scene["depth"] < 80)
    assert np.isclose(np.quantile(enc[0][mask[0]], 0.02), q2, atol=1e-3)
    assert (enc[~scene["valid"]] == lo).all()
    l = np.log(scene["depth"].astype(np.float64) + 1)
    np.testing.assert_allclose(q_lo, [np.quantile(x[m], 0.02) for x, m in zip(l, mask)], rtol=1e-5)
    np.testing.assert_allclose(q_hi, [np.quantile(x[m], 0.98) for x, m in zip(l, mask)], rtol=1e-5)
    inside = (l >= q_lo[:, None, None]) & (l <= q_hi[:, None, None]) & scene["valid"]
    dec = T.decode_depth_ppd(enc, q_lo, q_hi, rng_name)
    np.testing.assert_allclose(dec[inside], scene["depth"][inside], rtol=1e-4)
  cfg = CFG.replace(family="ppd", augment=False)
  b = make_dataset(SRC, cfg, seed=0, process_index=0, process_count=1)[0]
  assert b["depth_encoded"].shape == b["depth"].shape and b["depth_q_lo"].shape == b["depth"].shape[:2]


def test_color_jitter_consistent_across_views():
  img = np.stack([SRC[0]["images"][0]] * 2)
  params = T.sample_color_jitter(np.random.default_rng(0), 0.3, 0.3, 0.3, 0.05)
  out = T.apply_color_jitter(img, params)
  assert out.dtype == np.uint8 and np.array_equal(out[0], out[1]) and not np.array_equal(out, img)
  np.testing.assert_array_equal(T.apply_color_jitter(img, np.array([1, 1, 1, 0], np.float32)), img)


@pytest.mark.parametrize("kw, field", [
    (dict(min_views=5, max_views=3), "min_views"),
    (dict(buckets=((56, 80),)), "buckets"),
    (dict(family="urgt", buckets=((56, 84),)), "buckets"),
    (dict(view_order="sideways"), "view_order"),
    (dict(family="nope"), "family"),
    (dict(gridmix_probs=(0.5, 0.5)), "gridmix_probs"),
    (dict(ppd_range="nope"), "ppd_range"),
    (dict(num_workers=-1), "num_workers"),
])
def test_bad_config_names_field(kw, field):
  with pytest.raises(ValueError, match=field):
    PipelineConfig(**kw)


def test_to_global_batch_on_mesh():
  import jax
  from geojax.parallel.sharding import make_mesh

  mesh = make_mesh()
  n = jax.device_count()
  batch = make_dataset(SRC, CFG.replace(batch_size=n), seed=0, process_index=0, process_count=1)[0]
  arrs = to_global_batch(batch, mesh)
  assert arrs["images"].shape == batch["images"].shape
  np.testing.assert_array_equal(np.asarray(arrs["depth"]), batch["depth"])
