"""Resume: 6 steps straight == 3 steps, exit, restore (on another mesh), 3 steps."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from test_train_step import MODEL
from xla_env import xla_flags

RUN = MODEL + r"""
import sys, grain
from geojax.train.checkpoint import TrainCheckpointer, abstract_like
mode, mesh_shape, ckdir, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
mesh = sharding.make_mesh(tuple(int(v) for v in mesh_shape.split("x")))

def element(i):
  r = np.random.RandomState(i)
  return {"x": r.randn(6, 4).astype(np.float32), "y": r.randn(6).astype(np.float32)}

data = grain.MapDataset.range(64).shuffle(seed=1).map(element).batch(8).to_iter_dataset()
it = iter(data)
with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
  model = build()
  tx = make_optimizer(optimizer())
  graphdef, state = init_state(model, tx, ema=True)
  step = make_train_step(graphdef, tx, loss_fn, ema_decay=0.9)
  ck = TrainCheckpointer(ckdir, keep_last=2)
  if mode == "resume":
    state = ck.restore(abstract_like(state), data_iterator=it)
  bs = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  losses = []
  for _ in range(6 if mode == "straight" else 3):
    state, m = step(state, jax.device_put(next(it), bs), jax.random.key(0))
    losses.append(float(m["loss"]))
  if mode == "first":
    ck.save(int(state.step), state, data_iterator=it, config={"mesh": mesh_shape})
    ck.wait()
  ck.close()
leaves = lambda t: np.concatenate([np.asarray(v).ravel() for v in jax.tree.leaves(t)])
np.savez(out, losses=np.array(losses), params=leaves(state.params), opt=leaves(state.opt_state),
         ema=leaves(state.ema), step=int(state.step))
"""


def _run(*args):
  env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"),
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", RUN, *args], env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]


def test_resume_across_processes_and_meshes(tmp_path):
  ck = str(tmp_path / "ck")
  _run("straight", "2x2x2", str(tmp_path / "ck_unused"), str(tmp_path / "straight.npz"))
  _run("first", "2x2x2", ck, str(tmp_path / "first.npz"))
  assert sorted(os.listdir(ck)) == ["3"]
  _run("resume", "8x1x1", ck, str(tmp_path / "second.npz"))  # restored onto another mesh
  a = np.load(tmp_path / "straight.npz")
  b, c = np.load(tmp_path / "first.npz"), np.load(tmp_path / "second.npz")
  np.testing.assert_allclose(np.concatenate([b["losses"], c["losses"]]), a["losses"], rtol=1e-5)
  assert int(c["step"]) == int(a["step"]) == 6
  for k in ("params", "opt", "ema"):
    np.testing.assert_allclose(c[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_retention_and_half_written_checkpoints_are_ignored(tmp_path):
  import jax.numpy as jnp

  from geojax.train.checkpoint import TrainCheckpointer, abstract_like
  ck = TrainCheckpointer(str(tmp_path), keep_last=2, best_metric="loss", best_mode="min",
                         async_save=False)
  losses = {1: 5.0, 2: 0.5, 3: 4.0, 4: 3.0, 5: 2.0}
  for s, loss in losses.items():
    ck.save(s, {"w": jnp.full((3,), float(s))}, metrics={"loss": loss}, config={"run": "t"})
  ck.wait()
  assert sorted(ck.all_steps()) == [2, 4, 5]  # last two + the best (step 2)
  # a save that died half-way leaves only a temporary directory: never resumed from
  os.makedirs(tmp_path / "9.orbax-checkpoint-tmp-1234" / "state")
  ck.close()
  ck = TrainCheckpointer(str(tmp_path), keep_last=2)
  assert ck.latest_step() == 5
  got = ck.restore(abstract_like({"w": jnp.zeros((3,))}))
  np.testing.assert_array_equal(np.asarray(got["w"]), [5.0, 5.0, 5.0])
  assert ck.config() == {"run": "t"}
  ck.close()
