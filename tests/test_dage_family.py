"""DAGE through the family interface: ``geojax predict`` on a geojax checkpoint and on official
weights (the parity fixture's), and bad inputs in one line."""

import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from geojax.data.synthetic import render_scene
from geojax.models import dage as dage_lib
from geojax.models import registry
from geojax.predict import cli, load_model

SHARED = os.environ.get("GEOJAX_SHARED", os.path.join(os.path.dirname(__file__), "..", "..",
                                                      "shared"))
FIX = os.path.join(SHARED, "fixtures", "dage")


@pytest.fixture(scope="module")
def dage_checkpoint(tmp_path_factory):
  from geojax.io import checkpoint
  model = dage_lib.DAGE.from_preset("dage-tiny", rngs=nnx.Rngs(0))
  path = str(tmp_path_factory.mktemp("dage") / "ckpt")
  return checkpoint.save_model(path, model, "dage", {"preset": "dage-tiny"})


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  scene = render_scene(0, 4, num_views=3, height=42, width=70)
  folder = tmp_path_factory.mktemp("frames") / "clip"
  folder.mkdir()
  for i, img in enumerate(scene["images"]):
    Image.fromarray(img).save(folder / f"f{i}.png")
  return str(folder)


def test_family_registered():
  fam = registry.get_family("dage")
  assert registry.family_for_preset("dage") is fam
  assert {"local_points", "metric_scale", "cameras"} <= set(fam.predicts({"preset": "dage"}))


def test_predict_geojax_checkpoint(dage_checkpoint, clip, tmp_path, capsys):
  out = tmp_path / "out"
  code = cli.main(["--weights", dage_checkpoint, "--out", str(out), "--no-progress",
                   "--lr-max-size", "56", "--hr-num-tokens", "24", "--chunk", "2", clip])
  err = capsys.readouterr().err
  assert code == 0, err
  root = out / "clip"
  cams = json.load(open(root / "cameras.json"))
  assert cams["model"]["family"] == "dage" and cams["metric_scale"] > 0
  assert len(cams["frames"]) == 3
  depth = np.load(root / "depth" / "f0.npy")
  assert depth.shape == (42, 70) and np.all(depth > 0)
  assert (root / "point_map").exists() and (root / "point_map_local").exists()
  assert "<canvas" in open(root / "index.html").read()
  # DA3's options are refused for DAGE models, in one line
  code = cli.main(["--weights", dage_checkpoint, "--out", str(tmp_path / "o2"), "--no-progress",
                   "--process-res", "280", clip])
  err = capsys.readouterr().err
  assert code == 2 and "--process-res does not apply to dage models" in err


@pytest.mark.skipif(not os.path.exists(os.path.join(FIX, "weights.safetensors")),
                    reason="DAGE parity fixture not found (set GEOJAX_SHARED)")
def test_predict_official_weights_directory(clip, tmp_path, capsys):
  d = tmp_path / "official"
  d.mkdir()
  shutil.copy(os.path.join(FIX, "weights.safetensors"), d / "model.safetensors")
  shutil.copy(os.path.join(FIX, "config.json"), d / "config.json")
  model, info = load_model(str(d))
  assert isinstance(model, dage_lib.DAGE) and model.cfg.hr_out == 40
  code = cli.main(["--weights", str(d), "--out", str(tmp_path / "out"), "--no-progress",
                   "--lr-max-size", "56", "--hr-num-tokens", "24", clip])
  assert code == 0, capsys.readouterr().err


def test_wrong_family_checkpoint_is_one_line(dage_checkpoint):
  with pytest.raises(ValueError, match="holds a 'dage' model, not a 'da3' one"):
    registry.load_checkpoint(dage_checkpoint, family="da3", what="--weights")
  with pytest.raises(ValueError, match="DAGE takes no known cameras"):
    from geojax.predict import run
    model, _ = load_model(dage_checkpoint)
    img = np.zeros((42, 56, 3), np.uint8)
    run(model, [img, img], extrinsics=np.tile(np.eye(4, dtype=np.float32), (2, 1, 1)),
        intrinsics=np.tile(np.eye(3, dtype=np.float32), (2, 1, 1)))


@pytest.mark.skipif(not os.path.exists(os.path.join(FIX, "weights.safetensors")),
                    reason="DAGE parity fixture not found (set GEOJAX_SHARED)")
def test_geojax_convert_official_training_checkpoint(tmp_path, capsys):
  """A pickled training checkpoint (EMA + raw weights + its model config) -> safetensors +
  config.json, through torch.load(weights_only=True); the EMA weights are the ones kept."""
  torch = pytest.importorskip("torch")
  from safetensors.numpy import load_file

  from geojax.convert import cli as convert_cli
  from geojax.convert import dage as conv
  sd = load_file(os.path.join(FIX, "weights.safetensors"))
  ref = json.load(open(os.path.join(FIX, "config.json")))
  ema = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
  raw = {k: torch.zeros_like(v) for k, v in ema.items()}
  torch.save({"ema_model": ema, "model": raw, "model_config": ref, "step": 7},
             tmp_path / "dage.pt")
  out = tmp_path / "converted"
  assert convert_cli.main(["--family", "dage", str(tmp_path / "dage.pt"), str(out)]) == 0, (
      capsys.readouterr().err)
  assert json.load(open(out / "config.json"))["family"] == "dage"
  model, info = load_model(str(out))
  back = conv.to_torch_state_dict(model)
  assert all(np.array_equal(back[k], v) for k, v in sd.items())


def test_evaluate_scores_dage(dage_checkpoint, tmp_path):
  """evaluate.py on a DAGE checkpoint: depth, pose, point-cloud and point-map groups."""
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import evaluate
  from configs import evaluate as eval_config
  cfg = eval_config.get_config("dage-tiny")
  assert cfg.model.family == "dage" and cfg.model.lr_max_size == 252
  cfg.model.update(checkpoint=dage_checkpoint, lr_max_size=56, hr_num_tokens=24)
  cfg.data.update(num_scenes=1, num_views=3, height=42, width=70)
  cfg.out_dir = str(tmp_path / "eval")
  mean = evaluate.evaluate(cfg)["mean"]
  for key in ("abs_rel", "delta1", "auc30", "overall", "rel_p", "delta_p"):
    assert key in mean and np.isfinite(mean[key]), key
