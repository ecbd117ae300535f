"""D4RT as a family: ``geojax predict`` on a short video (depth, cameras, point cloud, 3D tracks
and their pictures; ``--queries``), ``evaluate.py`` on dynamic synthetic scenes and on a
TAPVid-3D-format file, the training task, and bad inputs (one line each)."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from geojax.data.formats import tapvid3d
from geojax.data.synthetic import render_scene
from geojax.families import d4rt as fam
from geojax.io import checkpoint
from geojax.models import d4rt, registry
from geojax.predict import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
H, W, NF = 40, 56, 5


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  root = tmp_path_factory.mktemp("d4rt")
  model = d4rt.D4RT.from_preset("d4rt-tiny", rngs=nnx.Rngs(0))
  out = {"d4rt": checkpoint.save_model(str(root / "d4rt"), model, "d4rt",
                                       {"preset": "d4rt-tiny", "overrides": {}})}
  return out


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  d = tmp_path_factory.mktemp("clip") / "clip"
  d.mkdir()
  sc = render_scene(2, 1, num_views=NF, height=H, width=W, dynamic=True)
  for i in range(NF):
    Image.fromarray(sc["images"][i]).save(d / f"f{i:03d}.png")
  return d


def test_family_registered():
  f = registry.get_family("d4rt")
  assert all(registry.family_for_preset(p) is f for p in d4rt.PRESET_NAMES)
  assert "tracks" in f.predicts({"preset": "d4rt-tiny"})


def test_predict_video_end_to_end(ckpts, clip, tmp_path, capsys):
  out = tmp_path / "out"
  code = cli.main(["--weights", ckpts["d4rt"], "--out", str(out), "--no-progress",
                   "--resolution", "0", "--track-grid", "3", str(clip)])
  assert code == 0, capsys.readouterr().err
  root = out / "clip"
  d = np.stack([np.load(root / "depth" / f"f{i:03d}.npy") for i in range(NF)])
  assert d.shape == (NF, H, W) and np.isfinite(d).all()
  tr = np.load(root / "tracks.npz")
  assert tr["tracks"].shape == (NF, 9, 3) and tr["visibility"].shape == (NF, 9)
  np.testing.assert_allclose(tr["queries"][:, 0], 0)
  assert (root / "tracks.png").is_file()
  import imageio.v3 as iio  # the video extra is part of make test's install
  mp4 = iio.imread(root / "tracks.mp4")
  assert mp4.shape[0] == NF and mp4.shape[-1] == 3 and mp4.std() > 0
  files = {p.name for p in root.iterdir()}
  assert any(n.endswith(".ply") for n in files), files  # the point cloud
  # --queries: the exported queries track the same points
  code = cli.main(["--weights", ckpts["d4rt"], "--out", str(tmp_path / "out2"), "--no-progress",
                   "--resolution", "0", "--queries", str(root / "tracks.npz"), str(clip)])
  assert code == 0, capsys.readouterr().err
  tr2 = np.load(tmp_path / "out2" / "clip" / "tracks.npz")
  np.testing.assert_allclose(tr2["tracks"], tr["tracks"], rtol=1e-4, atol=1e-5)


def test_predict_long_video_in_chunks(ckpts):
  """A video longer than the 8-frame clip runs as overlapping clips (Sim(3)-aligned), its
  tracks chained across them."""
  model, _, _ = registry.load_checkpoint(ckpts["d4rt"])
  sc = render_scene(2, 3, num_views=13, height=32, width=32, dynamic=True)
  pred = fam.predict(model, list(sc["images"]), resolution=0, track_grid=2)
  assert pred.depth.shape == (13, 32, 32) and np.isfinite(pred.depth).all()
  assert pred.extrinsics.shape == (13, 4, 4) and np.isfinite(pred.extrinsics).all()
  np.testing.assert_allclose(pred.extrinsics[0], np.eye(4), atol=1e-4)
  # tracks of a 2 x 2 grid of frame 0, chained over both clips
  assert pred.tracks.shape == (13, 4, 3) and np.isfinite(pred.tracks).all()
  assert pred.track_visibility.shape == (13, 4) and not pred.warnings


@pytest.mark.parametrize("extra,needle", [
    (["--query-chunk", "0"], "--query-chunk must be >= 1"),
    (["--keep", "0"], "--keep must be in (0, 1]"),
    (["--queries", "{bad_frame}"], "the video has frames 0 .. 4"),
    (["--queries", "{missing}"], "no such file"),
    (["--queries", "{no_key}"], "no 'queries' array"),
])
def test_bad_inputs_one_line(ckpts, clip, tmp_path, capsys, extra, needle):
  np.savez(tmp_path / "bad_frame.npz", queries=np.array([[7.0, 3.0, 3.0]]))
  np.savez(tmp_path / "no_key.npz", points=np.zeros((2, 3)))
  paths = {"bad_frame": tmp_path / "bad_frame.npz", "no_key": tmp_path / "no_key.npz",
           "missing": tmp_path / "nope.npz"}
  extra = [a.format(**paths) for a in extra]
  code = cli.main(["--weights", ckpts["d4rt"], "--out", str(tmp_path / "out"), "--no-progress",
                   *extra, str(clip)])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and needle in err[0], err


def test_one_frame_video_refused(ckpts, clip, tmp_path, capsys):
  one = tmp_path / "one"
  one.mkdir()
  Image.open(clip / "f000.png").save(one / "a.png")
  code = cli.main(["--weights", ckpts["d4rt"], "--out", str(tmp_path / "o"), "--no-progress",
                   str(one / "a.png")])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "at least 2 frames" in err[0], err


def test_evaluate_synthetic_and_tapvid3d(ckpts, tmp_path):
  import evaluate
  from configs import evaluate as eval_config
  cfg = eval_config.get_config("d4rt-tiny")
  cfg.model.checkpoint = ckpts["d4rt"]
  cfg.data.update(num_scenes=1, num_views=4, height=32, width=32, dynamic=True)
  cfg.metrics = "depth,pose,track"
  cfg.out_dir = str(tmp_path / "eval")
  mean = evaluate.evaluate(cfg)["mean"]
  for key in ("abs_rel", "ate", "track_apd3d", "track_average_jaccard",
              "track_occlusion_accuracy"):
    assert key in mean and np.isfinite(mean[key]), key
  # a TAPVid-3D file in the official layout, made from a synthetic scene's camera-frame tracks
  sc = render_scene(3, 0, num_views=4, height=32, width=48, dynamic=True, num_tracks=20)
  e, k = sc["extrinsics"].astype(np.float64), sc["intrinsics"][0]
  cam = np.einsum("tij,tnj->tni", e[:, :3, :3], sc["tracks"]) + e[:, None, :3, 3]
  vis = sc["track_visible"]
  keep = vis.any(0)
  t0 = np.argmax(vis, 0)[keep]
  x = cam[t0, np.flatnonzero(keep)]
  uv = x[:, :2] / x[:, 2:] * [k[0, 0], k[1, 1]] + [k[0, 2], k[1, 2]]
  f = tmp_path / "tap" / "adt" / "video_0.npz"
  f.parent.mkdir(parents=True)
  tapvid3d.write_tapvid3d(str(f), sc["images"], cam[:, keep], vis[:, keep],
                          np.concatenate([uv, t0[:, None]], 1), (k[0, 0], k[1, 1], k[0, 2], k[1, 2]))
  scene = tapvid3d.read_tapvid3d(str(f))
  np.testing.assert_allclose(scene["tracks"][vis[:, keep]], cam[:, keep][vis[:, keep]], rtol=1e-6)
  np.testing.assert_allclose(scene["track_queries"][:, 0], t0)
  assert scene["images"].shape == (4, 32, 48, 3)
  cfg2 = eval_config.get_config("d4rt-tiny")
  cfg2.model.checkpoint = ckpts["d4rt"]
  cfg2.data.update(source="tapvid3d", path=str(tmp_path / "tap"))
  cfg2.metrics = "all"
  cfg2.out_dir = str(tmp_path / "eval2")
  res = evaluate.evaluate(cfg2)
  assert res["scenes"][0]["scene"] == os.path.join("adt", "video_0")
  assert set(k for k in res["mean"] if not k.startswith("track_")) == set()
  assert np.isfinite(res["mean"]["track_apd3d"])
  # a file missing a key, or with an object array, is refused with its name
  np.savez(tmp_path / "broken.npz", intrinsics=np.ones(4))
  with pytest.raises(ValueError, match="missing images_jpeg_bytes"):
    tapvid3d.read_tapvid3d(str(tmp_path / "broken.npz"))


def test_evaluate_refuses_checkpoint_of_another_family(ckpts, tmp_path):
  import subprocess
  other = registry.get_family("ppd").build({"preset": "ppd-tiny", "overrides": {}}, nnx.Rngs(0))
  ck = checkpoint.save_model(str(tmp_path / "ppd"), other, "ppd",
                             {"preset": "ppd-tiny", "overrides": {}})
  r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"),
                      "--config=configs/evaluate.py:d4rt-tiny", f"--config.model.checkpoint={ck}",
                      f"--config.out_dir={tmp_path / 'e'}"], cwd=ROOT, capture_output=True,
                     text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  lines = [l for l in r.stderr.strip().splitlines() if l.startswith("evaluate.py: error")]
  assert r.returncode == 2 and len(lines) == 1 and "'ppd' model, not a 'd4rt'" in lines[0], r.stderr


def test_training_task_masks_nonfinite_and_checks_config():
  from configs import d4rt as d4rt_config
  from geojax.data.pipeline import PipelineConfig, SyntheticSource, make_dataset
  cfg = d4rt_config.get_config("runlocal")
  task = fam.make_task(cfg)
  pipe = PipelineConfig(family="d4rt", buckets=((64, 64),), min_views=8, max_views=8,
                        batch_size=2, patch_size=16, num_queries=256, view_order="strided")
  b = make_dataset(SyntheticSource(0, 2, 10, 64, 64, dynamic=True), pipe, seed=0,
                   process_index=0, process_count=1)[0]
  model = d4rt.D4RT.from_preset("d4rt-tiny", rngs=nnx.Rngs(0))
  loss, aux = task.loss_fn(model, b, jax.random.key(0))
  assert np.isfinite(float(loss)) and float(aux["nonfinite_queries"]) == 0
  bad = dict(b, query_points=b["query_points"].copy())
  bad["query_points"][0, :10] = np.nan
  loss2, aux2 = task.loss_fn(model, bad, jax.random.key(0))
  assert np.isfinite(float(loss2)) and float(aux2["nonfinite_queries"]) == 10
  g = nnx.grad(lambda m: task.loss_fn(m, bad, jax.random.key(0))[0])(model)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))
  for path, value, needle in ((("data", "pipeline", "buckets"), ((64, 96),), "square"),
                              (("data", "pipeline", "max_views"), 9, "fixed number"),
                              (("data", "pipeline", "family"), "da3", "family = 'd4rt'")):
    c = d4rt_config.get_config("runlocal")
    node = c
    for p in path[:-1]:
      node = node[p]
    node[path[-1]] = value
    with pytest.raises(ValueError, match=needle):
      fam.make_task(c)
