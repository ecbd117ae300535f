"""evaluate.py end to end on the built-in synthetic scenes with a small random DA3."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import evaluate  # noqa: E402
from configs import evaluate as eval_config  # noqa: E402

SMALL = ["--config.data.num_scenes=2", "--config.data.num_views=3", "--config.data.height=56",
         "--config.data.width=84", "--config.model.process_res=84"]


def small_config(out_dir, **over):
  cfg = eval_config.get_config("da3-small")
  cfg.data.num_scenes, cfg.data.num_views, cfg.data.height, cfg.data.width = 2, 3, 56, 84
  cfg.model.process_res = 84
  cfg.out_dir = str(out_dir)
  for k, v in over.items():
    node = cfg
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  return cfg


def run_cli(*args, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=600)


def test_cli_writes_table_json_csv_pictures(tmp_path):
  out = tmp_path / "eval"
  r = run_cli("--config=configs/evaluate.py:da3-small", *SMALL, f"--config.out_dir={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "abs_rel" in r.stdout and "auc30" in r.stdout and "fscore" in r.stdout
  assert "rel_p" in r.stdout
  res = json.loads((out / "results.json").read_text())
  assert len(res["scenes"]) == 2
  assert res["groups"] == ["depth", "pose", "pointcloud", "pointmap", "edge"]
  for k in ("abs_rel", "delta1", "auc03", "auc30", "ate", "rpe_trans", "rpe_rot", "accuracy",
            "fscore", "rel_p", "delta_p"):
    assert np.isfinite(res["mean"][k]), k
  assert 0 <= res["mean"]["delta1"] <= 1 and 0 <= res["mean"]["auc30"] <= 1
  rows = list(csv.DictReader(open(out / "scenes.csv")))
  assert [r["scene"] for r in rows] == ["scene_0000", "scene_0001"]
  assert float(rows[0]["abs_rel"]) == pytest.approx(res["scenes"][0]["abs_rel"])
  from PIL import Image
  pic = np.asarray(Image.open(out / "pictures" / "scene_0000.png"))
  assert pic.shape[0] >= 3 * 56 and pic.shape[1] >= 4 * 84 and pic.std() > 0
  # never overwrite results without the flag
  r2 = run_cli("--config=configs/evaluate.py:da3-small", *SMALL, f"--config.out_dir={out}")
  assert r2.returncode != 0
  err = [l for l in r2.stderr.strip().splitlines() if l.startswith("evaluate.py: error")]
  assert len(err) == 1 and "results.json" in err[0] and "overwrite" in err[0]
  assert "Traceback" not in r2.stderr


@pytest.mark.parametrize("args,needle", [
    (["--config.model.checkpoint=/nonexistent/ckpt"], "/nonexistent/ckpt"),
    (["--config.model.weights=/nonexistent/weights"], "/nonexistent/weights"),
    (["--config.metrics=depth,bogus"], "bogus"),
    (["--config.data.max_depth=0.001"], "no valid ground-truth depth"),
    (["--config.depth_align=sideways"], "sideways"),
    (["--config.depth_scope=clip"], "depth_scope"),
])
def test_cli_bad_input_one_line_error(tmp_path, args, needle):
  r = run_cli(*SMALL, f"--config.out_dir={tmp_path / 'e'}", *args)
  assert r.returncode == 2
  lines = [l for l in r.stderr.strip().splitlines() if l.startswith("evaluate.py: error")]
  assert len(lines) == 1 and needle in lines[0], r.stderr[-2000:]
  assert "Traceback" not in r.stderr


def test_checkpoint_and_official_weights_give_same_scores(tmp_path):
  """A geojax checkpoint and official-layout weights of a model evaluate exactly like it."""
  from flax import nnx

  from geojax.convert.da3 import save_official
  from geojax.io import checkpoint
  from geojax.models import registry
  fam = registry.get_family("da3")
  model = fam.build({"preset": "da3-small"}, nnx.Rngs(3))
  ck = checkpoint.save_model(str(tmp_path / "ck"), model, "da3", {"preset": "da3-small"})
  save_official(model, str(tmp_path / "official"))
  common = {"data.num_scenes": 1, "pictures": False}
  a = evaluate.evaluate(small_config(tmp_path / "a", **{"model.seed": 3, **common}))
  b = evaluate.evaluate(small_config(tmp_path / "b", **{"model.checkpoint": ck, **common}))
  c = evaluate.evaluate(small_config(tmp_path / "c", **{"model.weights": str(tmp_path / "official"),
                                                        **common}))
  assert a["mean"] == b["mean"] == c["mean"]
  assert a["mean"]["abs_rel"] > 0


def test_depth_only_model_skips_pose(tmp_path):
  """Groups a model cannot answer are skipped with a note, not faked."""
  from geojax.eval import evaluator
  groups, notes = evaluator.parse_groups("all", ("depth",))
  assert groups == ("depth", "pointcloud", "pointmap", "edge") and "pose" in notes[0]
  assert "seam" not in groups  # needs a model that refines crops
  with pytest.raises(ValueError, match="unknown metric group"):
    evaluator.parse_groups("depth,chamfer", ("depth",))


def test_scene_folder_and_colmap_sources(tmp_path):
  """evaluate.py reads scene folders (all metrics) and COLMAP models (pose metrics only)."""
  from PIL import Image

  from geojax.data.formats import colmap, scene_folder
  from geojax.data.synthetic import render_scene
  scenes = [render_scene(1, i, num_views=3, height=56, width=84) for i in range(2)]
  for i, sc in enumerate(scenes):
    scene_folder.write_scene(sc, str(tmp_path / "scenes" / f"room{i}"))
  res = evaluate.evaluate(small_config(tmp_path / "a", **{"data.source": "scene_folder",
                                                        "data.path": str(tmp_path / "scenes")}))
  assert [r["scene"] for r in res["scenes"]] == ["room0", "room1"]
  assert {"abs_rel", "auc30", "fscore"} <= set(res["mean"])
  assert (tmp_path / "a" / "pictures" / "room1.png").exists()

  sc = scenes[0]
  names = [f"{i:06d}.png" for i in range(3)]
  (tmp_path / "images").mkdir()
  for i, n in enumerate(names):
    Image.fromarray(sc["images"][i]).save(tmp_path / "images" / n)
  colmap.write_model(colmap.model_from_scene(sc, points_per_view=20, names=names),
                     str(tmp_path / "sparse"), binary=True)
  res = evaluate.evaluate(small_config(tmp_path / "b", **{"data.source": "colmap",
                                                        "data.path": str(tmp_path / "sparse")}))
  assert "auc30" in res["mean"] and "abs_rel" not in res["mean"]
  with pytest.raises(FileNotFoundError, match="nowhere"):
    evaluate.evaluate(small_config(tmp_path / "c", **{"data.source": "scene_folder",
                                                     "data.path": str(tmp_path / "nowhere")}))


def test_pointmap_group():
  """The pointmap group: GT / predicted camera-frame point maps, one alignment per scene."""
  from geojax.data.synthetic import render_scene
  from geojax.eval import evaluator
  assert evaluator.parse_groups("pointmap", ("depth",)) == (("pointmap",), [])
  groups, notes = evaluator.parse_groups("pointmap", ("depth",), has_depth=False)
  assert groups == () and "pointmap" in notes[0] and "ground-truth depth" in notes[0]

  scene = render_scene(0, 0, num_views=2, height=24, width=32)
  mask = evaluator.valid_mask(scene, 0.0)
  score = lambda pred, align="scale": evaluator.score_scene(
      pred, scene, mask, ("pointmap",), {"pointmap_align": align})
  # GT local points with integer pixel centres, computed here independently: X = z K^-1 [u, v, 1]
  v, u = np.mgrid[:24, :32].astype(np.float64)
  pix = np.stack([u, v, np.ones_like(u)], -1)
  kinv = np.linalg.inv(scene["intrinsics"].astype(np.float64))
  gt_local = np.einsum("sij,hwj->shwi", kinv, pix) * scene["depth"][..., None]
  out = score({"local_points": gt_local}, "none")
  assert set(out) == {"rel_p", "delta_p"}
  assert out["rel_p"] == pytest.approx(0.0, abs=1e-6) and out["delta_p"] == 1.0
  # depth-only prediction, un-projected with the GT intrinsics: a global scale is aligned away
  out = score({"depth": 2.0 * scene["depth"]})
  assert out["rel_p"] == pytest.approx(0.0, abs=1e-6) and out["delta_p"] == 1.0
  assert score({"depth": 2.0 * scene["depth"]}, "none")["rel_p"] == pytest.approx(1.0, rel=1e-6)
  # predicted intrinsics are used when the model has them (doubled focal: x, y halved)
  k2 = scene["intrinsics"].copy()
  k2[:, :2, :2] *= 2.0
  assert score({"depth": scene["depth"], "intrinsics": k2}, "none")["rel_p"] > 0.05
  with pytest.raises(ValueError, match="local_points"):
    score({"local_points": gt_local[:, :12]})

  # evaluator.run with a stand-in predictor: only the requested group is scored
  # (test_cli_writes_table_json_csv_pictures covers "all" through evaluate.py with a model)
  rows = evaluator.run(lambda images: {"depth": 3.0 * scene["depth"]}, [("s0", scene)],
                       ("pointmap",), {"pointmap_align": "scale"}, None, False)
  assert rows[0]["scene"] == "s0" and set(rows[0]) == {"scene", "rel_p", "delta_p"}
  assert rows[0]["rel_p"] == pytest.approx(0.0, abs=1e-6)


def test_depth_scope_and_rpe():
  """``depth_scope="sequence"``: one alignment over all views, so a per-view scale drift is an
  error there and not per view; RPE joins ATE in the pose group (zero for exact cameras, > 0 for
  a rotated middle camera)."""
  from geojax.data.synthetic import render_scene
  from geojax.eval import evaluator
  scene = render_scene(0, 0, num_views=3, height=24, width=32)
  mask = evaluator.valid_mask(scene, 0.0)
  gt = scene["depth"]
  drift = gt * np.array([2.0, 2.0, 3.0])[:, None, None]  # the scale drifts in the last view
  score = lambda depth, scope, align="scale": evaluator.score_scene(
      {"depth": depth}, scene, mask, ("depth",), {"depth_align": align, "depth_scope": scope})
  assert score(drift, "view")["abs_rel"] == pytest.approx(0.0, abs=1e-6)
  assert score(2.0 * gt, "sequence")["abs_rel"] == pytest.approx(0.0, abs=1e-6)
  seq = score(drift, "sequence")["abs_rel"]
  # by hand: s = sum(p g) / sum(p p) over all valid pixels, then per-view mean |s p - g| / g
  m = mask
  s = np.sum(drift[m] * gt[m]) / np.sum(drift[m] ** 2)
  want = np.mean([np.mean(np.abs(s * drift[i][m[i]] - gt[i][m[i]]) / gt[i][m[i]])
                  for i in range(3)])
  assert seq == pytest.approx(want, rel=1e-5) and seq > 0.05
  assert evaluator.sequence_aligned(drift, gt, mask, "median").shape == gt.shape

  pose = lambda ext: evaluator.score_scene(
      {"extrinsics": ext}, scene, mask, ("pose",), {"pose_thresholds": (5, 30)})
  exact = pose(scene["extrinsics"])
  assert exact["rpe_trans"] == pytest.approx(0.0, abs=1e-5)
  assert exact["rpe_rot"] == pytest.approx(0.0, abs=1e-3)
  bent = scene["extrinsics"].copy()
  c, sn = np.cos(np.radians(10.0)), np.sin(np.radians(10.0))
  bent[1, :3, :3] = np.array([[c, -sn, 0], [sn, c, 0], [0, 0, 1]]) @ bent[1, :3, :3]
  assert pose(bent)["rpe_rot"] > 5.0


def test_seam_error_is_relative_crop_disagreement():
  """Two crops overlapping on 2 columns, depths 1 and 1.5: |1 - 1.5| over the mean depth; no
  overlap gives NaN (grid mode)."""
  from geojax.eval import evaluator
  patches = np.stack([np.full((4, 4), 1.0), np.full((4, 4), 1.5)])
  boxes = np.array([[0, 0, 4, 4], [2, 0, 6, 4]])
  assert evaluator.seam_error(patches, boxes) == pytest.approx(0.5 / 1.25)
  assert np.isnan(evaluator.seam_error(patches, np.array([[0, 0, 4, 4], [4, 0, 8, 4]])))


def test_scene_folder_with_exif_rotated_images(tmp_path):
  """A scene folder of phone-style images (landscape pixels with EXIF tag 6, cameras and depth
  on the stored grid) evaluates exactly like its upright twin; ``data.exif=False`` evaluates
  the stored landscape pixels, like the same scene written without the tag."""
  import shutil

  from PIL import Image

  from geojax.data.formats import scene_folder
  from geojax.data.synthetic import render_scene
  scene = render_scene(1, 0, num_views=3, height=56, width=84)
  names = [f"{i:06d}.png" for i in range(3)]
  phone = tmp_path / "upright" / "phone"
  scene_folder.write_scene(scene, str(phone), names=names)
  for i, n in enumerate(names):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(scene["images"][i]).save(phone / "images" / n, exif=exif.tobytes())
  up = scene_folder.read_scene(str(phone))
  assert up["images"].shape == (3, 84, 56, 3)
  scene_folder.write_scene(up, str(tmp_path / "upright" / "twin"), names=names)
  shutil.copytree(phone, tmp_path / "stored" / "phone")
  scene_folder.write_scene(scene, str(tmp_path / "stored" / "flat"), names=names)

  def scores(root, **over):
    res = evaluate.evaluate(small_config(tmp_path / f"eval-{root}", **{
        "data.source": "scene_folder", "data.path": str(tmp_path / root), "data.num_scenes": 0,
        "pictures": False, "metrics": "depth,pose", **over}))
    return {r["scene"]: r for r in res["scenes"]}

  for root, pair, over in (("upright", ("phone", "twin"), {}),
                           ("stored", ("phone", "flat"), {"data.exif": False})):
    rows = scores(root, **over)
    a, b = (rows[s] for s in pair)
    assert {"abs_rel", "auc30"} <= set(a), a
    for key, value in b.items():
      if key != "scene" and isinstance(value, float):
        assert a[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (root, key)
