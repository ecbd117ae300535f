"""PPD / PPVD training and evaluation: configs, the task (non-finite depth masked and counted,
frozen encoder, the official loss), the official DiT initialisation, PPVD's start from PPD, the
encoder weights, a short ``train.py`` run with evaluation, and the log-space alignment and
flying-pixel metrics."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geojax.convert import ppd as conv
from geojax.families import ppd as fam
from geojax.models import ppd_pipeline as pipe
from geojax.models import ppd_semantics as sem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _config(arg="runlocal", **over):
  from configs import ppd as cfg_mod
  c = cfg_mod.get_config(arg)
  for k, v in over.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def test_config_variants_and_errors():
  from configs import ppd as cfg_mod
  for preset in cfg_mod.PRESETS:
    for stage in cfg_mod.STAGES:
      c = cfg_mod.get_config(f"preset={preset},stage={stage}")
      assert c.model.preset == preset and c.loss.pretrain == (stage == "pretrain")
      assert c.optim.frozen == (r"^sem_encoder(/|$)",)
  assert cfg_mod.get_config("preset=ppvd").data.pipeline.buckets == ((512, 512),)
  local = cfg_mod.get_config("runlocal")
  assert local.model.preset == "ppd-small" and local.eval.depth_align == "log_affine"
  with pytest.raises(ValueError, match="stage='warm'"):
    cfg_mod.get_config("stage=warm")
  from geojax.train.tasks import make_task
  task = make_task(local)
  assert task.family == "ppd" and not task.video and not task.pretrain
  for over, needle in [({"data.pipeline.max_views": 2}, "single images"),
                       ({"data.pipeline.buckets": ((60, 96),)}, "multiples of 16"),
                       ({"loss.weight": 1.0}, "unknown fields")]:
    with pytest.raises(ValueError, match=needle):
      make_task(_config(**over))
  video = _config("runlocal,preset=ppvd-tiny")
  with pytest.raises(ValueError, match="512 x 512 windows"):
    make_task(video)


def _batch(b=2, s=1, h=32, w=48, seed=0):
  rng = np.random.default_rng(seed)
  depth = rng.uniform(1.0, 10.0, (b, s, h, w)).astype(np.float32)
  depth[0, 0, :3, :5] = np.nan
  depth[-1, -1, 5, 7] = np.inf
  return {"images": rng.integers(0, 255, (b, s, h, w, 3), dtype=np.uint8), "depth": depth,
          "valid": depth > 0}


def test_task_masks_nonfinite_depth_and_freezes_the_encoder():
  """Non-finite depth is masked and counted (16 pixels), the loss equals the official loss on
  the sanitised batch, and no gradient reaches the frozen encoder."""
  from geojax.losses import ppd as L
  model = pipe.PixelPerfectDepth.from_preset("ppd-tiny", rngs=nnx.Rngs(0))
  task = fam.PPDTask()
  batch = _batch()
  loss_and_grad = nnx.jit(nnx.value_and_grad(task.loss_fn, has_aux=True))
  (loss, aux), grads = loss_and_grad(model, batch, jax.random.key(3))
  assert np.isfinite(float(loss)) and float(aux["nonfinite_px"]) == 16
  x = jnp.asarray(batch["images"][:, 0], jnp.float32) / 255.0
  d = jnp.asarray(np.nan_to_num(batch["depth"][:, 0], nan=0.0, posinf=0.0))
  want = nnx.jit(lambda m: L.flow_matching_loss(m.dit, x, m.semantics(x), d, d > 0,
                                                key=jax.random.key(3)))(model)
  assert float(loss) == pytest.approx(float(want["total"]), rel=1e-5)
  enc = jax.tree.leaves(nnx.state(grads.sem_encoder))
  assert enc and all(float(jnp.abs(g).max()) == 0 for g in enc)
  dit = jax.tree.leaves(nnx.state(grads.dit))
  assert all(np.isfinite(np.asarray(g)).all() for g in dit)
  assert sum(float(jnp.abs(g).sum()) for g in dit) > 0


def test_video_task_one_timestep_and_normalisation_per_window():
  """PPVD windows: finite loss with non-finite pixels masked and counted; the loss draws one
  timestep and normalises the depth once per window (checked with a stand-in velocity model)."""
  from geojax.losses import ppd as L
  model = pipe.PixelPerfectDepth.from_preset("ppvd-tiny", rngs=nnx.Rngs(0), size=64)
  task = fam.PPDTask(video=True)
  batch = _batch(b=2, s=3, h=64, w=64)
  loss, aux = nnx.jit(task.loss_fn)(model, batch, jax.random.key(1))
  assert np.isfinite(float(loss)) and float(aux["nonfinite_px"]) == 16
  d = jnp.asarray(np.nan_to_num(batch["depth"][1], nan=0.0, posinf=0.0))
  x = jnp.zeros((3, 64, 64, 3))
  out = L.flow_matching_loss(lambda xx, s, t: jnp.zeros_like(xx[..., :1]), x, None, d, d > 0,
                             key=jax.random.key(2), window=True)
  assert out["t"].shape == () and out["quantiles"].shape == (1, 2)
  # one normalisation for the window: the frames share the quantiles of all their pixels
  lat, _ = L.encode_gt(d.reshape(1, -1, 64), (d > 0).reshape(1, -1, 64))
  np.testing.assert_allclose(np.asarray(out["latent"]), np.asarray(lat).reshape(3, 64, 64))
  per_frame, _ = L.encode_gt(d, d > 0)
  assert np.abs(np.asarray(per_frame) - np.asarray(out["latent"])).max() > 1e-3


def test_official_initialisation():
  model = pipe.PixelPerfectDepth.from_preset("ppd-tiny", rngs=nnx.Rngs(0))
  dit = fam.init_training_start(model.dit)
  sd = conv.to_torch_state_dict(dit)
  for k, v in sd.items():
    if "adaLN_modulation" in k or k.startswith("final_layer.linear."):
      assert not v.any(), k
  w = sd["blocks.0.attn.qkv.weight"]
  a = np.sqrt(6 / sum(w.shape))
  assert np.abs(w).max() <= a and np.abs(w).max() > 0.9 * a and not sd["blocks.0.attn.qkv.bias"].any()
  assert np.std(sd["t_embedder.mlp.0.weight"]) == pytest.approx(0.02, rel=0.1)
  np.testing.assert_array_equal(sd["blocks.0.attn.q_norm.weight"], 1.0)
  # zero final layer: the untrained DiT predicts zero velocity
  x = jnp.zeros((1, 32, 32, 4))
  v = dit(x, jnp.ones((1, 4, dit.cfg.semantics_dim)), 500)
  assert not np.asarray(v).any()


def test_initialize_sources_and_errors(tmp_path):
  from ml_collections import ConfigDict
  from safetensors.numpy import save_file
  init = lambda **kw: ConfigDict(dict(dict(weights="", checkpoint="", semantics="", ppd=""), **kw))
  tiny = pipe.PixelPerfectDepth.from_preset("ppd-tiny", rngs=nnx.Rngs(0))
  src = fam.initialize(tiny, init())
  assert not conv.to_torch_state_dict(src.dit)["final_layer.linear.weight"].any()
  # the encoder from init.semantics (its own release or a converted whole model)
  enc = sem.build("da2-tiny", rngs=nnx.Rngs(7))
  save_file(dict(conv.iter_semantics_state_dict(enc)), str(tmp_path / "enc.safetensors"))
  src = fam.initialize(tiny, init(semantics=str(tmp_path / "enc.safetensors")))
  got = dict(conv.iter_semantics_state_dict(src.sem_encoder))
  want = dict(conv.iter_semantics_state_dict(enc))
  assert all(np.array_equal(got[k], want[k]) for k in want)
  # PPVD from a PPD: spatial blocks, embedders and final layer copied; temporal gates at zero
  from geojax.io import checkpoint
  ppd_model = pipe.PixelPerfectDepth.from_preset("ppd-tiny", rngs=nnx.Rngs(1), dim=16,
                                                 depth=24)  # the widths of ppvd-tiny
  path = checkpoint.save_model(str(tmp_path / "ppd"), ppd_model, "ppd",
                               {"preset": "ppd-tiny", "overrides": {"dim": 16, "depth": 24}})
  video = pipe.PixelPerfectDepth.from_preset("ppvd-tiny", rngs=nnx.Rngs(0), size=64)
  out = fam.initialize(video, init(ppd=path))
  have = conv.to_torch_state_dict(ppd_model.dit)
  sd = conv.to_torch_state_dict(out.dit)
  for k in ("blocks.3.mlp.fc1.weight", "x_embedder.proj.weight", "final_layer.linear.bias",
            "t_embedder.mlp.2.weight"):
    np.testing.assert_array_equal(sd[k], have[k])
  assert not sd["temporal_blocks.0.adaLN_modulation.1.weight"].any()
  abstract = nnx.eval_shape(lambda: pipe.PixelPerfectDepth.from_preset("ppd",
                                                                       rngs=nnx.Rngs(0)))
  for kw, needle, model in [
      ({}, "init.semantics is required", abstract),
      ({"ppd": path}, "init.ppd starts a PPVD", tiny),
      ({"semantics": "x", "weights": "y"}, "exclude init.weights", tiny),
      ({"semantics": str(tmp_path / "missing")}, "no such file", tiny),
      ({"ppd": str(tmp_path / "enc.safetensors")}, "init.ppd", video)]:
    with pytest.raises((ValueError, FileNotFoundError), match=needle):
      fam.initialize(model, init(**kw))


def test_short_training_run_with_evaluation(tmp_path):
  """train.py's loop on PPD: a few steps; evaluation before and after scores depth after
  log-space alignment, the edge-aware Chamfer distance and the flying-pixel ratio."""
  from geojax.train import trainer
  c = _config(**{"total_steps": 3, "batch_size": 2, "optim.warmup_steps": 1,
                 "model.preset": "ppd-tiny"})
  c.eval.update(num_scenes=1, pictures=False, steps=2)
  c.checkpoint.update(every=0)
  c.log_every = 1
  c.tensorboard = False
  c.progress = False
  summary = trainer.train(c, str(tmp_path / "run"))
  assert summary["steps"] == 3
  for part in ("before", "after"):
    assert {"abs_rel", "delta1", "edge_chamfer", "edge_flying_ratio"} <= set(summary[part])
    assert all(np.isfinite(v) for v in summary[part].values()), summary[part]


# ------------------------------------------------------------------------------- metrics


def test_log_affine_alignment_recovers_log_depth():
  from geojax.geometry.alignment import align_depth
  gt = np.random.default_rng(0).uniform(0.5, 20.0, (2, 8, 9))
  pred = (np.log1p(gt) - 0.3) / 2.5  # affine in log(1 + d), as PPD's output
  out = np.asarray(align_depth(pred, gt, gt > 0, mode="log_affine"))
  np.testing.assert_allclose(out, gt, rtol=1e-4)
  from geojax.eval import metrics as M
  assert M.depth_metrics(pred[0], gt[0], gt[0] > 0, align="log_affine")["abs_rel"] < 1e-4


def test_flying_pixels_at_a_depth_edge():
  """A step edge (2 m in front of 6 m): a sharp prediction has no flying pixels; one that
  blends the two surfaces across the edge (as latent-space models do) has them."""
  from geojax.eval import metrics as M
  gt = np.full((32, 32), 6.0)
  gt[:, :16] = 2.0
  sharp = M.flying_pixels(gt.copy(), gt)
  assert sharp["flying_count"] == 0 and sharp["edge_pixels"] > 0
  blur = gt.copy()
  blur[:, 14:18] = np.linspace(2.0, 6.0, 6)[1:5]
  out = M.flying_pixels(blur, gt, align="none")
  assert out["flying_ratio"] > 0.5
  with pytest.raises(ValueError, match="odd size"):
    M.flying_pixels(gt, gt, window=4)
  with pytest.raises(ValueError, match="no valid pixel lies on a GT depth edge"):
    M.flying_pixels(np.ones((8, 8)), np.ones((8, 8)))
