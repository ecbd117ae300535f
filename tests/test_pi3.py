"""Pi3 (``geojax.models.pi3``): parameter totals and key names of the released model, the parts
shared with DAGE against the DAGE parity fixture, and the stated semantics of the rest (point
remap, pixel-shuffle channel order, world points, frame-permutation equivariance), the
converter's round trip and the official MoGe-2 + Pi3 -> DAGE merge recipe.

The whole released Pi3 was also compared once with the official ``yyfz/Pi3@9fa3ddb`` network
(random weights, 3 views of 56 x 70, fp32): max relative error 1.0e-6 (local points), 1.4e-6
(conf), 1.0e-6 (poses), bit-identical state-dict round trip (recorded in BENCHMARKS.md).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geojax.convert import dage as dage_conv
from geojax.convert import pi3 as conv
from geojax.models import dage as dage_lib
from geojax.models import pi3 as pi3_lib

ROOT = os.environ.get("GEOJAX_SHARED", os.path.join(os.path.dirname(__file__), "..", "..",
                                                    "shared"))
FIX = os.path.join(ROOT, "fixtures", "dage")


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def n_params(model):
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.fixture(scope="module")
def tiny():
  return pi3_lib.Pi3.from_preset("pi3-tiny", rngs=nnx.Rngs(0), scan=False)


@pytest.fixture(scope="module")
def video():
  return jnp.asarray(np.random.default_rng(0).uniform(size=(1, 3, 42, 56, 3)), jnp.float32)


def test_released_parameter_count_and_keys():
  abstract = nnx.eval_shape(lambda: pi3_lib.Pi3.from_preset("pi3", rngs=nnx.Rngs(0)))
  assert n_params(abstract) == 958_696_732  # sum(p.numel()) of the official Pi3()
  keys = conv.official_keys("pi3")
  assert len(keys) == len(set(keys)) == 1208
  for k in ("decoder.35.attn.q_norm.weight", "conf_decoder.blocks.4.mlp.fc2.weight",
            "encoder.register_tokens", "camera_head.more_mlps.2.weight", "conf_head.proj.bias",
            "camera_head.res_conv.1.res_conv3.bias", "encoder.blocks.23.ls2.gamma"):
    assert k in keys, k
  assert "encoder.mask_token" not in keys  # deleted by the official constructor


def _pi3_config_of(dage_cfg: dage_lib.DAGEConfig, **kw) -> pi3_lib.Pi3Config:
  c = dage_cfg
  return pi3_lib.Pi3Config(
      enc_dim=c.lr_dim, enc_depth=c.lr_depth, enc_heads=c.lr_heads, dec_dim=c.dec_dim,
      dec_depth=c.dec_depth, dec_heads=c.dec_heads, num_registers=c.num_registers,
      head_dim=c.point_dim, head_depth=c.point_depth, head_heads=c.point_heads,
      point_out=c.point_out, cam_dim=c.cam_dim, cam_depth=c.cam_depth, cam_heads=c.cam_heads,
      cam_out=c.cam_out, **kw)


def _with_conf_from_points(sd):
  """A Pi3 state dict whose confidence branch copies the point branch's x channel."""
  out = {k: v for k, v in sd.items() if k.startswith(conv._SHARED_PREFIXES)}
  for k, v in sd.items():
    if k.startswith("point_decoder."):
      out["conf_decoder." + k[len("point_decoder."):]] = v
  p = 14 * 14
  out["conf_head.proj.weight"] = sd["point_head.proj.weight"][:p]  # channel 0 = rows [0, 196)
  out["conf_head.proj.bias"] = sd["point_head.proj.bias"][:p]
  return out


@pytest.mark.skipif(not os.path.exists(os.path.join(FIX, "weights.safetensors")),
                    reason=f"DAGE parity fixture not found at {FIX} (set GEOJAX_SHARED)")
