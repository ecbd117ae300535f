"""The family interface: a toy family registered in a few lines runs through ``geojax predict``,
``evaluate.py`` and training without any library change; every output kind is exported and
scored; degenerate outputs are reported."""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from geojax.data.synthetic import render_scene
from geojax.models import registry
from geojax.predict import Prediction, cli, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# ------------------------------------------------------------------- the toy family (a few lines)


class Toy(nnx.Module):
  """depth = w * (1 + mean RGB): one trainable parameter."""

  def __init__(self, rngs: nnx.Rngs):
    self.w = nnx.Param(jnp.full((), 2.0))

  def __call__(self, x):
    return self.w * (1.0 + x.mean(-1))


def toy_predict(model, images, *, extrinsics=None, intrinsics=None, names=None, mesh=None,
                fov=60.0, track_queries=None):
  x = np.stack(images).astype(np.float32) / 255.0
  depth = np.asarray(model(jnp.asarray(x)), np.float32)
  s, h, w = depth.shape
  f = (w / 2) / np.tan(np.radians(fov / 2))
  k = np.tile(np.array([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1]], np.float32),
              (s, 1, 1))
  ext = np.tile(np.eye(4, dtype=np.float32), (s, 1, 1))
  ext[:, 0, 3] = -0.1 * np.arange(s)  # cameras moving along +x
  q = np.asarray(track_queries if track_queries is not None else
                 [[0, w / 3, h / 2], [0, w / 2, h / 3], [s - 1, w / 2, h / 2]], np.float32)
  t, u, v = q[:, 0].astype(int), q[:, 1], q[:, 2]
  z = depth[t, np.clip(v.round().astype(int), 0, h - 1), np.clip(u.round().astype(int), 0, w - 1)]
  cam = np.stack([(u - k[0, 0, 2]) / f * z, (v - k[0, 1, 2]) / f * z, z], -1)
  world = cam - ext[t, :3, 3]  # static points
  return Prediction(depth=depth, depth_conf=np.ones_like(depth), extrinsics=ext, intrinsics=k,
                    world_points=None, images=np.stack(images), names=list(names),
                    input_hw=[im.shape[:2] for im in images],
                    normals=np.broadcast_to(np.float32([0, 0, -1]), (s, h, w, 3)).copy(),
                    tracks=np.broadcast_to(world, (s,) + world.shape).copy(),
                    track_visibility=np.ones((s, len(q)), np.float32), track_queries=q,
                    metric_scale=1.5)


class ToyTask:
  family = "toy"

  def loss_fn(self, model, batch, rng):
    pred = model(jnp.asarray(batch["images"], jnp.float32) / 255.0)
    err = jnp.where(batch["valid"], pred - batch["depth"], 0.0)
    loss = jnp.sum(err ** 2) / jnp.maximum(jnp.sum(batch["valid"]), 1)
    return loss, {"depth": loss}


def make_toy_family():
  return registry.Family(
      name="toy", build=lambda config, rngs: Toy(rngs), predict=toy_predict,
      predicts=lambda config: ("depth", "confidence", "cameras", "normals", "tracks",
                               "metric_scale"),
      presets=("toy-1",), model_types=(Toy,), make_task=lambda config: ToyTask(),
      predict_args=(registry.PredictArg(("--fov",), dict(type=float, default=60.0)),))


@pytest.fixture
def toy():
  fam = registry.register(make_toy_family())
  yield fam
  registry.unregister("toy")


@pytest.fixture
def toy_checkpoint(toy, tmp_path):
  from geojax.io import checkpoint
  return checkpoint.save_model(str(tmp_path / "toy-ckpt"), Toy(nnx.Rngs(0)), "toy",
                               {"preset": "toy-1"})


@pytest.fixture
def frames(tmp_path):
  scene = render_scene(0, 2, num_views=3, height=48, width=64, dynamic=True)
  folder = tmp_path / "clip"
  folder.mkdir()
  for i, img in enumerate(scene["images"]):
    Image.fromarray(img).save(folder / f"f{i}.png")
  return str(folder)


