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
  seen = set()
  for i in range(40):
    batch = ds[i]
    n = batch["images"].shape[2] // 28
    if n in seen:
      continue
    seen.add(n)
    assert batch["images"].shape[1] == 1 and (batch["grid_n"] == n).all()
    loss, aux = task.loss_fn(model, batch, jax.random.key(i))
    assert np.isfinite(float(loss)) and float(aux["prior_depth_mse"]) > 0
    grads = nnx.grad(lambda m: task.loss_fn(m, batch, jax.random.key(i))[0])(model)
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
                   "data.pipeline.gridmix_probs":
                   (0.5, 0.5, 0.0, 0.0)})
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
