"""PPD / PPVD as a family: the frozen semantic encoders (DA-V2 against a PyTorch DINOv2 forward
written here, Pi3 against its unrolled decoder, MoGe-2 through the shared encoder), the whole
model's converter (``geojax convert --with``), ``geojax predict`` on images (steps, seed,
ensemble, log-space alignment to a DA3 model) and with PPVD on a short video, bad input."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from geojax.convert import ppd as conv
from geojax.data.synthetic import render_image
from geojax.families import ppd as fam
from geojax.models import da3 as da3_lib
from geojax.models import ppd_pipeline as pipe
from geojax.models import ppd_semantics as sem
from geojax.models import registry
from geojax.predict import cli, load_model

torch = pytest.importorskip("torch")
F = torch.nn.functional


@pytest.fixture(autouse=True)
def _highest():
  with jax.default_matmul_precision("highest"):
    yield


def _torch_dinov2(sd, x, *, depth, heads, eps=1e-6):
  """DINOv2 ``forward_features(x)["x_norm_patchtokens"]`` (no registers, scale-factor position
  embedding) in plain PyTorch, from an official-layout state dict (``pretrained.*``)."""
  t = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}
  p = "pretrained."
  n, _, hh, ww = x.shape
  h, w = hh // 14, ww // 14
  tok = F.conv2d(x, t[p + "patch_embed.proj.weight"], t[p + "patch_embed.proj.bias"], stride=14)
  tok = tok.flatten(2).transpose(1, 2)
  tok = torch.cat([t[p + "cls_token"].expand(n, -1, -1), tok], 1)
  pe = t[p + "pos_embed"]
  m = int(round((pe.shape[1] - 1) ** 0.5))
  grid = pe[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
  grid = F.interpolate(grid, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic",
                       align_corners=False)
  tok = tok + torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], 1)
  c = tok.shape[-1]
  for i in range(depth):
    b = f"{p}blocks.{i}."
    y = F.layer_norm(tok, (c,), t[b + "norm1.weight"], t[b + "norm1.bias"], eps)
    qkv = F.linear(y, t[b + "attn.qkv.weight"], t[b + "attn.qkv.bias"])
    q, k, v = qkv.reshape(n, -1, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, -1, c)
    tok = tok + t[b + "ls1.gamma"] * F.linear(a, t[b + "attn.proj.weight"],
                                              t[b + "attn.proj.bias"])
    y = F.layer_norm(tok, (c,), t[b + "norm2.weight"], t[b + "norm2.bias"], eps)
    y = F.linear(F.gelu(F.linear(y, t[b + "mlp.fc1.weight"], t[b + "mlp.fc1.bias"])),
                 t[b + "mlp.fc2.weight"], t[b + "mlp.fc2.bias"])
    tok = tok + t[b + "ls2.gamma"] * y
  tok = F.layer_norm(tok, (c,), t[p + "norm.weight"], t[p + "norm.bias"], eps)
  return tok[:, 1:].numpy()


def test_dav2_semantics_equal_a_torch_forward():
  """DA-V2's ``forward_semantics``: ImageNet norm, size-based bicubic to the 14-pixel grid
  matching the DiT's 16-pixel grid, DINOv2 patch tokens; at two aspect ratios."""
  enc = sem.build("da2-tiny", rngs=nnx.Rngs(3))
  sd = dict(conv.iter_semantics_state_dict(enc))
  rng = np.random.default_rng(0)
  for h, w in ((48, 80), (64, 32)):
    img = rng.uniform(size=(2, h, w, 3)).astype(np.float32)
    got = np.asarray(enc(jnp.asarray(img)))
    x = torch.from_numpy(img).permute(0, 3, 1, 2)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = F.interpolate((x - mean) / std, size=((h // 16) * 14, (w // 16) * 14), mode="bicubic",
                      align_corners=False)
    with torch.no_grad():
      want = _torch_dinov2(sd, x, depth=2, heads=4)
    assert got.shape == (2, (h // 16) * (w // 16), 64)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= 1e-4, (h, w, err)


def test_pi3_semantics_are_the_last_two_decoder_blocks():
  """Pi3's ``forward_semantics``: bilinear to the 14-pixel grid, frames decoded jointly, the
  concatenated outputs of the last two decoder blocks without the 5 registers (checked against
  Pi3's unrolled decoder)."""
  enc = sem.build("pi3-tiny", rngs=nnx.Rngs(4))
  frames = jnp.asarray(np.random.default_rng(1).uniform(size=(3, 32, 48, 3)), jnp.float32)
  got = np.asarray(enc(frames))
  from geojax.nn import resize
  blocks = []
  enc.model(resize.resize_bilinear(frames, (28, 42))[None], collect=blocks)
  want = np.asarray(jnp.concatenate([blocks[-2], blocks[-1]], -1))[0][:, 5:]
  assert got.shape == (3, 6, 128) == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # the frames attend to each other: changing frame 2 changes frame 0's semantics
  other = np.asarray(enc(frames.at[2].set(0.0)))
  assert np.abs(other[0] - got[0]).max() > 1e-4


def test_moge2_semantics_grid_and_parameter_counts():
  enc = sem.build("moge2-tiny", rngs=nnx.Rngs(5))
  img = jnp.full((1, 64, 96, 3), 0.5)
  out = enc(img)
  want, _ = enc.encoder(img, 4, 6)
  assert out.shape == (1, 24, 64)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
  from geojax.nn.layers import count_params
  counts = {p: count_params(nnx.eval_shape(lambda p=p: sem.build(p, rngs=nnx.Rngs(0))))
            for p in ("da2", "pi3")}
  assert counts == {"da2": 304_368_640, "pi3": 958_696_732}
  full = nnx.eval_shape(lambda: pipe.PixelPerfectDepth.from_preset("ppd", rngs=nnx.Rngs(0)))
  assert count_params(full.dit) == 499_842_112
  with pytest.raises(ValueError, match="multiples of 16"):
    enc(jnp.zeros((1, 40, 48, 3)))


# ------------------------------------------------------------------------- convert / load


def _official_files(tmp_path, preset, seed=0):
  """A tiny model's tensors as the official releases ship them: the DiT pickle and the encoder's
  own checkpoint (DA-V2 pickle with its depth head; MoGe-2 ``{model_config, model}`` with its
  neck; Pi3 safetensors)."""
  from safetensors.numpy import save_file
  model = pipe.PixelPerfectDepth.from_preset(preset, rngs=nnx.Rngs(seed))
  sd = conv.pipeline_to_torch_state_dict(model)
  dit = {k[4:]: torch.from_numpy(v.copy()) for k, v in sd.items() if k.startswith("dit.")}
  enc = {k[12:]: v for k, v in sd.items() if k.startswith("sem_encoder.")}
  torch.save(dit, tmp_path / "dit.pth")
  kind = model.cfg.semantics.kind
  if kind == "pi3":
    save_file(enc, str(tmp_path / "enc.safetensors"))
    return model, sd, tmp_path / "enc.safetensors"
  enc = {k: torch.from_numpy(v.copy()) for k, v in enc.items()}
  if kind == "da2":
    enc["depth_head.scratch.output_conv.weight"] = torch.zeros(2, 3)
    torch.save(enc, tmp_path / "enc.pth")
  else:
    enc["neck.0.weight"] = torch.zeros(2)
    torch.save({"model_config": {"encoder": {"backbone": "dinov2_vits14",
                                             "intermediate_layers": [1, 3], "dim_out": 64}},
                "model": enc}, tmp_path / "enc.pth")
  return model, sd, tmp_path / "enc.pth"


@pytest.mark.parametrize("preset", ["ppd-tiny", "ppvd-tiny"])
def test_convert_with_encoder_round_trip(tmp_path, preset):
  model, sd, enc = _official_files(tmp_path, preset)
  out = tmp_path / "out"
  from geojax.convert import cli as convert_cli
  assert convert_cli.main([str(tmp_path / "dit.pth"), str(out), "--family", "ppd",
                           "--preset", preset, "--with", str(enc)]) == 0
  loaded, info = load_model(str(out))
  assert info["preset"] == preset and registry.family_of(loaded).name == "ppd"
  back = conv.pipeline_to_torch_state_dict(loaded)
  assert set(back) == set(sd)
  assert all(np.array_equal(back[k], sd[k]) for k in sd)


def test_convert_moge2_reads_its_taps(tmp_path):
  """MoGe-2's checkpoint keeps its architecture in ``model_config``; its neck is dropped."""
  model = pipe.PixelPerfectDepth.from_preset("ppd-tiny", rngs=nnx.Rngs(0))
  moge = sem.build("moge2-tiny", rngs=nnx.Rngs(1))
  full = pipe.PixelPerfectDepth(model.dit, moge)
  sd = conv.pipeline_to_torch_state_dict(full)
  dit = {k[4:]: torch.from_numpy(v.copy()) for k, v in sd.items() if k.startswith("dit.")}
  enc = {k[12:]: torch.from_numpy(v.copy()) for k, v in sd.items()
         if k.startswith("sem_encoder.")}
  enc["neck.0.weight"] = torch.zeros(2)
  torch.save(dit, tmp_path / "dit.pth")
  torch.save({"model_config": {"encoder": {"intermediate_layers": 2, "dim_out": 64}},
              "model": enc}, tmp_path / "moge.pt")
  tensors, config = fam.convert_state_dict(
      _np(torch.load(tmp_path / "dit.pth", weights_only=True)),
      _np(torch.load(tmp_path / "moge.pt", weights_only=True)))
  assert config["semantics"] == {"taps": [2, 3], "out": 64}
  assert config["model_name"] == "ppd-moge" and "sem_encoder.neck.0.weight" not in tensors
  cfg = conv.pipeline_config({"model_name": "ppd-tiny", "semantics": config["semantics"]},
                             tensors)
  assert cfg.semantics.taps == (2, 3)


def _np(obj):
  if isinstance(obj, dict):
    return {k: _np(v) for k, v in obj.items()}
  return obj.numpy() if hasattr(obj, "numpy") else obj


@pytest.mark.parametrize("with_enc,needle", [
    (False, "pass the encoder's checkpoint with --with"),
    ("wrong", "keys da2 semantic encoder does not use"),
])
def test_convert_errors_are_one_line(tmp_path, capsys, with_enc, needle):
  _official_files(tmp_path, "ppd-tiny")
  args = [str(tmp_path / "dit.pth"), str(tmp_path / "out"), "--family", "ppd", "--preset",
          "ppd-tiny"]
  if with_enc == "wrong":
    big = sem.build("da2-tiny", rngs=nnx.Rngs(0), depth=3)
    sd = dict(conv.iter_semantics_state_dict(big))
    torch.save({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, tmp_path / "big.pth")
    args += ["--with", str(tmp_path / "big.pth")]
  from geojax.convert import cli as convert_cli
  code = convert_cli.main(args)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and needle in err[0], err
  assert not (tmp_path / "out" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- predict

H, W = 48, 64
ARGS = ["--no-progress", "--steps", "2", "--area", str(H * W)]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  from geojax.io import checkpoint
  root = tmp_path_factory.mktemp("ppd")
  return {name: checkpoint.save_model(str(root / name), model, family, {"preset": preset})
          for name, model, family, preset in (
              ("ppd", pipe.PixelPerfectDepth.from_preset("ppd-tiny", rngs=nnx.Rngs(0)), "ppd",
               "ppd-tiny"),
              ("da3", da3_lib.DA3.from_preset("da3-tiny", rngs=nnx.Rngs(1)), "da3", "da3-tiny"))}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  root = tmp_path_factory.mktemp("photos")
  for i in range(2):
    Image.fromarray(render_image(0, i, height=H, width=W)["images"]).save(root / f"v{i}.png")
  return root


def test_predict_images_seed_ensemble(ckpts, photos, tmp_path):
  """Depth at the input size; the same seed repeats exactly, another seed differs, and the
  ensemble of two seeds is their mean."""
  model, _ = load_model(ckpts["ppd"])
  ims = [np.asarray(Image.open(photos / f"v{i}.png")) for i in range(2)]
  opts = dict(steps=2, area=H * W)
  a = fam.predict(model, ims, noise_seed=0, **opts)
  assert a.depth.shape == (2, H, W) and np.isfinite(a.depth).all()
  np.testing.assert_array_equal(fam.predict(model, ims, noise_seed=0, **opts).depth, a.depth)
  b = fam.predict(model, ims, noise_seed=5, **opts)
  assert np.abs(b.depth - a.depth).max() > 1e-3
  # ensemble member e of image i uses the seed stream of image i: check against two runs
  e2 = fam.predict(model, ims[:1], noise_seed=0, ensemble=2, **opts).depth[0]
  x = jnp.asarray(np.asarray(Image.open(photos / "v0.png"))[None] / 255.0, jnp.float32)
  noise = jax.random.normal(jax.random.fold_in(jax.random.key(0), 0), (2, 1, H, W))
  one = [np.asarray(pipe.depth(model, x, noise[e:e + 1], steps=2))[0] for e in range(2)]
  np.testing.assert_allclose(e2, (one[0] + one[1]) / 2, rtol=1e-4, atol=1e-5)


def test_predict_cli_with_alignment(ckpts, photos, tmp_path, capsys):
  """``--align-to`` a DA3 model: PPD's log-depth mapped by a log-space fit to DA3's depth, DA3's
  cameras, a point cloud; the raw log-depth kept as an extra map."""
  out = tmp_path / "out"
  code = cli.main(["--weights", ckpts["ppd"], "--align-to", ckpts["da3"], "--out", str(out),
                   "--ensemble", "2", *ARGS, str(photos)])
  assert code == 0, capsys.readouterr().err
  root = out / os.path.basename(str(photos))
  cams = json.load(open(root / "cameras.json"))
  assert cams["model"]["family"] == "ppd" and len(cams["frames"]) == 2
  depth = np.load(root / "depth" / "v0.npy")
  rel = np.load(root / "log_depth" / "v0.npy")
  assert depth.shape == rel.shape == (H, W) and (depth > 0).mean() > 0.9
  # depth = expm1(a * rel + b) with one (a, b) per image: log1p(depth) is affine in rel
  ok = depth > 0
  a_mat = np.stack([rel[ok], np.ones(ok.sum())], -1)
  coef, *_ = np.linalg.lstsq(a_mat, np.log1p(depth[ok]), rcond=None)
  np.testing.assert_allclose(a_mat @ coef, np.log1p(depth[ok]), atol=1e-3)
  assert (root / "points.ply").stat().st_size > 1000


def test_predict_video_with_ppvd(tmp_path, capsys):
  """PPVD on a 5-frame video (padded to one 16-frame window): depth per frame at the input
  size, written as a scene (128 x 128 windows to keep CPU time down)."""
  from geojax.io import checkpoint
  model = pipe.PixelPerfectDepth.from_preset("ppvd-tiny", rngs=nnx.Rngs(0), size=128)
  ck = checkpoint.save_model(str(tmp_path / "ppvd"), model, "ppd",
                             {"preset": "ppvd-tiny", "overrides": {"size": 128}})
  frames = tmp_path / "clip"
  frames.mkdir()
  for i in range(5):
    Image.fromarray(render_image(1, i, height=40, width=56)["images"]).save(
        frames / f"f{i:03d}.png")
  out = tmp_path / "out"
  code = cli.main(["--weights", ck, "--out", str(out), "--no-progress", "--steps", "1",
                   str(frames)])
  assert code == 0, capsys.readouterr().err
  root = out / "clip"
  d = np.stack([np.load(root / "depth" / f"f{i:03d}.npy") for i in range(5)])
  assert d.shape == (5, 40, 56) and np.isfinite(d).all()
  strip = np.asarray(Image.open(root / "strip.png"))
  assert strip.shape == (2 * 40, 5 * 56, 3)  # five frames, image over depth


@pytest.mark.parametrize("extra,needle", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--ensemble", "0"], "--ensemble must be >= 1"),
    (["--area", "10"], "--area must be at least 256"),
    (["--align-to", "{ppd}"], "a PPD model has no scale to align to"),
])
def test_bad_inputs_one_line(ckpts, photos, tmp_path, capsys, extra, needle):
  extra = [a.format(**ckpts) for a in extra]
  code = cli.main(["--weights", ckpts["ppd"], "--out", str(tmp_path / "out"), "--no-progress",
                   "--area", str(H * W), *extra, str(photos)])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and needle in err[0], err


def test_family_registered():
  f = registry.get_family("ppd")
  assert all(registry.family_for_preset(p) is f for p in pipe.PRESET_NAMES)
  assert f.predicts({"preset": "ppd"}) == ("depth",)


def test_evaluate_scores_ppd(ckpts, tmp_path):
  """evaluate.py on a PPD checkpoint: log-space alignment by default, AbsRel / delta1, the
  edge-aware Chamfer distance and the flying-pixel ratio."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, root)
  import evaluate
  from configs import evaluate as eval_config
  cfg = eval_config.get_config("ppd-tiny")
  assert cfg.model.family == "ppd" and cfg.depth_align == "log_affine"
  cfg.model.update(checkpoint=ckpts["ppd"], steps=2, area=H * W)
  cfg.data.update(num_scenes=1, num_views=1, height=H, width=W)
  cfg.metrics = "depth,edge"
  cfg.out_dir = str(tmp_path / "eval")
  mean = evaluate.evaluate(cfg)["mean"]
  for key in ("abs_rel", "delta1", "edge_chamfer", "edge_flying_ratio"):
    assert key in mean and np.isfinite(mean[key]), key
  assert 0 <= mean["edge_flying_ratio"] <= 1
