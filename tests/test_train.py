"""train.py end to end: configs and sweeps; a run with eval, TensorBoard and checkpoints, then
SIGTERM during a resumed run; bad input; a 2-process ``jax.distributed`` run on localhost."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Small enough for CPU CI; every run shares these shapes, so later runs hit the compilation cache.
FAST = ["--config.data.num_scenes=8", "--config.data.num_views=3", "--config.data.height=56",
        "--config.data.width=84", "--config.data.pipeline.buckets=((56, 84),)",
        "--config.data.pipeline.min_views=2", "--config.data.pipeline.max_views=2",
        "--config.eval.num_scenes=1", "--config.eval.num_views=2", "--config.eval.height=56",
        "--config.eval.width=84", "--config.progress=False", "--config.optim.warmup_steps=1"]


def _env(devices: int = 1, fast_compile: bool = True) -> dict:
  flags = f"--xla_force_host_platform_device_count={devices}"
  if fast_compile:  # ~40% less wall time for these runs of a few steps (compiles dominate)
    flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)


def _train(workdir, *overrides, timeout=600, env=None):
  cmd = [sys.executable, "-u", os.path.join(ROOT, "train.py"), "--config",
         os.path.join(ROOT, "configs", "da3.py") + ":runlocal", f"--workdir={workdir}", *FAST,
         *overrides]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or _env(),
                        cwd=ROOT)


# ----------------------------------------------------------------------------- configs / sweep


def test_config_variants_and_errors():
  from configs import da3 as cfg_mod
  for preset in cfg_mod.PRESETS:
    for data in cfg_mod.SOURCES:
      c = cfg_mod.get_config(f"preset={preset},data={data}")
      assert c.model.preset == f"da3-{preset}" and c.data.source == data
  local = cfg_mod.get_config("runlocal")
  assert local.model.preset == "da3-tiny" and local.total_steps == 400
  assert cfg_mod.get_config("runlocal,preset=small").model.preset == "da3-small"
  local.total_steps = 7  # optim.total_steps follows the top-level field
  assert local.optim.total_steps == 7
  with pytest.raises(ValueError, match="preset='huge'"):
    cfg_mod.get_config("preset=huge")
  with pytest.raises(ValueError, match="'colour' is not one of"):
    cfg_mod.get_config("colour=red")
  with pytest.raises(ValueError, match="expected true or false"):
    cfg_mod.get_config("runlocal=maybe")


def test_sweep_expands_into_commands(tmp_path):
  from geojax.train import sweep
  spec = os.path.join(ROOT, "configs", "da3.py") + ":runlocal"
  cmds = sweep.commands(spec, str(tmp_path))
  assert len(cmds) == 6
  assert len({c[3] for c in cmds}) == 6  # distinct workdirs
  assert "--config.optim.lr=0.0001" in cmds[0] and "--config.loss.pose_cond_prob=0.0" in cmds[0]
  assert cmds[0][3].startswith(f"--workdir={tmp_path}/000-optim.lr=0.0001")
  bad = tmp_path / "bad.py"
  bad.write_text("import ml_collections\n"
                 "def get_config(arg=None):\n  return ml_collections.ConfigDict({'lr': 1.0})\n"
                 "def sweep(add):\n  add(**{'optim.lr': 1.0})\n")
  with pytest.raises(ValueError, match="'optim.lr' is not a field"):
    sweep.load_sweep(str(bad))
  r = subprocess.run([sys.executable, "-m", "geojax.train.sweep", f"--config={spec}",
                      f"--workdir={tmp_path}"], capture_output=True, text=True, cwd=ROOT,
                     env=_env(), timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert len(r.stdout.strip().splitlines()) == 6 and "train.py" in r.stdout


# ------------------------------------------------------------------------------- end to end


def test_train_eval_tensorboard_sigterm_resume(tmp_path):
  from geojax.io.tensorboard import read_events
  from geojax.train.checkpoint import TrainCheckpointer
  wd = tmp_path / "run"
  r = _train(wd, "--config.total_steps=4", "--config.log_every=2",
             "--config.checkpoint.every=2")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "eval @ step 0" in r.stdout and "eval @ step 4" in r.stdout, r.stdout
  summary = json.loads((wd / "summary.json").read_text())
  assert summary["steps"] == 4 and not summary["preempted"]
  for when in ("before", "after"):
    assert {"abs_rel", "auc30"} <= set(summary[when]), summary
    assert np.isfinite(summary[when]["abs_rel"])
  assert set(summary["history"]) == {"0", "4"}
  ck = TrainCheckpointer(str(wd / "checkpoints"))
  assert ck.all_steps() == [2, 4]
  assert ck.config()["model"]["preset"] == "da3-tiny"
  ck.close()
  events = []
  for f in os.listdir(wd / "tensorboard"):
    events += read_events(str(wd / "tensorboard" / f))
  tags = {(v["tag"], e["step"]) for e in events for v in e.get("values", [])}
  assert {("train/loss", 2), ("train/loss", 4), ("eval/abs_rel", 0), ("eval/abs_rel", 4)} <= tags
  assert any(t.startswith("eval/scene_") for t, _ in tags)  # depth pictures
  assert (wd / "eval" / "step_0000004" / "results.json").is_file()
  from geojax.io.checkpoint import read_model_info
  assert read_model_info(str(wd / "model"))["config"]["preset"] == "da3-tiny"

  # SIGTERM during a resumed run: it resumes at step 4, saves a complete checkpoint at the
  # step it stopped and exits 0; a third run resumes from that checkpoint.
  cmd = [sys.executable, "-u", os.path.join(ROOT, "train.py"), "--config",
         os.path.join(ROOT, "configs", "da3.py") + ":runlocal", f"--workdir={wd}", *FAST,
         "--config.total_steps=1000", "--config.log_every=1", "--config.checkpoint.every=1000",
         "--config.eval.at_end=False"]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=_env(), cwd=ROOT)
  lines = []
  deadline = time.time() + 500
  try:
    for line in proc.stdout:
      lines.append(line)
      if line.startswith("step 6/1000"):
        proc.send_signal(signal.SIGTERM)
        break
      assert time.time() < deadline, "".join(lines[-20:])
    out, _ = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  text = "".join(lines) + out
  assert proc.returncode == 0, text[-3000:]
  assert "resumed from step 4" in text and "eval @ step 0" not in text, text[-3000:]
  assert "SIGTERM at step" in text and "stopped by SIGTERM" in text, text[-3000:]
  stopped = int(text.split("SIGTERM at step ")[1].split(":")[0])
  assert stopped >= 6
  summary = json.loads((wd / "summary.json").read_text())
  assert summary["preempted"] and summary["steps"] == stopped
  assert set(summary["history"]) == {"0", "4"}  # earlier evaluations are kept
  # The SIGTERM checkpoint is complete: every item restores (the state as plain arrays).
  import orbax.checkpoint as ocp
  ck = TrainCheckpointer(str(wd / "checkpoints"))
  assert ck.latest_step() == stopped
  assert ck.config()["total_steps"] == 1000
  restored = ck._manager.restore(stopped, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))
  assert int(restored["state"]["step"]) == stopped
  ck.close()


def test_bad_config_is_one_line_error(tmp_path):
  r = _train(tmp_path / "bad", "--config.model.dtype=float8")
  assert r.returncode == 2
  assert "train.py: error: model.dtype must be one of" in r.stderr
  r = _train(tmp_path / "bad2", "--config.data.source=folder")
  assert r.returncode == 2 and "data.path must name a folder" in r.stderr
  r = _train(tmp_path / "bad3", "--config.optim.accum_steps=3")  # 400 steps
  assert r.returncode == 2 and "must be a multiple of optim.accum_steps (3)" in r.stderr


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_process_distributed_run(tmp_path):
  wd = tmp_path / "run"
  port = _free_port()
  procs = []
  for pid in range(2):
    cmd = [sys.executable, "-u", os.path.join(ROOT, "train.py"), "--config",
           os.path.join(ROOT, "configs", "da3.py") + ":runlocal", f"--workdir={wd}", *FAST,
           "--config.total_steps=2", "--config.log_every=1", "--config.checkpoint.every=2",
           "--config.eval.at_start=False", "--config.eval.at_end=False",
           f"--config.distributed.coordinator_address=127.0.0.1:{port}",
           "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}",
           "--config.distributed.timeout_s=120"]
    procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env=_env(fast_compile=True), cwd=ROOT))
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=540)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "'data': 2" in outs[0] and "step 2/2" in outs[0]  # one mesh over both processes
  assert "step 2/2" not in outs[1]  # only the chief logs
  from geojax.train.checkpoint import TrainCheckpointer
  ck = TrainCheckpointer(str(wd / "checkpoints"))
  assert ck.all_steps() == [2]
  data_state = os.listdir(wd / "checkpoints" / "2" / "data")
  ck.close()
  assert len(data_state) >= 2, data_state  # one iterator state per process
