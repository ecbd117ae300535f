"""URGT through the family interface: priors, ``geojax predict`` (prior model and user
``.npy`` priors), ``geojax convert`` of an official-style pickle, ``evaluate.py`` (depth, normal,
edge and seam metrics) and bad inputs in one line."""

import json
import os
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from geojax.data.synthetic import render_image
from geojax.families import urgt as fam
from geojax.models import da3 as da3_lib
from geojax.models import registry
from geojax.models import urgt as urgt_lib
from geojax.predict import cli, load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("GEOJAX_SHARED", os.path.join(ROOT, "..", "shared"))
FIX = os.path.join(SHARED, "fixtures", "urgt")
H, W = 70, 98  # 2 x 2 split: native patches 35 x 49, overlap mode 3 x 3 crops
ARGS = ["--no-progress", "--patch-split", "2", "2", "--crop-size", "28"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  from geojax.io import checkpoint
  root = tmp_path_factory.mktemp("urgt")
  # the paper's training start: offsets near zero, so the refinement stays near the prior
  model = urgt_lib.init_training_start(urgt_lib.URGT.from_preset("urgt-tiny", rngs=nnx.Rngs(0)))
  prior = da3_lib.DA3.from_preset("da3-tiny", rngs=nnx.Rngs(1))
  return (checkpoint.save_model(str(root / "urgt"), model, "urgt", {"preset": "urgt-tiny"}),
          checkpoint.save_model(str(root / "da3"), prior, "da3", {"preset": "da3-tiny"}))


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
  img = render_image(0, 1, height=H, width=W)["images"]
  path = tmp_path_factory.mktemp("photo") / "room.png"
  Image.fromarray(img).save(path)
  return str(path), img


def test_family_registered():
  f = registry.get_family("urgt")
  assert registry.family_for_preset("urgt") is f and registry.family_for_preset("urgt-tiny") is f
  assert {"depth", "normals", "patches"} <= set(f.predicts({"preset": "urgt"}))


def test_model_prior_maps_back_to_its_depth(ckpts, photo):
  """A DA3 prior becomes min-max normalised disparity, and Prior.to_depth inverts it exactly, so
  a zero offset would return the prior model's own depth; its normals are unit, face the
  camera (OpenCV axes: z < 0 on the whole) and have the image's size."""
  _, img = photo
  prior = fam.make_prior(img, "room", prior_weights=ckpts[1])
  assert prior.depth.shape == (H, W) and prior.normal.shape == (H, W, 3)
  assert prior.depth.min() == pytest.approx(0, abs=1e-6)
  assert prior.depth.max() == pytest.approx(1, abs=1e-6)
  _, predictor = fam.load_prior_model(ckpts[1])
  want = predictor(img[None])["depth"][0]
  np.testing.assert_allclose(prior.to_depth(prior.depth), want, rtol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(prior.normal, axis=-1), 1.0, atol=1e-4)
  assert prior.normal[..., 2].mean() < 0


def test_predict_with_prior_model(ckpts, photo, tmp_path, capsys):
  path, _ = photo
  out = tmp_path / "out"
  code = cli.main(["--weights", ckpts[0], "--prior-weights", ckpts[1], "--out", str(out),
                   *ARGS, path])
  err = capsys.readouterr().err
  assert code == 0, err
  root = out / os.path.basename(os.path.dirname(path))  # a scene per folder of inputs
  cams = json.load(open(root / "cameras.json"))
  assert cams["model"]["family"] == "urgt" and len(cams["frames"]) == 1
  depth = np.load(root / "depth" / "room.npy")
  normals = np.load(root / "normals" / "room.npy")
  assert depth.shape == (H, W) and normals.shape == (H, W, 3)
  assert np.isfinite(depth).all() and (depth > 0).mean() > 0.95
  np.testing.assert_allclose(np.linalg.norm(normals, axis=-1), 1.0, atol=1e-4)
  for name in ("relative", "prior_depth", "prior_normals"):
    assert (root / name / "room.npy").exists() and (root / name / "room.png").exists(), name
  page = open(root / "index.html").read()
  assert "prior_depth/room.png" in page and "<canvas" in page
  assert (root / "points.ply").stat().st_size > 1000


def test_predict_with_user_priors_and_grid(ckpts, photo, tmp_path, capsys):
  """User .npy priors as the official script takes them (depth divided by its max, normals
  (H, W, 3)); a prior at half the size (same aspect ratio) is resized; grid mode."""
  path, img = photo
  disp = np.linspace(1.0, 3.0, H * W, dtype=np.float32).reshape(H, W)
  np.save(tmp_path / "d.npy", disp[::2, ::2])
  normal = np.zeros((H, W, 3), np.float32)
  normal[..., 2] = -1
  np.save(tmp_path / "n.npy", normal)
  out = tmp_path / "out"
  code = cli.main(["--weights", ckpts[0], "--depth-prior", str(tmp_path / "d.npy"),
                   "--normal-prior", str(tmp_path / "n.npy"), "--grid", "--out", str(out),
                   *ARGS, path])
  assert code == 0, capsys.readouterr().err
  root = out / os.path.basename(os.path.dirname(path))
  prior_depth = np.load(root / "prior_depth" / "room.npy")
  # prior as depth = 1 / disparity, up to the official max normalisation (scale 3 + 1e-8)
  np.testing.assert_allclose(prior_depth[0, 0], 1.0, rtol=0.05)
  pn = np.load(root / "prior_normals" / "room.npy")
  np.testing.assert_allclose(pn[..., 2], -1.0, atol=1e-6)


@pytest.mark.parametrize("extra,needle", [
    ([], "pass --prior-weights"),
    (["--depth-prior", "{bad_shape}"], "does not fit the 98x70 image"),
    (["--depth-prior", "{nan}"], "non-finite values"),
    (["--depth-prior", "{ok}", "--normal-prior", "{bad_normal}"], "expected an array (H, W, 3)"),
    (["--depth-prior", "{ok}", "--patch-split", "8", "8"], "too small for --patch-split 8 8"),
    (["--depth-prior", "{ok}", "--crop-size", "30"], "--crop-size must be a positive multiple"),
    (["--depth-prior", "{missing}"], "no such file or directory"),
])
def test_bad_inputs_one_line(ckpts, photo, tmp_path, capsys, extra, needle):
  path, _ = photo
  files = {"bad_shape": np.ones((10, 40), np.float32), "ok": np.ones((H, W), np.float32),
           "nan": np.full((H, W), np.nan, np.float32),
           "bad_normal": np.ones((H, W), np.float32)}
  for k, v in files.items():
    np.save(tmp_path / f"{k}.npy", v)
  subs = {k: str(tmp_path / f"{k}.npy") for k in files}
  subs["missing"] = str(tmp_path / "missing.npy")
  extra = [a.format(**subs) for a in extra]
  code = cli.main(["--weights", ckpts[0], "--out", str(tmp_path / "out"), *ARGS, *extra, path])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and needle in err[0], err
  assert not (tmp_path / "out" / os.path.basename(os.path.dirname(path))).exists()


def test_evaluate_scores_urgt(ckpts, tmp_path):
  """evaluate.py on a URGT checkpoint with a DA3 prior: depth, normal, edge and the
  provisional seam metric."""
  sys.path.insert(0, ROOT)
  import evaluate
  from configs import evaluate as eval_config
  cfg = eval_config.get_config("urgt-tiny")
  assert cfg.model.family == "urgt" and tuple(cfg.model.patch_split) == (8, 8)
  cfg.model.update(checkpoint=ckpts[0], prior_weights=ckpts[1], patch_split=(2, 2),
                   crop_size=28)
  cfg.data.update(num_scenes=1, num_views=2, height=H, width=W)
  cfg.out_dir = str(tmp_path / "eval")
  mean = evaluate.evaluate(cfg)["mean"]
  res = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert set(res["groups"]) >= {"depth", "normal", "edge", "seam"}
  for key in ("abs_rel", "delta1", "normal_mean", "normal_median", "edge_chamfer",
              "seam_ce_provisional"):
    assert key in mean and np.isfinite(mean[key]), key
  assert 0 <= mean["normal_mean"] <= 180 and mean["seam_ce_provisional"] >= 0


@pytest.mark.skipif(not os.path.exists(os.path.join(FIX, "weights.safetensors")),
                    reason="URGT parity fixture not found (set GEOJAX_SHARED)")
def test_convert_official_pickle(tmp_path):
  """An official-style checkpoint (``model_state_dict`` with ``vggt.``-prefixed keys) converts
  once and loads as the same network."""
  torch = pytest.importorskip("torch")
  from safetensors.numpy import load_file

  from geojax.convert import cli as convert_cli
  from geojax.convert import urgt as conv
  sd = load_file(os.path.join(FIX, "weights.safetensors"))
  torch.save({"model_state_dict": {"vggt." + k: torch.from_numpy(v) for k, v in sd.items()},
              "epoch": 3}, tmp_path / "ckpt_best.pth")
  code = convert_cli.main(["--family", "urgt", "--preset", "urgt-tiny",
                           str(tmp_path / "ckpt_best.pth"), str(tmp_path / "out")])
  assert code == 0
  model, info = load_model(str(tmp_path / "out"))
  assert isinstance(model, urgt_lib.URGT) and model.cfg.dim == 32
  back = conv.to_torch_state_dict(model)
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


@pytest.mark.skipif(not os.path.exists(os.path.join(FIX, "weights.safetensors")),
                    reason="URGT parity fixture not found (set GEOJAX_SHARED)")
def test_official_directory_with_reference_config(tmp_path):
  """An official directory whose config.json gives the sizes (the fixture's) is recognised as
  the preset with those sizes."""
  import shutil
  d = tmp_path / "official"
  d.mkdir()
  shutil.copy(os.path.join(FIX, "weights.safetensors"), d / "model.safetensors")
  shutil.copy(os.path.join(FIX, "config.json"), d / "config.json")
  model, info = load_model(str(d))
  assert isinstance(model, urgt_lib.URGT) and info["preset"] == "urgt-tiny"
