"""URGT training: GridMix RoPE origins, the task's loss on pipeline batches, and a short
train.py run whose summary scores the prior next to the model."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geojax.models import urgt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_refine_origin_places_a_block_on_the_full_image_grid():
  """A GridMix block of 2 x 2 patches at lattice cell (1, 2) of a 4 x 4 image gets, with
  ``origin = cell * t``, exactly the RoPE positions those four crops have in the whole image;
  special tokens stay at (0, 0)."""
  seen = []

  def fake(crops, dprior, nprior, *, positions):
    seen.append(np.asarray(positions))
    b, s, p = crops.shape[:3]
    return dict(depth=jnp.zeros((b, s, p, p)), normal=jnp.zeros((b, s, p, p, 3)))

  t, p = 2, 28
  full = np.zeros((1, 4 * p, 4 * p, 3), np.float32)
  urgt.refine(fake, full, full[..., 0], full, patch_split=(4, 4), overlap=False, crop_size=p,
              rope_positions="true")
  block = full[:, :2 * p, :2 * p]
  urgt.refine(fake, block, block[..., 0], block, patch_split=(2, 2), overlap=False,
              crop_size=p, rope_positions="true", origin=jnp.array([[1.0 * t, 2.0 * t]]))
  whole, sub = seen[0], seen[1][0]
  cells = [(1, 2), (1, 3), (2, 2), (2, 3)]  # row-major crops of the block
  for k, (r, c) in enumerate(cells):
    np.testing.assert_array_equal(sub[k], whole[r * 4 + c])
  assert (sub[:, :urgt.NUM_SPECIAL] == 0).all()


def _runlocal(**over):
  sys.path.insert(0, ROOT)
  from configs import urgt as cfg_mod
  c = cfg_mod.get_config("runlocal")
  c.data.update(height=112, width=112, num_scenes=4)
  c.data.pipeline.update(buckets=((112, 112),))
  c.model.crop_size = 28
  for k, v in over.items():
    node = c
    *path, leaf = k.split(".")
    for q in path:
      node = node[q]
    node[leaf] = v
  return c


def test_task_loss_on_gridmix_batches():
  """Batches of two GridMix sizes give a finite loss and finite gradients, and the task reports
  the prior's own error."""
  from geojax.data import pipeline
  from geojax.train.tasks import make_task
  from geojax.train.trainer import make_source, pipeline_config
  c = _runlocal()
  task = make_task(c)
  assert task.bucket == (112, 112) and task.crop_size == 28 and task.normal_target == "pseudo"
  model = urgt.init_training_start(urgt.URGT.from_preset("urgt-tiny", rngs=nnx.Rngs(0)))
  pc = pipeline_config(c)
  ds = pipeline.make_dataset(make_source(c.data), pc, seed=0)
  # one compiled program per GridMix size (eager dispatch of this loss takes minutes on CPU)
  loss_and_grad = nnx.jit(nnx.value_and_grad(task.loss_fn, has_aux=True))
  seen = set()
  for i in range(40):
    batch = ds[i]
    n = batch["images"].shape[2] // 28
    if n in seen:
      continue
    seen.add(n)
    assert batch["images"].shape[1] == 1 and (batch["grid_n"] == n).all()
    (loss, aux), grads = loss_and_grad(model, batch, jax.random.key(i))
    assert np.isfinite(float(loss)) and float(aux["prior_depth_mse"]) > 0
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    if len(seen) == 2:
      break
  assert len(seen) == 2


@pytest.mark.parametrize("over,needle", [
    ({"data.pipeline.buckets": ((112, 112), (56, 56))}, "one (H, W)"),
    ({"data.pipeline.max_views": 2}, "single images"),
    ({"model.crop_size": 30}, "multiple of 14"),
    ({"loss.normal_target": "fitted"}, "normal_target"),
])
def test_task_config_errors(over, needle):
  from geojax.train.tasks import make_task
  with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
    make_task(_runlocal(**over))


def test_short_training_run_reports_prior_before_after(tmp_path):
  """train.py's loop on URGT: a few steps, evaluation before and after with the training prior
  on held-out images; the summary holds prior / before / after with abs_rel and
  normal_mean_deg."""
  from geojax.train import trainer
  c = _runlocal(**{"total_steps": 4, "batch_size": 2, "optim.warmup_steps": 1,
                   # one GridMix size: one compiled step (the mix is covered above)
                   "data.pipeline.gridmix_probs": (1.0, 0.0, 0.0, 0.0)})
  c.eval.update(num_scenes=1, height=112, width=112, patch_split=(4, 4), crop_size=28,
                pictures=False)
  c.checkpoint.update(every=0)
  c.log_every = 2
  c.tensorboard = False
  c.progress = False
  summary = trainer.train(c, str(tmp_path / "run"))
  assert summary["steps"] == 4
  for part in ("prior", "before", "after"):
    assert set(summary[part]) >= {"abs_rel", "normal_mean_deg"}, summary
    assert all(np.isfinite(v) for v in summary[part].values())
  # the untrained model starts at the prior (near-zero offsets)
  assert summary["before"]["abs_rel"] == pytest.approx(summary["prior"]["abs_rel"], rel=0.05)
  saved = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert saved["prior"] == summary["prior"]