# ------------------------------------------------------------------------------------ tests


def test_registry_lookups_and_errors(toy):
  assert registry.get_family("toy") is toy
  assert registry.family_for_preset("toy-1") is toy
  assert registry.family_of(Toy(nnx.Rngs(0))) is toy
  assert registry.family_for_preset("da3-small").name == "da3"
  with pytest.raises(ValueError, match="already registered"):
    registry.register(make_toy_family())
  with pytest.raises(ValueError, match="unknown preset"):
    registry.family_for_preset("nope")
  with pytest.raises(ValueError, match="no registered model family"):
    registry.family_of(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="unknown output kinds"):
    registry.Family(name="bad", build=None, predict=None, predicts=lambda c: ("colour",))


def test_toy_family_through_geojax_predict(toy_checkpoint, frames, tmp_path, capsys):
  out = tmp_path / "out"
  code = cli.main(["--weights", toy_checkpoint, "--out", str(out), "--no-progress", frames])
  err = capsys.readouterr().err
  assert code == 0, err
  assert "warning" not in err
  root = out / "clip"
  cams = json.load(open(root / "cameras.json"))
  assert cams["cameras"] == "predicted" and cams["metric_scale"] == 1.5
  assert cams["model"]["family"] == "toy"
  normals = np.load(root / "normals" / "f0.npy")
  np.testing.assert_allclose(normals[..., 2], -1.0)
  assert np.asarray(Image.open(root / "normals" / "f0.png")).shape == (48, 64, 3)
  assert not (root / "point_map").exists()  # points were lifted from depth, not predicted
  tr = np.load(root / "tracks.npz")
  assert tr["tracks"].shape == (3, 3, 3) and tr["visibility"].shape == (3, 3)
  # Projected tracks land where they were queried (static points, known cameras).
  for p, (t, u, v) in enumerate(tr["queries"]):
    np.testing.assert_allclose(tr["uv"][int(t), p], [u, v], atol=1e-3)
  assert Image.open(root / "tracks.png").size == (3 * 64, 48)
  page = open(root / "index.html").read()
  assert "tracks.png" in page and "normals/f0.png" in page and "<canvas" in page
  # A family's own option is accepted; another family's is refused in one line.
  code = cli.main(["--weights", toy_checkpoint, "--out", str(tmp_path / "o2"), "--no-progress",
                   "--fov", "50", frames])
  assert code == 0
  code = cli.main(["--weights", toy_checkpoint, "--out", str(tmp_path / "o3"), "--no-progress",
                   "--use-ray-pose", frames])
  err = capsys.readouterr().err
  assert code == 2 and "--use-ray-pose does not apply to toy models" in err


def test_degenerate_cameras_are_reported(toy_checkpoint, frames, tmp_path, capsys):
  """A field of view outside [1, 179] degrees and non-finite depth: one warning line each, in
  the page and in cameras.json, and the scene is still exported."""
  from geojax.predict import load_model
  model, _ = load_model(toy_checkpoint)
  with pytest.warns(UserWarning, match="degenerate predicted camera"):
    pred = run(model, [np.zeros((8, 8, 3), np.uint8)] * 2, fov=1e-5)
  assert len(pred.warnings) == 1 and "field of view" in pred.warnings[0]
  out = tmp_path / "out"
  code = cli.main(["--weights", toy_checkpoint, "--out", str(out), "--no-progress",
                   "--fov", "0.0001", frames])
  err = capsys.readouterr().err
  assert code == 0
  lines = [l for l in err.splitlines() if "warning" in l]
  assert len(lines) == 1 and "degenerate predicted camera in 3 view(s)" in lines[0]
  assert "fx 3.67e+07" in lines[0]
  cams = json.load(open(out / "clip" / "cameras.json"))
  assert "degenerate" in cams["warnings"][0]
  assert "degenerate predicted camera" in open(out / "clip" / "index.html").read()
  # non-finite depth
  model.w.value = jnp.float32(np.nan)
  pred = run(model, [np.zeros((8, 8, 3), np.uint8)], warn=False)
  assert any("non-finite depth in 64 pixels of 1 view" in m for m in pred.warnings)


