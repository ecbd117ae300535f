"""Faults in long runs (issue 17): non-finite training data, a busy workdir, a dead data worker,
a checkpoint write that fails (ENOSPC), SIGTERM during an asynchronous save; each test fails
without its handling."""

import os

import numpy as np
import pytest

from reliability_helpers import one_error_line as _one_error_line


# ------------------------------------------------------------------------ faults in long runs


def test_non_finite_training_samples_are_masked_or_skipped_and_counted():
  """NaN/inf depth and normals become invalid pixels (counted); a scene with a NaN camera is
  skipped (counted, replaced by the next scene); no batch holds a non-finite value."""
  from geojax.data.pipeline import COUNT_KEYS, PipelineConfig, make_iterator
  from geojax.data.synthetic import render_scene
  scenes = [render_scene(0, i, num_views=3, height=28, width=42) for i in range(4)]
  scenes[1]["depth"][0, :2, :5] = np.nan
  scenes[1]["depth"][2, 7, 7] = np.inf
  scenes[1]["normals"][1, 3, 3] = np.nan
  n_bad = 10 + 1 + 1
  scenes[2]["extrinsics"][1, 0, 3] = np.nan
  cfg = PipelineConfig(buckets=((28, 42),), min_views=3, max_views=3, batch_size=1,
                       num_epochs=1, view_order="first", random_crop=False, augment=False)
  batches = list(make_iterator(scenes, cfg, seed=0, process_index=0, process_count=1))
  assert len(batches) == 4
  for b in batches:
    for k, v in b.items():
      if v.dtype.kind == "f":
        assert np.isfinite(v).all(), k
  assert sum(int(b["data_masked_pixels"].sum()) for b in batches) == n_bad
  assert sum(int(b["data_skipped_scenes"].sum()) for b in batches) == 1
  used = sorted(int(b["scene_index"][0]) for b in batches)
  assert used == [0, 1, 3, 3]  # scene 2 replaced by the next one
  masked = next(b for b in batches if int(b["scene_index"][0]) == 1)
  assert not masked["valid"][0, 0, :2, :5].any() and not masked["valid"][0, 1, 3, 3]
  assert set(COUNT_KEYS) <= set(batches[0])
  for s in scenes:
    s["intrinsics"][:, 0, 0] = np.nan
  with pytest.raises(ValueError, match="no usable training scene.*non-finite intrinsics"):
    next(iter(make_iterator(scenes, cfg, seed=0, process_index=0, process_count=1)))


def test_workdir_lock_refuses_a_second_run_and_is_never_stale(tmp_path):
  """A workdir held by a live process is refused with a line naming the workdir and the
  holder's pid; once the holder is killed with SIGKILL, the lock is free at once."""
  import signal
  import subprocess
  import sys

  from geojax.train.workdir import WorkdirBusyError, lock_workdir
  wd = tmp_path / "run"
  code = ("import sys, time; from geojax.train.workdir import lock_workdir\n"
          f"lock = lock_workdir({str(wd)!r}); print('held', flush=True); time.sleep(600)")
  holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirBusyError, match=f"{wd}.*in use by.*pid {holder.pid}"):
      lock_workdir(str(wd))
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
  lock = lock_workdir(str(wd))  # the killed holder left nothing stale
  with pytest.raises(WorkdirBusyError):
    lock_workdir(str(wd))  # a second holder in this process is refused too
  lock.release()
  lock_workdir(str(wd)).release()


def test_dead_data_worker_is_reported_not_a_hang():
  """A worker process killed while reading (as the OOM killer does) ends the iteration within
  seconds in one DataWorkerError naming a data worker, the signal and the usual remedy."""
  import time

  from reliability_helpers import DyingSource
  from geojax.data.pipeline import DataWorkerError, PipelineConfig, make_iterator, next_batch
  from geojax.data.synthetic import render_scene
  scenes = [render_scene(0, i, num_views=2, height=28, width=42) for i in range(4)]
  cfg = PipelineConfig(buckets=((28, 42),), min_views=2, max_views=2, batch_size=1,
                       num_workers=1, random_crop=False, augment=False)
  it = make_iterator(DyingSource(scenes, die_at=2), cfg, seed=0, process_index=0,
                     process_count=1)
  t0 = time.time()
  with pytest.raises(DataWorkerError, match="data worker process .* was killed by SIGKILL.*"
                     "out-of-memory killer: lower data.pipeline.num_workers"):
    for _ in range(50):
      next_batch(it)
  assert time.time() - t0 < 120


def _checkpointer_with_failing_writer(monkeypatch, directory, where):
  """A TrainCheckpointer with step 1 saved, whose array writer then fails with ENOSPC either
  while the save starts (``sync``) or in the background commit (``async``)."""
  import errno

  import jax.numpy as jnp
  from orbax.checkpoint._src.handlers import standard_checkpoint_handler as sch

  from geojax.train.checkpoint import TrainCheckpointer
  ck = TrainCheckpointer(str(directory), keep_last=3, async_save=True)
  ck.save(1, {"w": jnp.ones(3)}, config={"step": 1})
  ck.wait()
  original = sch.StandardCheckpointHandler.async_save
  full = OSError(errno.ENOSPC, "No space left on device")

  class _Failed:
    def result(self, timeout=None):
      raise full

  async def failing(self, *args, **kwargs):
    if where == "sync":
      raise full
    return list(await original(self, *args, **kwargs) or []) + [_Failed()]
  monkeypatch.setattr(sch.StandardCheckpointHandler, "async_save", failing)
  return ck