# ------------------------------------------------------------------ VGGT-1B initialisation


def _vggt_file(tmp_path, *, drop=("aggregator.patch_embed.patch_embed_", "normal_head."),
               extra=None, seed=5):
  """A VGGT-1B-like state dict: a urgt-tiny's tensors without the prior embeddings and normal
  head, plus VGGT's camera / track heads (which URGT drops)."""
  from safetensors.numpy import save_file
  from geojax.convert import urgt as conv
  src = conv.to_torch_state_dict(urgt.URGT.from_preset("urgt-tiny", rngs=nnx.Rngs(seed)))
  sd = {k: v for k, v in src.items() if not k.startswith(drop)}
  sd["camera_head.trunk.0.weight"] = np.ones((4, 4), np.float32)
  sd["track_head.feature_extractor.norm.bias"] = np.ones((4,), np.float32)
  sd.update(extra or {})
  path = str(tmp_path / "vggt.safetensors")
  save_file(sd, path)
  return path, src


def _build(c):
  from geojax.models import registry
  from geojax.train import trainer
  family = registry.get_family("urgt")
  return trainer.build_model(c, family, trainer.model_config(c, family))


def test_vggt_init_loads_aggregator_and_depth_head_then_the_training_start(tmp_path):
  """init.vggt: every aggregator tensor and the depth head (but its last conv) equal VGGT's;
  the normal head keeps the model's own initialisation; the prior embeddings and both last
  convs start at N(0, 1e-4) with zero bias."""
  from geojax.convert import urgt as conv
  path, src = _vggt_file(tmp_path)
  c = _runlocal(**{"init.vggt": path})
  model = _build(c)
  got = conv.to_torch_state_dict(model)
  fresh = conv.to_torch_state_dict(_build(_runlocal()))  # same seed, no VGGT
  last = ("depth_head.scratch.output_conv2.2.", "normal_head.scratch.output_conv2.2.",
          "aggregator.patch_embed.patch_embed_")
  n_vggt = 0
  for k, v in got.items():
    if k.startswith(last):
      if k.endswith("bias"):
        assert (v == 0).all(), k
      else:
        assert 0 < np.std(v) < 2e-4, k
    elif k.startswith("normal_head."):
      np.testing.assert_array_equal(v, fresh[k], err_msg=k)
    else:
      assert k.startswith(("aggregator.", "depth_head.")), k
      np.testing.assert_array_equal(v, src[k], err_msg=k)
      n_vggt += 1
  assert n_vggt > 100 and not np.array_equal(got["aggregator.camera_token"],
                                             fresh["aggregator.camera_token"])


@pytest.mark.parametrize("case,needle", [
    ("shape", "expects"),
    ("urgt", "init.weights"),
    ("foreign", "no aggregator.frame_blocks"),
    ("unknown", "no place in URGT"),
    ("with_weights", "excludes init.weights"),
    ("missing", "no such file"),
])
def test_vggt_init_errors(tmp_path, case, needle):
  """A bad init.vggt is refused with the file and what was expected."""
  extra = {}
  drop = ("aggregator.patch_embed.patch_embed_", "normal_head.")
  if case == "shape":
    extra = {"aggregator.camera_token": np.zeros((1, 2, 7), np.float32)}
  elif case == "urgt":
    drop = ("normal_head.",)
  elif case == "foreign":
    drop = ("aggregator.frame_blocks.",)
  elif case == "unknown":
    extra = {"aggregator.extra_token": np.zeros((3,), np.float32)}
  path, _ = _vggt_file(tmp_path, drop=drop, extra=extra)
  over = {"init.vggt": path}
  if case == "with_weights":
    over["init.checkpoint"] = path
    c = _runlocal(**over)
    from geojax.models import registry
    with pytest.raises(ValueError, match=needle):
      registry.get_family("urgt").initialize(None, c.init)
    return
  if case == "missing":
    over["init.vggt"] = str(tmp_path / "nope.safetensors")
  with pytest.raises((ValueError, FileNotFoundError), match=needle):
    _build(_runlocal(**over))


# ------------------------------------------------------------ training priors from a model


@pytest.fixture(scope="module")
def da3_ckpt(tmp_path_factory):
  from geojax.io import checkpoint
  from geojax.models import da3
  root = tmp_path_factory.mktemp("prior")
  return checkpoint.save_model(str(root / "da3"), da3.DA3.from_preset("da3-tiny",
                                                                      rngs=nnx.Rngs(3)),
                               "da3", {"preset": "da3-tiny"})