def test_toy_family_through_evaluate(toy, tmp_path):
  """evaluate.py scores every group the toy's outputs allow, normals and tracks included."""
  import evaluate
  from configs import evaluate as eval_config
  cfg = eval_config.get_config("toy-1")
  assert cfg.model.family == "toy"
  cfg.data.update(num_scenes=1, num_views=3, height=40, width=56, dynamic=True)
  cfg.out_dir = str(tmp_path / "eval")
  res = evaluate.evaluate(cfg)
  mean = res["mean"]
  for key in ("abs_rel", "auc30", "overall", "normal_mean", "normal_within_30",
              "track_average_jaccard", "track_apd3d", "track_occlusion_accuracy"):
    assert key in mean and np.isfinite(mean[key]), key
  # GT normals face the camera (negative z); the toy's constant (0, 0, -1) is close to them.
  assert mean["normal_mean"] < 90
  # Every GT track was queried; the toy marks all points visible.
  scene = render_scene(0, 0, num_views=3, height=40, width=56, dynamic=True)
  gv = scene["track_visible"][:, scene["track_visible"].any(0)]
  np.testing.assert_allclose(mean["track_occlusion_accuracy"], gv.mean(), rtol=1e-6)


def test_toy_family_trains_one_step(toy, tmp_path):
  """train.py's trainer builds, steps, evaluates and exports the toy through the registry."""
  from configs.da3 import get_config
  from geojax.train import trainer
  c = get_config("runlocal")
  c.model.family, c.model.preset = "toy", "toy-1"
  c.total_steps = 2
  c.optim.warmup_steps = 0
  c.batch_size = 1
  c.data.update(num_scenes=2, height=28, width=42)
  c.data.pipeline.update(buckets=((28, 42),), min_views=2, max_views=2)
  c.eval.update(at_start=False, at_end=True, num_scenes=1, num_views=2, height=28, width=42,
                metrics="depth", pictures=False)
  c.tensorboard = c.progress = False
  c.checkpoint.async_save = False
  summary = trainer.train(c, str(tmp_path / "run"))
  assert summary["steps"] == 2 and np.isfinite(summary["final_train"]["loss"])
  assert "abs_rel" in summary["after"]
  model, fam, config = registry.load_checkpoint(str(tmp_path / "run" / "model"))
  assert fam.name == "toy" and isinstance(model, Toy) and config["preset"] == "toy-1"
  assert float(model.w.value) != 2.0  # the parameter moved


def test_geojax_convert_pickle_to_safetensors(tmp_path, capsys):
  """An official-layout pickle converts once (torch.load(weights_only=True)) and then loads."""
  import torch

  from geojax.convert.cli import main as convert_main
  from geojax.convert.da3 import to_torch_state_dict
  from geojax.models import da3
  from geojax.predict import load_model
  model = da3.DA3.from_preset("da3-tiny", rngs=nnx.Rngs(0))
  sd = {"model." + k: torch.from_numpy(np.array(v))
        for k, v in to_torch_state_dict(model).items()}
  torch.save({"model": sd, "epoch": 3}, tmp_path / "official.pth")
  out = tmp_path / "converted"
  assert convert_main([str(tmp_path / "official.pth"), str(out), "--family", "da3",
                       "--preset", "da3-tiny"]) == 0
  loaded, info = load_model(str(out))
  assert info["preset"] == "da3-tiny"
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                  jax.tree.leaves(nnx.state(loaded, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not [p for p in os.listdir(out) if p.startswith(".")]
  # Existing output, wrong family preset, a non-pickle: one-line errors.
  assert convert_main([str(tmp_path / "official.pth"), str(out), "--family", "da3"]) == 2
  assert "--overwrite" in capsys.readouterr().err
  (tmp_path / "junk.pth").write_bytes(b"not a pickle")
  assert convert_main([str(tmp_path / "junk.pth"), str(tmp_path / "o"), "--family", "da3"]) == 2
  assert "weights_only" in capsys.readouterr().err