@pytest.mark.parametrize("where", ["sync", "async"])
def test_checkpoint_write_failure_keeps_the_previous_one(tmp_path, monkeypatch, caplog, where):
  """ENOSPC from the writer, at the start of a save or in its background commit: one
  CheckpointWriteError naming the folder, the step, the cause and the intact step; Orbax's
  traceback logs are folded into it; a new run restores step 1 and clears the half-written
  step."""
  import logging

  import jax.numpy as jnp

  from geojax.train.checkpoint import CheckpointWriteError, TrainCheckpointer, abstract_like
  d = tmp_path / "checkpoints"
  ck = _checkpointer_with_failing_writer(monkeypatch, d, where)
  caplog.set_level(logging.INFO)
  with pytest.raises(CheckpointWriteError) as e:
    ck.save(2, {"w": jnp.full(3, 2.0)}, config={"step": 2})
    ck.wait()
  msg = str(e.value)
  for part in (str(d), "step 2 failed", "No space left on device",
               "previous checkpoint (step 1) is intact"):
    assert part in msg, msg
  assert "\n" not in msg and e.value.errno == 28
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records
  monkeypatch.undo()
  try:
    ck.close()
  except CheckpointWriteError:
    pass
  again = TrainCheckpointer(str(d))
  assert again.latest_step() == 1
  got = again.restore(abstract_like({"w": jnp.zeros(3)}))
  np.testing.assert_array_equal(np.asarray(got["w"]), np.ones(3))
  assert sorted(os.listdir(d)) == ["1"]  # the half-written step 2 is cleared
  again.close()


def test_train_py_faults_are_one_line(monkeypatch, capsys, tmp_path):
  """train.py's outcome (``trainer.run``) for a fault (status 1) and a busy workdir (status 2):
  one line each."""
  from geojax import runtime
  from geojax.train import checkpoint, trainer, workdir
  monkeypatch.setattr(runtime, "enable_compilation_cache", lambda *a, **k: None)
  monkeypatch.setattr(runtime, "tune_host_allocator", lambda *a, **k: None)
  monkeypatch.setattr(trainer, "maybe_initialize_distributed", lambda c: None)
  for exc, code in ((checkpoint.CheckpointWriteError("ck: writing the checkpoint of step 5 "
                                                     "failed\n(No space left)"), 1),
                    (trainer.DataWorkerError("training data: a data worker died"), 1),
                    (workdir.WorkdirBusyError("workdir w is in use by pid 1"), 2)):
    def fail(config, wd, exc=exc):
      raise exc
    monkeypatch.setattr(trainer, "train", fail)
    assert trainer.run(None, str(tmp_path)) == code
    _one_error_line(capsys.readouterr().err, "train.py: error:", str(exc).split()[0])


SIGTERM_SAVE = r"""
import os, signal, sys, time, threading
import jax.numpy as jnp
from orbax.checkpoint._src.handlers import standard_checkpoint_handler as sch
from geojax.train.checkpoint import TrainCheckpointer
from geojax.train.trainer import _Preemption
original = sch.StandardCheckpointHandler.async_save

class Slow:  # the background commit of a save takes 3 s
  def result(self, timeout=None):
    time.sleep(3)

async def slow(self, *args, **kwargs):
  return list(await original(self, *args, **kwargs) or []) + [Slow()]
sch.StandardCheckpointHandler.async_save = slow
ck = TrainCheckpointer(sys.argv[1], keep_last=5, async_save=True)
state = {"w": jnp.arange(1000.0)}
with _Preemption() as preempt:
  ck.save(1, state, config={"step": 1})  # asynchronous: returns at once
  print("saving", flush=True)
  while not preempt.requested:  # the training loop goes on; SIGTERM arrives mid-save
    time.sleep(0.05)
  ck.save(2, state, config={"step": 2}, force=True)
  ck.wait()
ck.close()
print("done", flush=True)
"""


def test_sigterm_during_an_asynchronous_save_leaves_complete_checkpoints(tmp_path):
  """SIGTERM while a save is still being written in the background: the run finishes that
  save, writes its preemption checkpoint and exits 0; both steps restore. (With the default
  SIGTERM action the process dies mid-write and step 1 is a temporary folder.)"""
  import signal
  import subprocess
  import sys

  from geojax.train.checkpoint import TrainCheckpointer
  d = tmp_path / "ck"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SAVE, str(d)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)
  try:
    assert proc.stdout.readline().strip() == "saving", proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0 and out.strip() == "done", err[-2000:]
  ck = TrainCheckpointer(str(d))
  assert ck.all_steps() == [1, 2]
  assert ck.config(1) == {"step": 1} and ck.config(2) == {"step": 2}
  ck.close()
