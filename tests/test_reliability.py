"""Reliability battery (issue 17): inputs a user can get wrong end in exit status 2 and one line
naming the file and what was expected, with nothing half-written left behind."""

import json
import os
import struct
from contextlib import nullcontext

import numpy as np
import pytest
from PIL import Image

from geojax.convert import cli as convert_cli
from geojax.predict import cli as predict_cli
from reliability_helpers import one_error_line as _one_error_line


def _safetensors_bytes() -> bytes:
  from safetensors.numpy import save
  return save({"w": np.arange(64, dtype=np.float32).reshape(8, 8)})


def _broken_json() -> bytes:
  header = b'{"w": {"dtype": "F32", "shape": [8, 8], "data_offsets": [0, 256]'  # no closing brace
  return struct.pack("<Q", len(header)) + header + bytes(256)


def _huge_prefix() -> bytes:
  return struct.pack("<Q", 1 << 40) + b"{}"


# name -> bytes of a file called model.safetensors that no reader can use
BAD_SAFETENSORS = {
    "broken-json": _broken_json,
    "truncated-data": lambda: _safetensors_bytes()[:-100],
    "zero-byte": lambda: b"",
    "huge-length-prefix": _huge_prefix,
    "a-pickle": lambda: b"\x80\x04\x95" + bytes(64),
}



@pytest.fixture
def photo(tmp_path):
  p = tmp_path / "photo.png"
  Image.fromarray(np.full((28, 42, 3), 128, np.uint8)).save(p)
  return str(p)


@pytest.mark.parametrize("layout", ["file", "directory"])
@pytest.mark.parametrize("case", sorted(BAD_SAFETENSORS))
def test_predict_refuses_corrupt_safetensors(tmp_path, capsys, photo, case, layout):
  """A corrupt ``model.safetensors``, alone or in an official-style directory with a
  ``config.json``, is exit 2 and one line naming the file; no output folder is left."""
  d = tmp_path / "weights"
  d.mkdir()
  st = d / "model.safetensors"
  st.write_bytes(BAD_SAFETENSORS[case]())
  (d / "config.json").write_text(json.dumps({"model_name": "da3-small"}))
  weights = str(st if layout == "file" else d)
  out = tmp_path / "out"
  code = predict_cli.main(["--weights", weights, "--out", str(out), "--no-progress", photo])
  assert code == 2
  _one_error_line(capsys.readouterr().err, "geojax predict: error:", str(st),
                  "not a readable safetensors file")
  assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("case", sorted(BAD_SAFETENSORS))
def test_safetensors_readers_name_the_corrupt_file(tmp_path, case):
  """Every family's official-weights reader (``read_safetensors`` for a file or a directory,
  ``safetensors_keys``, ``load_file``) turns a corrupt file into a ValueError naming it."""
  from geojax.convert import torch_layout
  st = tmp_path / "model.safetensors"
  st.write_bytes(BAD_SAFETENSORS[case]())
  for read in (lambda: torch_layout.read_safetensors(str(st), "dage"),
               lambda: torch_layout.read_safetensors(str(tmp_path), "dage"),
               lambda: torch_layout.safetensors_keys(str(st)),
               lambda: torch_layout.load_file(str(st))):
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
      read()
  (tmp_path / "model.safetensors").write_bytes(_safetensors_bytes())
  (tmp_path / "config.json").write_text("{broken")
  with pytest.raises(ValueError, match="config.json: cannot parse JSON"):
    torch_layout.read_safetensors(str(tmp_path), "dage")


def test_convert_refuses_safetensors_source(tmp_path, capsys):
  """``geojax convert`` given a ``.safetensors`` (which needs no conversion): exit 2, one line
  naming the file; the destination is not created."""
  src = tmp_path / "model.safetensors"
  src.write_bytes(_safetensors_bytes())
  dst = tmp_path / "dst"
  assert convert_cli.main(["--family", "da3", str(src), str(dst)]) == 2
  _one_error_line(capsys.readouterr().err, str(src), "safetensors files need no conversion")
  assert not dst.exists()


# ------------------------------------------------------- the bad-input battery: geojax predict