def test_model_prior_is_the_da3_disparity_min_max_normalised(da3_ckpt):
  """model_prior: DA3 on the block at long side ``size`` (multiples of 14), depth resized back,
  inverted and min-max normalised per image."""
  from geojax.families import urgt as fam
  from geojax.models.registry import IMAGENET_MEAN, IMAGENET_STD
  from geojax.nn import resize
  from geojax.predict import weights
  prior_model, _ = weights.load_model(da3_ckpt)
  x = jax.random.uniform(jax.random.key(0), (2, 56, 84, 3))
  got = np.asarray(fam.model_prior(prior_model, x, size=60))
  assert got.shape == (2, 56, 84)
  xi = (np.asarray(resize.resize_bilinear(x, (42, 56), antialias=True)) - IMAGENET_MEAN
        ) / IMAGENET_STD  # long side 60 -> 56 (4 x 14); 40 -> 42 (3 x 14)
  d = np.asarray(prior_model(jnp.asarray(xi[:, None], jnp.float32))["depth"][:, 0])
  d = np.asarray(resize.resize_bilinear(jnp.asarray(d[..., None]), (56, 84)))[..., 0]
  disp = 1.0 / d
  lo, hi = disp.min((1, 2), keepdims=True), disp.max((1, 2), keepdims=True)
  np.testing.assert_allclose(got, (disp - lo) / (hi - lo + 1e-8), atol=2e-5)
  assert np.allclose(got.min((1, 2)), 0) and np.allclose(got.max((1, 2)), 1, atol=1e-6)


def test_task_with_a_model_prior_trains_against_it(tmp_path, da3_ckpt):
  """prior.source='model': the task carries the frozen DA3 as a step input and its loss uses
  the model's prior (its error against the target is reported); the evaluation, run under the
  training mesh, refines the held-out images from the same prior model."""
  from geojax.data import pipeline
  from geojax.families import urgt as fam
  from geojax.losses import urgt as L
  from geojax.models import registry
  from geojax.parallel.sharding import make_mesh
  from geojax.train import trainer
  from geojax.train.tasks import make_task
  c = _runlocal(**{"prior.source": "model", "prior.weights": da3_ckpt, "prior.size": 56,
                   "data.pipeline.gridmix_probs": (1.0, 0.0, 0.0, 0.0)})  # 28 x 28 blocks
  task = make_task(c)
  assert task.prior_source == "model" and set(task.step_inputs()) == {"urgt_prior_model"}
  model = urgt.init_training_start(urgt.URGT.from_preset("urgt-tiny", rngs=nnx.Rngs(0)))
  batch = dict(pipeline.make_dataset(trainer.make_source(c.data), trainer.pipeline_config(c),
                                     seed=0)[0], **task.step_inputs())
  loss, aux = nnx.jit(lambda m, b, k: task.loss_fn(m, b, k))(model, batch, jax.random.key(0))
  x = jnp.asarray(batch["images"][:, 0], jnp.float32) / 255.0
  depth = jnp.asarray(batch["depth"][:, 0], jnp.float32)
  valid = jnp.asarray(batch["valid"][:, 0], bool) & (depth > 0)
  target, _, _ = L.disparity_target(depth, valid)
  prior = fam.model_prior(nnx.merge(task.prior_graphdef, task.prior_state), x, 56)
  want = float(jnp.sum(jnp.where(valid, (prior - target) ** 2, 0)) / jnp.sum(valid))
  assert np.isfinite(float(loss))
  assert float(aux["prior_depth_mse"]) == pytest.approx(want, rel=1e-4)
  # held-out evaluation with the same prior model (loaded while the training mesh is set)
  assert c.eval.prior_source == "model" and c.eval.prior_weights == da3_ckpt
  c.eval.update(num_scenes=1, height=56, width=56, patch_split=(2, 2), crop_size=28,
                pictures=False)
  family = registry.get_family("urgt")
  mesh = make_mesh(tuple(c.mesh.shape), tuple(c.mesh.axes))
  rules = tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in c.mesh.rules)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    res = trainer.evaluate_model(c, family, trainer.model_config(c, family), model,
                                 str(tmp_path / "eval"))
  assert np.isfinite(res["abs_rel"]) and np.isfinite(res["prior_abs_rel"])
  fam.load_prior_model.cache_clear()


@pytest.mark.parametrize("over,needle", [
    ({"prior.source": "model"}, "needs prior.weights"),
    ({"prior.source": "model", "prior.weights": "/nonexistent/da3"}, "prior.weights"),
    ({"prior.source": "teacher"}, "'degraded'"),
])
def test_model_prior_config_errors(over, needle):
  from geojax.train.tasks import make_task
  with pytest.raises((ValueError, FileNotFoundError), match=needle):
    make_task(_runlocal(**over))


def test_model_prior_refuses_a_non_da3_model(tmp_path):
  from geojax.io import checkpoint
  from geojax.train.tasks import make_task
  path = checkpoint.save_model(str(tmp_path / "u"), urgt.URGT.from_preset(
      "urgt-tiny", rngs=nnx.Rngs(0)), "urgt", {"preset": "urgt-tiny"})
  with pytest.raises(ValueError, match="a urgt model; training priors come from a DA3"):
    make_task(_runlocal(**{"prior.source": "model", "prior.weights": path}))