def test_shared_parts_equal_the_dage_fixture():
  """Pi3 on the fixture's LR video with DAGE's LR weights gives the official DAGE cameras and
  decoder blocks; its conf branch (a copy of the point branch's x channel) then equals
  ``local_points_x / local_points_z`` pixel for pixel (pixel-shuffle channel order, remap)."""
  from safetensors.numpy import load_file
  dcfg = dage_conv.config_from_reference(json.load(open(os.path.join(FIX, "config.json"))))
  sd = load_file(os.path.join(FIX, "weights.safetensors"))
  io = dict(np.load(os.path.join(FIX, "io.npz")))
  model = conv.from_torch_state_dict(_with_conf_from_points(sd),
                                     _pi3_config_of(dcfg, scan=False), strict_unexpected=True)
  lr = jnp.asarray(io["lr_video"].transpose(0, 1, 3, 4, 2))
  blocks = []
  out = model(lr, tap=1, collect=blocks)
  assert rel(out["camera_poses"], io["camera_poses"]) <= 1e-4
  for i, blk in enumerate(blocks):
    assert rel(np.asarray(blk).reshape(io[f"lr_decoder_block{i}"].shape),
               io[f"lr_decoder_block{i}"]) <= 1e-4, i
  assert rel(out["features"].reshape(io["lr_decoder_block1"].shape),
             io["lr_decoder_block1"]) <= 1e-4
  lp = np.asarray(out["local_points"], np.float64)
  np.testing.assert_allclose(np.asarray(out["conf"]), lp[..., 0] / lp[..., 2], rtol=1e-5,
                             atol=1e-6)


