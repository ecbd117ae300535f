"""DAGE training: stage-1 distillation from a Pi3 teacher run inside the step (``train.py`` end
to end), its sizes, the teacher's checks, and the official MoGe-2 + Pi3 initialisation through
the trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import dage as dage_config  # noqa: E402
from geojax.families import dage as dage_family  # noqa: E402


def test_distill_resolutions():
  """Teacher: long side <= 672, multiples of 28; student LR: exactly half (multiples of 14)."""
  assert dage_family.distill_resolutions(84, 126) == ((56, 112), (28, 56))
  assert dage_family.distill_resolutions(1080, 1920) == ((364, 672), (182, 336))
  assert dage_family.distill_resolutions(1920, 1080) == ((672, 364), (336, 182))
  assert dage_family.distill_resolutions(518, 518) == ((504, 504), (252, 252))


def test_stage1_config_and_teacher_checks(tmp_path):
  c = dage_config.get_config("stage=1")
  assert c.stage == 1 and c.optim.lr == 1e-4 and c.total_steps == 40_000
  with pytest.raises(ValueError, match="teacher.weights"):
    dage_family.make_task(c)  # the released pi3 preset needs real weights
  c = dage_config.get_config("runlocal,stage=1")
  with pytest.warns(UserWarning, match="randomly initialised pi3-tiny teacher"):
    task = dage_family.make_task(c)
  assert task.stage == 1 and set(task.step_inputs()) == {"pi3_teacher"}
  c.model.preset = "dage"
  with pytest.raises(ValueError, match="decoder width 64 differs"):
    with pytest.warns(UserWarning):
      dage_family.make_task(c)
  assert dage_family.make_task(dage_config.get_config("runlocal")).step_inputs() is None


def test_stage1_trains_with_teacher_inside_the_step(tmp_path):
  """Two stage-1 steps through train.py: the teacher's weights reach the step as arguments,
  every distillation term is present, finite and positive, and parameters move."""
  wd = tmp_path / "run"
  cmd = [sys.executable, "-u", os.path.join(ROOT, "train.py"), "--config",
         os.path.join(ROOT, "configs", "dage.py") + ":runlocal,stage=1", f"--workdir={wd}",
         "--config.total_steps=2", "--config.log_every=1", "--config.checkpoint.every=2",
         "--config.eval.at_start=False", "--config.eval.at_end=False",
         "--config.progress=False", "--config.tensorboard=False", "--config.export_model=False",
         "--config.data.num_scenes=4", "--config.optim.warmup_steps=1"]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true")
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads((wd / "summary.json").read_text())
  final = summary["final_train"]
  assert summary["steps"] == 2
  for k in ("distill_local_pts_loss", "distill_trans_loss", "distill_rot_loss",
            "feat_distill_loss", "local_pts_loss", "trans_loss"):
    assert k in final and np.isfinite(final[k]), (k, final)
  assert final["feat_distill_loss"] > 0 and final["distill_local_pts_loss"] > 0
  assert final["finite"] == 1.0 and final["grad_norm"] > 0


def test_moge2_pi3_merge_through_the_trainer(tmp_path):
  """``init.moge2`` + ``init.pi3`` build the official stage-1 initialisation inside
  ``build_model``; the adapter keeps its initialisation."""
  from safetensors.numpy import save_file

  from geojax.convert import dage as dage_conv
  from geojax.convert import pi3 as pi3_conv
  from geojax.models import pi3 as pi3_lib
  from geojax.models import registry
  from geojax.train import trainer
  c = dage_config.get_config("runlocal")
  dcfg = dage_family.dage.get_config("dage-tiny")
  teacher = pi3_lib.Pi3.from_preset("pi3-tiny", rngs=nnx.Rngs(7), head_dim=dcfg.point_dim,
                                    head_heads=dcfg.point_heads, point_out=dcfg.point_out,
                                    cam_dim=dcfg.cam_dim, cam_heads=dcfg.cam_heads,
                                    cam_out=dcfg.cam_out)
  save_file(pi3_conv.to_torch_state_dict(teacher), str(tmp_path / "pi3.safetensors"))
  student = dage_family.dage.DAGE.from_preset("dage-tiny", rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  moge = {}
  for k, v in dage_conv.iter_torch_state_dict(student):
    for a, b in pi3_conv._MOGE_TO_DAGE:
      if k.startswith(b):
        moge[a + k[len(b):]] = v if k.endswith(("image_mean", "image_std")) else rng.normal(
            size=v.shape).astype(np.float32)
  # MoGe-2 ships a pickle: converted once, tensors only (it is not a DAGE model by itself)
  import torch

  from geojax.convert import cli
  torch.save({"model": {k: torch.from_numpy(v) for k, v in moge.items()},
              "model_config": {"encoder": {}}}, str(tmp_path / "moge2.pt"))
  assert cli.main([str(tmp_path / "moge2.pt"), str(tmp_path / "bad"), "--family", "dage"]) == 2
  assert cli.main([str(tmp_path / "moge2.pt"), str(tmp_path / "moge2"), "--family", "dage",
                   "--tensors-only"]) == 0
  c.init.update(moge2=str(tmp_path / "moge2"), pi3=str(tmp_path / "pi3.safetensors"))
  family = registry.get_family("dage")
  mconfig = trainer.model_config(c, family)
  model = trainer.build_model(c, family, mconfig)
  sd = dage_conv.to_torch_state_dict(model)
  np.testing.assert_array_equal(sd["decoder.3.attn.qkv.weight"],
                                pi3_conv.to_torch_state_dict(teacher)["decoder.3.attn.qkv.weight"])
  np.testing.assert_array_equal(sd["hr_neck.res_blocks.1.0.layers.2.weight"],
                                moge["neck.res_blocks.1.0.layers.2.weight"])
  fresh = dage_conv.to_torch_state_dict(family.build(mconfig, nnx.Rngs(int(c.seed))))
  np.testing.assert_array_equal(sd["adapter.linear_out.weight"], fresh["adapter.linear_out.weight"])
  c.init.pi3 = ""
  with pytest.raises(ValueError, match="needs both init.moge2 and init.pi3"):
    trainer.build_model(c, family, mconfig)