TINY = ("da3-tiny", "dage-tiny", "urgt-tiny", "ppd-tiny", "ppvd-tiny", "d4rt-tiny")
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                        "shared", "fixtures")


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory):
  """A geojax checkpoint of each family's tiny preset (numpy-drawn weights), an official-layout
  da3-tiny directory, and variants of it with a tensor missing and one unexpected."""
  from flax import nnx
  from safetensors.numpy import load_file, save_file

  from geojax.convert.da3 import save_official
  from geojax.io import checkpoint
  from geojax.models import registry
  from test_view_parallel import random_state
  root = tmp_path_factory.mktemp("family-ckpts")
  out = {}
  for preset in TINY:
    fam = registry.family_for_preset(preset)
    model = nnx.merge(*random_state(lambda: fam.build({"preset": preset}, nnx.Rngs(0))))
    out[preset] = checkpoint.save_model(str(root / preset), model, fam.name, {"preset": preset})
    if preset == "da3-tiny":
      save_official(model, str(root / "official"))
      (root / "official" / "config.json").write_text(json.dumps({"model_name": "da3-tiny"}))
  tensors = load_file(str(root / "official" / "model.safetensors"))
  dropped = sorted(tensors)[5]
  for name, edit in (("missing", lambda t: t.pop(dropped)),
                     ("unexpected", lambda t: t.update({"head.bogus.weight": np.zeros(3,
                                                                                     np.float32)}))):
    d = root / name
    d.mkdir()
    t = dict(tensors)
    edit(t)
    save_file(t, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_name": "da3-tiny"}))
  out.update(official=str(root / "official"), missing=str(root / "missing"),
             unexpected=str(root / "unexpected"), dropped=dropped)
  return out


def _images(tmp, name="photos", n=2, hw=(28, 42)):
  d = tmp / name
  d.mkdir(exist_ok=True)
  for i in range(n):
    Image.fromarray(np.full(hw + (3,), 40 + 50 * i, np.uint8)).save(d / f"{i}.png")
  return str(d)


def _one_file(tmp, name, data: bytes):
  d = tmp / f"in-{name.replace('.', '-')}"
  d.mkdir()
  (d / name).write_bytes(data)
  return str(d / name)


def _png_bytes():
  import io
  b = io.BytesIO()
  Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(b, format="PNG")
  return b.getvalue()


def _mp4(tmp, cut=None):
  from geojax.data.formats.video import write_video
  p = tmp / "clip-src.mp4"
  write_video(str(p), np.random.default_rng(0).integers(0, 255, (6, 32, 48, 3), np.uint8))
  data = p.read_bytes()
  p.unlink()
  return data if cut is None else data[:len(data) // cut]


def _scene(tmp, spoil):
  from geojax.data.formats.scene_folder import write_scene
  from geojax.data.synthetic import render_scene
  root = tmp / "scene"
  write_scene(render_scene(0, 0, num_views=2, height=28, width=42), root,
              names=["a.png", "b.png"])
  spoil(root)
  return str(root)


def _cams_edit(fn):
  def spoil(root):
    cams = json.loads((root / "cameras.json").read_text())
    fn(cams)
    (root / "cameras.json").write_text(json.dumps(cams))
  return spoil


def _colmap(tmp, spoil):
  from geojax.data.formats import colmap
  from geojax.data.synthetic import render_scene
  scene = render_scene(0, 0, num_views=2, height=28, width=42)
  root = tmp / "colmap"
  (root / "images").mkdir(parents=True)
  for i, name in enumerate(["a.png", "b.png"]):
    Image.fromarray(scene["images"][i]).save(root / "images" / name)
  model = colmap.model_from_scene(scene, names=["a.png", "b.png"], points_per_view=20)
  spoil(root, model)
  colmap.write_model(model, str(root / "sparse" / "0"))
  return str(root)


def _nan_pose(root, model):
  model.images[1].tvec[0] = np.nan


def _drop_image(root, model):
  (root / "images" / "b.png").unlink()


def _one_photo(tmp):
  return [_images(tmp, "photo", n=1, hw=(56, 84))]


def _prior(tmp):
  p = tmp / "prior.npy"
  np.save(p, np.ones((56, 84), np.float32))
  return str(p)


def _npz(tmp, **arrays):
  p = tmp / "q.npz"
  np.savez(p, **arrays)
  return str(p)


def _half_written(ckpts, tmp):
  import shutil
  d = tmp / "half"
  shutil.copytree(ckpts["da3-tiny"], d)
  for dp, _, fs in os.walk(d / "state"):
    for f in fs:
      if "manifest" in f or f.startswith("ocdbt") or f.endswith(".data") or "d" == dp[-1]:
        os.remove(os.path.join(dp, f))
  return str(d)


def _foreign_orbax(ckpts, tmp):
  import jax.numpy as jnp

  from geojax.train.checkpoint import TrainCheckpointer
  ck = TrainCheckpointer(str(tmp / "ck"), async_save=False)
  ck.save(3, {"w": jnp.ones(2)}, config={"x": 1})
  ck.close()
  return str(tmp / "ck" / "3")


def _pickle(ckpts, tmp):
  import torch
  p = tmp / "model.pth"
  torch.save({"w": torch.ones(2)}, p)
  return str(p)


# (case, preset whose checkpoint is --weights (or a callable giving --weights), extra args (or a
#  callable of tmp giving them), inputs (a callable of tmp), substrings of the one error line)
PREDICT_BATTERY = [
    # images and videos
    ("image-zero-byte", "da3-tiny", [], lambda t: [_one_file(t, "a.png", b"")],
     ["a.png", "cannot decode image"]),
    ("image-truncated", "da3-tiny", [], lambda t: [_one_file(t, "a.png", _png_bytes()[:60])],
     ["a.png", "cannot decode image"]),
    ("image-mislabelled", "da3-tiny", [], lambda t: [_one_file(t, "a.jpg", b"GIF? no: text")],
     ["a.jpg", "cannot decode image"]),
    ("video-zero-byte", "d4rt-tiny", [], lambda t: [_one_file(t, "v.mp4", b"")],
     ["v.mp4", "video"]),
    ("video-truncated", "d4rt-tiny", [], lambda t: [_one_file(t, "v.mp4", _mp4(t, cut=3))],
     ["v.mp4", "video"]),
    ("video-mislabelled", "d4rt-tiny", [], lambda t: [_one_file(t, "v.mp4", _png_bytes())],
     ["v.mp4", "video"]),
    ("not-an-input", "da3-tiny", [], lambda t: [_one_file(t, "notes.txt", b"hello")],
     ["notes.txt", "not an image"]),
    # scene folders and COLMAP models
    ("scene-nan-camera", "da3-tiny", [],
     lambda t: [_scene(t, _cams_edit(lambda c: c["frames"][1].update(fx=float("nan"))))],
     ["cameras.json", "'b.png'", "non-finite camera values"]),
    ("scene-inf-pose", "da3-tiny", [],
     lambda t: [_scene(t, _cams_edit(lambda c: c["frames"][0]["extrinsics"][0].__setitem__(
         3, float("inf"))))], ["cameras.json", "'a.png'", "non-finite"]),
    ("scene-missing-image", "da3-tiny", [],
     lambda t: [_scene(t, lambda r: (r / "images" / "b.png").unlink())],
     ["b.png", "image file not found"]),
    ("scene-wrong-size-image", "da3-tiny", [],
     lambda t: [_scene(t, lambda r: Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(
         r / "images" / "a.png"))], ["a.png", "10x10", "42x28"]),
    ("scene-broken-json", "da3-tiny", [],
     lambda t: [_scene(t, lambda r: (r / "cameras.json").write_text('{"frames": ['))],
     ["cameras.json", "cannot parse JSON"]),
    ("colmap-nan-pose", "da3-tiny", [], lambda t: [_colmap(t, _nan_pose)],
     ["sparse", "invalid pose", "a.png"]),
    ("colmap-missing-image", "da3-tiny", [], lambda t: [_colmap(t, _drop_image)],
     ["b.png", "image file not found"]),
    # weights
    ("weights-another-family", lambda c, t: os.path.join(FIXTURES, "urgt",
                                                         "weights.safetensors"),
     ["--model", "da3-small"], None, ["da3-small", "tensors missing"]),
    ("weights-another-preset", lambda c, t: os.path.join(FIXTURES, "dage",
                                                         "weights.safetensors"),
     ["--model", "dage"], None, ["does not fit", "another configuration"]),
    ("weights-missing-key", lambda c, t: c["missing"], [], None,
     ["--weights", "1 tensors missing", "blocks.0.ls2.gamma"]),
    ("weights-half-written-orbax", _half_written, [], None,
     ["half", "cannot restore the model parameters", "incomplete"]),
    ("weights-foreign-orbax", _foreign_orbax, [], None,
     ["ck/3", "a training checkpoint step", "not a model checkpoint"]),
    ("weights-pickle", _pickle, [], None, ["model.pth", "geojax convert"]),
    ("weights-wrong-model-flag", "da3-tiny", ["--model", "urgt-tiny"], None,
     ["da3-tiny", "holds a 'da3' model, not a 'urgt' one"]),
    ("weights-unknown-preset", "da3-tiny", ["--model", "da3-huge"], None, ["da3-huge"]),
    # options
    ("opt-max-points", "da3-tiny", ["--max-points", "0"], None, ["--max-points", ">= 1"]),
    ("opt-conf-percentile", "da3-tiny", ["--conf-percentile", "100"], None,
     ["--conf-percentile", "[0, 100)"]),
    ("opt-max-views", "da3-tiny", ["--max-views", "0"], None, ["--max-views", ">= 1"]),
    ("opt-fps", "d4rt-tiny", ["--fps", "0"], None, ["--fps", "positive"]),
    ("opt-head-chunk", "da3-tiny", ["--head-chunk", "-1"], None, ["--head-chunk"]),
    ("opt-view-devices", "da3-tiny", ["--view-devices", "3"], None, ["3"]),
    ("opt-dtype", "da3-tiny", ["--dtype", "float8"], None, ["--dtype", "float8"]),
    ("opt-unknown-flag", "da3-tiny", ["--colour", "red"], None, ["--colour"]),
    ("opt-other-family", "da3-tiny", ["--steps", "2"], None, ["--steps", "da3"]),
    ("opt-process-res", "da3-tiny", ["--process-res", "0"], None, ["--process-res"]),
    ("dage-lr-max-size", "dage-tiny", ["--lr-max-size", "5"], None, ["--lr-max-size", "14"]),
    ("dage-hr-tokens", "dage-tiny", ["--hr-num-tokens", "0"], None, ["--hr-num-tokens"]),
    ("dage-chunk", "dage-tiny", ["--chunk", "-1"], None, ["--chunk"]),
    ("urgt-no-prior", "urgt-tiny", [], None, ["--prior-weights", "--depth-prior"]),
    ("urgt-prior-missing", "urgt-tiny", ["--depth-prior", "/nonexistent/p.npy"], None,
     ["/nonexistent/p.npy"]),
    ("urgt-prior-weights-missing", "urgt-tiny", ["--prior-weights", "/nonexistent/w"], None,
     ["--prior-weights /nonexistent/w"]),
    ("urgt-patch-split", "urgt-tiny", lambda t: ["--depth-prior", _prior(t), "--patch-split",
                                                  "0", "3"], _one_photo, ["--patch-split"]),
    ("urgt-crop-size", "urgt-tiny", lambda t: ["--depth-prior", _prior(t), "--crop-size", "20"],
     _one_photo, ["--crop-size", "multiple of 14"]),
    ("urgt-prior-is-one-file-for-two", "urgt-tiny", lambda t: ["--depth-prior", _prior(t)], None,
     ["--depth-prior", "one file for 2 images"]),
    ("ppd-steps", "ppd-tiny", ["--steps", "0"], None, ["--steps", ">= 1"]),
    ("ppd-ensemble", "ppd-tiny", ["--ensemble", "0"], None, ["--ensemble"]),
    ("ppd-area", "ppd-tiny", ["--area", "10"], None, ["--area"]),
    ("ppd-align-to-missing", "ppd-tiny", ["--align-to", "/nonexistent/ref"], None,
     ["/nonexistent/ref"]),
    ("ppvd-steps", "ppvd-tiny", ["--steps", "-2"], None, ["--steps"]),
    ("d4rt-keep", "d4rt-tiny", ["--keep", "1.5"], None, ["--keep", "(0, 1]"]),
    ("d4rt-overlap", "d4rt-tiny", ["--overlap", "-1"], None, ["--overlap"]),
    ("d4rt-track-grid", "d4rt-tiny", ["--track-grid", "-3"], None, ["--track-grid"]),
    ("d4rt-query-chunk", "d4rt-tiny", ["--query-chunk", "0"], None, ["--query-chunk"]),
    ("d4rt-queries-missing", "d4rt-tiny", ["--queries", "/nonexistent/q.npz"], None,
     ["/nonexistent/q.npz"]),
    ("d4rt-queries-no-array", "d4rt-tiny", lambda t: ["--queries", _npz(t, foo=np.zeros(3))],
     None, ["q.npz", "no 'queries' array", "(P, 3)"]),
]


@pytest.mark.parametrize("case,weights,args,inputs,needles", PREDICT_BATTERY,
                         ids=[c[0] for c in PREDICT_BATTERY])
def test_predict_battery(tmp_path, capsys, family_checkpoints, case, weights, args, inputs,
                         needles):
  """Every bad input, weight file and option of ``geojax predict``, for every family: exit
  status 2, exactly one line naming the file / key / option and what was expected, no
  traceback, and no output folder left behind."""
  w = weights(family_checkpoints, tmp_path) if callable(weights) else family_checkpoints[weights]
  args = args(tmp_path) if callable(args) else args
  ins = inputs(tmp_path) if inputs else [_images(tmp_path)]
  out = tmp_path / "out"
  code = predict_cli.main(["--weights", w, "--out", str(out), "--no-progress", *args, *ins])
  err = capsys.readouterr().err
  assert code == 2, err
  err = "\n".join(l for l in err.splitlines() if ": warning:" not in l)
  _one_error_line(err, "geojax predict: error:", *needles)
  assert not out.exists() or not any(out.iterdir()), sorted(os.listdir(out))


def test_predict_unexpected_tensor_is_named_in_a_warning(tmp_path, capsys, family_checkpoints):
  """Official weights with a tensor the model does not use still predict (as the official
  non-strict loader does), with one warning line naming the tensor."""
  out = tmp_path / "out"
  code = predict_cli.main(["--weights", family_checkpoints["unexpected"], "--out", str(out),
                           "--no-progress", "--process-res", "56", _images(tmp_path)])
  err = capsys.readouterr().err
  assert code == 0, err
  lines = [l for l in err.splitlines() if "head.bogus.weight" in l]
  assert len(lines) == 1 and "warning" in lines[0] and "Traceback" not in err
  assert (out / "photos" / "depth" / "0.npy").is_file()


# -------------------------------------------------------- the bad-input battery: evaluate.py


def _scene_root(tmp, spoil):
  return _scene(tmp, spoil)


def _wrong_size_depth(root):
  np.save(root / "depth" / "b.npy", np.ones((5, 7), np.float32))


def _tapvid_zero(tmp):
  p = tmp / "clips"
  p.mkdir()
  (p / "clip.npz").write_bytes(b"")
  return str(p)


def _zero_weights(tmp):
  d = tmp / "w"
  d.mkdir()
  (d / "model.safetensors").write_bytes(b"")
  (d / "config.json").write_text(json.dumps({"model_name": "da3-small"}))
  return str(d)


# (case, config edits: {field: value or callable(tmp, ckpts)}, substrings of the message)
EVALUATE_BATTERY = [
    ("source-unknown", {"data.source": "parquet"}, ["parquet"]),
    ("scene-path-missing", {"data.source": "scene_folder", "data.path": "/nonexistent/s"},
     ["/nonexistent/s"]),
    ("scene-depth-wrong-size", {"data.source": "scene_folder",
                                "data.path": lambda t, c: _scene(t, _wrong_size_depth)},
     ["b.npy", "7x5", "42x28"]),
    ("scene-nan-camera", {"data.source": "scene_folder", "data.path": lambda t, c: _scene(
        t, _cams_edit(lambda cams: cams["frames"][0].update(cy=float("inf"))))},
     ["cameras.json", "non-finite camera values"]),
    ("scene-missing-image", {"data.source": "scene_folder", "data.path": lambda t, c: _scene(
        t, lambda r: (r / "images" / "a.png").unlink())}, ["a.png", "image file not found"]),
    ("colmap-missing-image", {"data.source": "colmap", "data.path": lambda t, c: os.path.join(
        _colmap(t, _drop_image), "sparse", "0")}, ["b.png", "image file not found"]),
    ("colmap-nan-pose", {"data.source": "colmap", "data.path": lambda t, c: os.path.join(
        _colmap(t, _nan_pose), "sparse", "0")}, ["sparse/0", "invalid pose"]),
    ("tapvid3d-zero-byte", {"data.source": "tapvid3d", "data.path": lambda t, c: _tapvid_zero(t),
                            "metrics": "track", "model.family": "d4rt",
                            "model.preset": "d4rt-tiny",
                            "model.checkpoint": lambda t, c: c["d4rt-tiny"]}, ["clip.npz"]),
    ("checkpoint-half-written", {"model.checkpoint": lambda t, c: _half_written(c, t)},
     ["half", "cannot restore the model parameters"]),
    ("checkpoint-other-family", {"model.checkpoint": lambda t, c: c["dage-tiny"]},
     ["model.checkpoint", "holds a 'dage' model, not a 'da3' one"]),
    ("checkpoint-foreign-orbax", {"model.checkpoint": lambda t, c: _foreign_orbax(c, t)},
     ["ck/3", "not a geojax model checkpoint"]),
    ("weights-corrupt", {"model.checkpoint": "", "model.weights": lambda t, c: _zero_weights(t)},
     ["model.safetensors", "not a readable safetensors file"]),
    ("weights-another-family", {"model.checkpoint": "", "model.preset": "da3-small",
                                "model.weights": os.path.join(FIXTURES, "urgt",
                                                              "weights.safetensors")},
     ["model.weights", "urgt", "tensors missing"]),
    ("metrics-unknown", {"metrics": "depth,colour"}, ["colour"]),
    ("depth-align-unknown", {"depth_align": "sideways"}, ["depth_align", "sideways"]),
    ("pointcloud-threshold", {"pointcloud_threshold": -0.1}, ["pointcloud_threshold", "> 0"]),
    ("pose-thresholds", {"pose_thresholds": (0, 5)}, ["pose_thresholds", "(0, 180]"]),
    ("max-depth", {"data.max_depth": -1.0}, ["data.max_depth", ">= 0"]),
    ("num-scenes", {"data.num_scenes": 0}, ["data.num_scenes", ">= 1"]),
]


@pytest.mark.parametrize("case,edits,needles", EVALUATE_BATTERY,
                         ids=[c[0] for c in EVALUATE_BATTERY])
def test_evaluate_battery(tmp_path, family_checkpoints, case, edits, needles):
  """Every bad source, scene, weight file and config value of ``evaluate.py`` raises the
  error its ``main`` prints as one line (exit 2), naming the file or field and what was
  expected; the output folder it created is removed."""
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import evaluate
  from configs import evaluate as eval_config
  cfg = eval_config.get_config("da3-tiny")
  cfg.data.update(num_scenes=1, num_views=2, height=28, width=42)
  cfg.model.process_res = 42
  cfg.model.checkpoint = family_checkpoints["da3-tiny"]
  cfg.out_dir = str(tmp_path / "eval")
  for key, value in edits.items():
    node = cfg
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value(tmp_path, family_checkpoints) if callable(value) else value
  with pytest.raises((ValueError, FileNotFoundError, FileExistsError)) as e:
    evaluate.evaluate(cfg)
  msg = " ".join(str(e.value).split())
  for n in needles:
    assert n in msg, (n, msg)
  assert "Traceback" not in msg and len(msg) < 600, msg
  assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("damage", ["flipped-bytes", "truncated", "no-metadata"])
def test_corrupt_tfds_records_name_the_dataset(tmp_path, damage):
  """A damaged ArrayRecord file (bytes flipped, cut short) or missing metadata: one ValueError
  naming the dataset folder (and the record), raised when the source is opened."""
  from geojax.data import tfds_builder
  from geojax.data.synthetic import render_scene
  scenes = [(f"s{i}", render_scene(0, i, num_views=2, height=28, width=42)) for i in range(3)]
  path = tfds_builder.build_dataset(str(tmp_path / "tfds"), scenes=lambda: iter(scenes))
  assert len(tfds_builder.load_data_source(path)) == 3
  rec = next(os.path.join(dp, f) for dp, _, fs in os.walk(path) for f in fs
             if "array_record" in f)
  data = bytearray(open(rec, "rb").read())
  if damage == "flipped-bytes":
    for i in range(100, len(data) - 100, 97):
      data[i] ^= 0xFF
    open(rec, "wb").write(bytes(data))
  elif damage == "truncated":
    open(rec, "wb").write(bytes(data[:len(data) // 2]))
  else:
    os.remove(os.path.join(path, "features.json"))
  with pytest.raises(ValueError, match=f"{path}: .*(record 0 cannot be read|not a readable)"):
    tfds_builder.load_data_source(path)


# ------------------------------------------------------------ the bad-input battery: train.py


def _bad_scene_root(tmp):
  from geojax.data.formats.scene_folder import write_scene
  from geojax.data.synthetic import render_scene
  root = tmp / "scenes"
  for i in range(2):
    scene = render_scene(0, i, num_views=3, height=56, width=84)
    write_scene(scene, root / f"s{i}")
    cams = json.loads((root / f"s{i}" / "cameras.json").read_text())
    cams["frames"][0]["fx"] = float("nan")
    (root / f"s{i}" / "cameras.json").write_text(json.dumps(cams))
  return str(root)


def _corrupt_tfds(tmp):
  from geojax.data import tfds_builder
  from geojax.data.synthetic import render_scene
  scenes = [(f"s{i}", render_scene(0, i, num_views=3, height=56, width=84)) for i in range(2)]
  path = tfds_builder.build_dataset(str(tmp / "tfds"), scenes=lambda: iter(scenes))
  rec = next(os.path.join(dp, f) for dp, _, fs in os.walk(path) for f in fs
             if "array_record" in f)
  data = open(rec, "rb").read()
  open(rec, "wb").write(data[:len(data) // 2])
  return path


# (case, config edits {field: value or callable(tmp, ckpts)}, substrings of the message)
TRAIN_BATTERY = [
    ("dtype", {"model.dtype": "float8"}, ["model.dtype", "float8"]),
    ("total-steps", {"total_steps": 0}, ["total_steps", ">= 1"]),
    ("accum-steps", {"optim.accum_steps": 3}, ["multiple of optim.accum_steps (3)"]),
    ("source-unknown", {"data.source": "parquet"}, ["data.source", "parquet"]),
    ("folder-without-path", {"data.source": "folder"}, ["data.path"]),
    ("folder-missing", {"data.source": "folder", "data.path": "/nonexistent/scenes"},
     ["/nonexistent/scenes"]),
    ("folder-all-nan-cameras", {"data.source": "folder",
                                "data.path": lambda t, c: _bad_scene_root(t)},
     ["scenes", "no readable scene folders"]),
    ("tfds-missing", {"data.source": "tfds", "data.path": "/nonexistent/tfds"},
     ["/nonexistent/tfds"]),
    ("tfds-corrupt", {"data.source": "tfds", "data.path": lambda t, c: _corrupt_tfds(t)},
     ["tfds", "record 0 cannot be read"]),
    ("pipeline-unknown-field", {"data.pipeline.colour": 1}, ["data.pipeline", "colour"]),
    ("pipeline-views", {"data.pipeline.min_views": 5, "data.pipeline.max_views": 2},
     ["min_views"]),
    ("pipeline-workers", {"data.pipeline.num_workers": -1}, ["num_workers", ">= 0"]),
    ("batch-size", {"batch_size": 0}, ["batch_size"]),
    ("mesh", {"mesh.shape": (3, 1, 1)}, ["mesh"]),
    ("keep-last", {"checkpoint.keep_last": 0}, ["checkpoint.keep_last must be >= 1", "got 0"]),
    ("best-mode", {"checkpoint.best_mode": "middle"}, ["checkpoint.best_mode", "'middle'"]),
    ("init-weights-missing", {"init.weights": "/nonexistent/w"}, ["init.weights",
                                                                  "/nonexistent/w"]),
    ("init-checkpoint-other-family", {"init.checkpoint": lambda t, c: c["dage-tiny"]},
     ["init.checkpoint", "holds a 'dage' model, not a 'da3' one"]),
    ("lr", {"optim.lr": -1.0}, ["lr"]),
]


def _train_config():
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import da3 as cfg_mod
  c = cfg_mod.get_config("runlocal")
  c.data.update(num_scenes=4, num_views=3, height=56, width=84)
  c.data.pipeline.update(buckets=((56, 84),), min_views=2, max_views=2)
  c.eval.update(num_scenes=1, num_views=2, height=56, width=84, at_start=False, at_end=False)
  c.progress = False
  c.total_steps = 2
  c.optim.warmup_steps = 1
  return c


@pytest.mark.parametrize("case,edits,needles", TRAIN_BATTERY, ids=[c[0] for c in TRAIN_BATTERY])
def test_train_battery(tmp_path, family_checkpoints, case, edits, needles):
  """Every bad config value and data source of ``train.py`` raises the error its ``run``
  prints as one line with exit status 2, naming the field or file and what was expected; the
  workdir it would have created is not left behind."""
  from geojax.train import trainer
  cfg = _train_config()
  for key, value in edits.items():
    node = cfg
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    value = value(tmp_path, family_checkpoints) if callable(value) else value
    if leaf in node:
      node[leaf] = value
    else:
      with node.unlocked() if hasattr(node, "unlocked") else nullcontext():
        node[leaf] = value
  wd = tmp_path / "run"
  with pytest.raises((ValueError, FileNotFoundError, FileExistsError, TypeError)) as e:
    trainer.train(cfg, str(wd))
  msg = " ".join(str(e.value).split())
  for n in needles:
    assert n in msg, (n, msg)
  assert len(msg) < 600, msg
  assert not wd.exists(), sorted(os.listdir(wd))


# ------------------------------------------------------ the bad-input battery: geojax convert


def _torch_file(tmp, obj, name="model.pth"):
  import torch
  p = tmp / name
  torch.save(obj, p)
  return str(p)


class _NotWeights:  # a pickled object that is not tensors: refused by weights_only
  pass


# (case, argv builder (tmp) -> list, substrings of the one error line)
CONVERT_BATTERY = [
    ("src-missing", lambda t: ["--family", "da3", "/nonexistent/m.pth", str(t / "dst")],
     ["/nonexistent/m.pth"]),
    ("src-zero-byte", lambda t: ["--family", "da3", _one_file(t, "m.pth", b""), str(t / "dst")],
     ["m.pth", "torch.load(weights_only=True)"]),
    ("src-text", lambda t: ["--family", "da3", _one_file(t, "m.pth", b"hello"), str(t / "dst")],
     ["m.pth", "torch.load(weights_only=True)"]),
    ("src-code-pickle", lambda t: ["--family", "da3", _torch_file(t, {"x": _NotWeights()}),
                                   str(t / "dst")], ["model.pth", "weights_only"]),
    ("src-other-model", lambda t: ["--family", "da3", "--preset", "da3-tiny",
                                   _torch_file(t, {"encoder.w": __import__("torch").ones(2)}),
                                   str(t / "dst")], ["da3-tiny", "missing"]),
    ("src-unknown-type", lambda t: ["--family", "da3", _one_file(t, "m.zip", b"PK"),
                                    str(t / "dst")], ["m.zip"]),
    ("dst-exists", lambda t: ["--family", "da3", _torch_file(t, {}), str(t / "exists")],
     ["exists/model.safetensors", "--overwrite"]),
    ("family-unknown", lambda t: ["--family", "sam3", _torch_file(t, {}), str(t / "dst")],
     ["sam3"]),
    ("preset-unknown", lambda t: ["--family", "da3", "--preset", "da3-huge",
                                  _torch_file(t, {}), str(t / "dst")], ["da3-huge"]),
    ("with-missing", lambda t: ["--family", "ppd", "--with", "/nonexistent/enc.pth",
                                _torch_file(t, {}), str(t / "dst")], ["/nonexistent/enc.pth"]),
    ("no-family", lambda t: [_torch_file(t, {}), str(t / "dst")], ["--family"]),
]


@pytest.mark.parametrize("case,argv,needles", CONVERT_BATTERY,
                         ids=[c[0] for c in CONVERT_BATTERY])
def test_convert_battery(tmp_path, capsys, case, argv, needles):
  """Every bad source, destination and option of ``geojax convert``: exit status 2, one line
  naming it, and no destination folder created."""
  (tmp_path / "exists").mkdir()
  (tmp_path / "exists" / "model.safetensors").write_bytes(b"a user's earlier conversion")
  args = argv(tmp_path)
  assert convert_cli.main(args) == 2
  _one_error_line(capsys.readouterr().err, "geojax convert: error:", *needles)
  assert not (tmp_path / "dst").exists()
  assert os.listdir(tmp_path / "exists") == ["model.safetensors"]
  assert (tmp_path / "exists" / "model.safetensors").read_bytes() == b"a user's earlier conversion"


@pytest.mark.parametrize("script,args,needles", [
    ("train.py", ["--config=configs/da3.py:runlocal", "--workdir=W", "--config.data.nosuch=1"],
     ["no config field", "nosuch"]),
    ("train.py", ["--config=configs/da3.py:preset=huge", "--workdir=W"],
     ["preset='huge'", "expected one of"]),
    ("evaluate.py", ["--config=configs/nope.py"], ["--config", "configs/nope.py"]),
    ("evaluate.py", ["--config=configs/evaluate.py:da3-tiny", "--config.data.height=abc"],
     ["--config.data.height=abc", "invalid literal"]),
])
def test_mains_refuse_bad_config_flags_in_one_line(tmp_path, script, args, needles):
  """A mistyped or unknown ``--config.*`` override or a failing config file: exit status 2
  and one line, not absl's traceback; the workdir is not created."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  args = [a.replace("=W", f"={tmp_path / 'run'}") for a in args]
  r = subprocess.run([sys.executable, os.path.join(root, script), *args], cwd=root,
                     capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 2, r.stderr[-2000:]
  _one_error_line(r.stderr, f"{script}: error:", *needles)
  assert not (tmp_path / "run").exists()