def test_remap_world_points_and_shapes(tiny, video):
  out = tiny(video, tap=2)
  b, n, h, w = video.shape[:4]
  assert out["local_points"].shape == out["points"].shape == (b, n, h, w, 3)
  assert out["conf"].shape == (b, n, h, w) and out["camera_poses"].shape == (b, n, 4, 4)
  assert out["features"].shape == (b, n * (5 + (h // 14) * (w // 14)), tiny.cfg.dec_dim)
  lp = np.asarray(out["local_points"], np.float64)
  assert (lp[..., 2] > 0).all()
  poses = np.asarray(out["camera_poses"], np.float64)
  r = poses[..., :3, :3]
  np.testing.assert_allclose(r @ np.swapaxes(r, -1, -2), np.broadcast_to(np.eye(3), r.shape),
                             atol=1e-5)
  np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-5)
  np.testing.assert_allclose(poses[..., 3, :], np.broadcast_to([0, 0, 0, 1.0], (b, n, 4)))
  world = np.einsum("bnij,bnhwj->bnhwi", r, lp) + poses[:, :, None, None, :3, 3]
  np.testing.assert_allclose(np.asarray(out["points"]), world, rtol=1e-5, atol=1e-5)


def test_point_remap_and_channel_order(tiny, video):
  """With the point head's weight zeroed, the raw output is its bias laid out by the pixel
  shuffle: pixel (i, j) of a patch reads bias[c * 196 + i * 14 + j] for channel c, and the
  remap gives (x e^z, y e^z, e^z)."""
  bias = np.random.default_rng(1).normal(size=(3 * 196,)).astype(np.float32) * 0.3
  m = nnx.clone(tiny)
  m.point_head.proj.kernel[...] = jnp.zeros_like(m.point_head.proj.kernel[...])
  m.point_head.proj.bias[...] = jnp.asarray(bias)
  lp = np.asarray(m(video)["local_points"][0, 0], np.float64)
  raw = bias.reshape(3, 14, 14).transpose(1, 2, 0)
  z = np.exp(raw[..., 2])
  want = np.stack([raw[..., 0] * z, raw[..., 1] * z, z], -1)
  for pr, pc in ((0, 0), (1, 3), (2, 2)):
    np.testing.assert_allclose(lp[pr * 14:(pr + 1) * 14, pc * 14:(pc + 1) * 14], want,
                               rtol=1e-5)


def test_frame_permutation_equivariance(tiny, video):
  """No reference frame: permuting the frames permutes every output the same way."""
  perm = np.array([2, 0, 1])
  a = tiny(video)
  b = tiny(video[:, perm])
  for k in ("local_points", "conf", "camera_poses", "points"):
    want = np.asarray(a[k])[:, perm]
    # Frame order changes the float summation order; near-zero coordinates (of points ~2 m
    # out) then differ by ~5e-5 on some CPUs, so the absolute floor scales with the values.
    np.testing.assert_allclose(np.asarray(b[k]), want, rtol=2e-4,
                               atol=5e-5 * max(1.0, float(np.abs(want).max())), err_msg=k)


def test_round_trip_and_identification(tiny, video, tmp_path):
  from safetensors.numpy import save_file
  sd = conv.to_torch_state_dict(tiny)
  assert sd["image_mean"].shape == (1, 3, 1, 1)
  back = conv.to_torch_state_dict(conv.from_torch_state_dict(sd, tiny.cfg,
                                                             strict_unexpected=True))
  assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
  path = str(tmp_path / "pi3.safetensors")
  save_file(sd, path)
  assert conv.is_official(path) and not dage_conv.is_official(path)
  loaded = conv.load_official(path, tiny.cfg)
  np.testing.assert_array_equal(np.asarray(loaded(video)["camera_poses"]),
                                np.asarray(tiny(video)["camera_poses"]))
  broken = dict(sd)
  del broken["conf_head.proj.weight"]
  with pytest.raises(ValueError, match="conf_head.proj.weight"):
    conv.from_torch_state_dict(broken, tiny.cfg)
  (tmp_path / "pi3.pt").write_bytes(b"not a pickle")
  with pytest.raises(ValueError, match="only safetensors"):
    conv.load_official(str(tmp_path / "pi3.pt"))


def test_bad_inputs(tiny):
  with pytest.raises(ValueError, match=r"\(B, N, H, W, 3\)"):
    tiny(jnp.zeros((2, 42, 56, 3)))
  with pytest.raises(ValueError, match="multiples of 14"):
    tiny(jnp.zeros((1, 2, 40, 56, 3)))
  with pytest.raises(ValueError, match="tap"):
    tiny(jnp.zeros((1, 2, 42, 56, 3)), tap=4)
  with pytest.raises(ValueError, match="unknown Pi3 preset"):
    pi3_lib.get_config("pi3-huge")


def test_pixel_limit_size():
  """The official loader's size rule (``pi3/utils/basic.py``), values worked out by hand."""
  assert pi3_lib.pixel_limit_size(1080, 1920) == (378, 672)
  assert pi3_lib.pixel_limit_size(480, 640) == (434, 574)
  assert pi3_lib.pixel_limit_size(3000, 4000) == (434, 574)
  assert pi3_lib.pixel_limit_size(512, 512) == (504, 504)
  assert pi3_lib.pixel_limit_size(56, 84) == (406, 616)  # small images are scaled up
  for h, w in ((1080, 1920), (700, 300), (50, 5000)):
    ph, pw = pi3_lib.pixel_limit_size(h, w)
    assert ph % 14 == 0 and pw % 14 == 0 and ph * pw <= pi3_lib.PIXEL_LIMIT
  with pytest.raises(ValueError, match="non-empty"):
    pi3_lib.pixel_limit_size(0, 10)


def test_dage_init_from_moge2_and_pi3():
  """The official merge: Pi3's trunk and camera branch, MoGe-2's encoder / neck / heads under
  DAGE's ``hr_*`` names; the rest (adapter, cls decoder, token splitter) keeps its init. The
  merged DAGE's cameras then equal Pi3's on the same LR input."""
  dcfg = dage_lib.get_config("dage-tiny", scan=False)
  teacher = pi3_lib.Pi3.from_config(_pi3_config_of(dcfg, scan=False), rngs=nnx.Rngs(3))
  student = dage_lib.DAGE.from_config(dcfg, rngs=nnx.Rngs(4))
  pi3_sd = conv.to_torch_state_dict(teacher)
  rng = np.random.default_rng(5)
  moge = {}
  for k, v in dage_conv.iter_torch_state_dict(student):
    for a, b in conv._MOGE_TO_DAGE:
      if k.startswith(b):
        moge[a + k[len(b):]] = v if k.endswith(("image_mean", "image_std")) else rng.normal(
            size=v.shape).astype(np.float32)
  moge["normal_head.0.weight"] = np.zeros((3, 3), np.float32)  # MoGe-2 parts DAGE drops
  merged = conv.dage_init_state_dict(moge, pi3_sd)
  assert not any(k.startswith(("conf_", "normal_head")) for k in merged)
  model, loaded, kept = conv.merge_into_dage(student, merged)
  assert sorted(loaded) == sorted(merged)
  assert any(k.startswith("adapter.") for k in kept) and any(
      k.startswith("token_splitter.") for k in kept)
  out_sd = dage_conv.to_torch_state_dict(model)
  np.testing.assert_array_equal(out_sd["hr_neck.res_blocks.1.0.layers.2.weight"],
                                moge["neck.res_blocks.1.0.layers.2.weight"])
  before = dage_conv.to_torch_state_dict(student)
  np.testing.assert_array_equal(out_sd["adapter.linear_out.weight"],
                                before["adapter.linear_out.weight"])
  x = jnp.asarray(rng.uniform(size=(1, 2, 56, 84, 3)), jnp.float32)
  got = model(x, x, lr_resolution=(56, 84), hr_num_tokens=24)["camera_poses"]
  np.testing.assert_allclose(np.asarray(got), np.asarray(teacher(x)["camera_poses"]),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="MoGe-2"):
    conv.dage_init_state_dict({}, pi3_sd)


def test_pi3_family_predict_and_official_weights(tiny, tmp_path, capsys):
  """``geojax predict`` runs Pi3 from a geojax checkpoint and from official safetensors: outputs
  at the official loader's size (a small pixel limit here), cameras, point maps; DAGE options are
  refused in one line."""
  from PIL import Image
  from safetensors.numpy import save_file

  from geojax.data.synthetic import render_scene
  from geojax.io import checkpoint
  from geojax.models import registry
  from geojax.predict import cli, load_model
  scene = render_scene(0, 4, num_views=3, height=48, width=64)
  clip = tmp_path / "clip"
  clip.mkdir()
  for i, img in enumerate(scene["images"]):
    Image.fromarray(img).save(clip / f"f{i}.png")
  assert registry.family_for_preset("pi3-tiny").name == "pi3"
  ckpt = checkpoint.save_model(str(tmp_path / "ckpt"), tiny, "pi3", {"preset": "pi3-tiny",
                                                                     "overrides": {"scan": False}})
  out = tmp_path / "out"
  code = cli.main(["--weights", ckpt, "--out", str(out), "--no-progress", "--pixel-limit",
                   "3000", str(clip)])
  assert code == 0, capsys.readouterr().err
  cams = json.load(open(out / "clip" / "cameras.json"))
  assert cams["model"]["family"] == "pi3" and len(cams["frames"]) == 3
  depth = np.load(out / "clip" / "depth" / "f0.npy")
  assert depth.shape == pi3_lib.pixel_limit_size(48, 64, 3000) and np.all(depth > 0)
  assert (out / "clip" / "point_map_local").exists()
  code = cli.main(["--weights", ckpt, "--out", str(tmp_path / "o2"), "--no-progress",
                   "--chunk", "2", str(clip)])
  assert code == 2 and "--chunk does not apply to pi3 models" in capsys.readouterr().err
  d = tmp_path / "official"
  d.mkdir()
  save_file(conv.to_torch_state_dict(tiny), str(d / "model.safetensors"))
  with pytest.raises(ValueError, match="does not fit this Pi3 configuration"):
    load_model(str(d))  # official weights are the released size; tiny ones do not fit
  # a pickled training checkpoint goes through `geojax convert` once (torch weights_only)
  torch = pytest.importorskip("torch")
  from geojax.convert import cli as convert_cli
  torch.save({"model": {k: torch.from_numpy(v) for k, v in conv.to_torch_state_dict(tiny).items()},
              "epoch": 3}, str(tmp_path / "pi3.pth"))
  assert convert_cli.main([str(tmp_path / "pi3.pth"), str(tmp_path / "conv"), "--family", "pi3",
                           "--preset", "pi3-tiny"]) == 0
  back = conv.load_official(str(tmp_path / "conv"), tiny.cfg)
  np.testing.assert_array_equal(np.asarray(back.conf_head.proj.kernel[...]),
                                np.asarray(tiny.conf_head.proj.kernel[...]))
