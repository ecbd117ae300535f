"""The shared train step: non-finite guard, EMA, and sharded (2x2x2) == single-device."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from xla_env import xla_flags

MODEL = r"""
import jax, jax.numpy as jnp, numpy as np, ml_collections
from flax import nnx
from geojax.nn.vit import Block, BlockConfig
from geojax.nn import layers
from geojax.parallel import sharding
from geojax.train import make_optimizer, default_optim_config
from geojax.train.step import init_state, make_train_step, check_health

class Tiny(nnx.Module):
  def __init__(self, rngs):
    self.inp = layers.linear(4, 32, rngs=rngs, axes=(None, "embed"))
    self.block = Block(BlockConfig(32, 4, layerscale=0.5), rngs=rngs)
    self.out = layers.linear(32, 1, rngs=rngs, axes=("embed", None))
  def __call__(self, x):
    return self.out(self.block(self.inp(x)))[..., 0]

def loss_fn(model, batch, rng):
  err = model(batch["x"]) - batch["y"]
  return jnp.mean(err ** 2), {"mae": jnp.mean(jnp.abs(err))}

def batches(n):
  rng = np.random.RandomState(0)
  return [{"x": rng.randn(8, 6, 4).astype(np.float32),
           "y": rng.randn(8, 6).astype(np.float32)} for _ in range(n)]

def optimizer():
  c = default_optim_config()
  c.lr, c.warmup_steps, c.total_steps, c.clip_norm = 1e-2, 2, 10, 1.0
  # Adam divides by sqrt(v): parameters whose true gradient is 0 (the attention key bias)
  # would turn float noise into +-lr updates; a larger eps keeps the comparison meaningful.
  c.eps = 1e-3
  return c

def build():
  with sharding.creation_context():
    return nnx.jit(lambda r: Tiny(r))(nnx.Rngs(0))
"""

SHARDED = MODEL + r"""
import sys
mesh_shape = tuple(int(v) for v in sys.argv[1].split("x"))
mesh = sharding.make_mesh(mesh_shape)
with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
  model = build()
  tx = make_optimizer(optimizer())
  graphdef, state = init_state(model, tx, ema=True)
  step = make_train_step(graphdef, tx, loss_fn, ema_decay=0.9)
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  losses = []
  for b in batches(3):
    b = jax.device_put(b, batch_sharding)
    state, m = step(state, b, jax.random.key(0))
    losses.append(float(m["loss"]))
  spec = state.params["inp"]["kernel"][...].sharding.spec
flat = np.concatenate([np.asarray(v).ravel() for v in jax.tree.leaves(state.params)])
ema = np.concatenate([np.asarray(v).ravel() for v in jax.tree.leaves(state.ema)])
np.savez(sys.argv[2], losses=np.array(losses), params=flat, ema=ema, step=int(state.step))
print("SPEC", spec)
"""


def _run(code, *args, devices=8):
  env = dict(os.environ, XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices}"),
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout


def test_sharded_step_equals_single_device(tmp_path):
  out = _run(SHARDED, "2x2x2", str(tmp_path / "sharded.npz"))
  assert "fsdp" in [l for l in out.splitlines() if l.startswith("SPEC")][0]
  _run(SHARDED, "1x1x1", str(tmp_path / "single.npz"), devices=1)
  a, b = np.load(tmp_path / "sharded.npz"), np.load(tmp_path / "single.npz")
  assert int(a["step"]) == int(b["step"]) == 3
  np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
  np.testing.assert_allclose(a["params"], b["params"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(a["ema"], b["ema"], rtol=1e-5, atol=1e-6)
  assert a["losses"][-1] < a["losses"][0]


def test_non_finite_guard_skips_and_stops():
  import jax
  import pytest
  ns: dict = {}
  exec(MODEL, ns)
  model = ns["build"]()
  tx = ns["make_optimizer"](ns["optimizer"]())
  graphdef, state = ns["init_state"](model, tx)
  step = ns["make_train_step"](graphdef, tx, ns["loss_fn"], donate=False)
  good, bad = ns["batches"](2)
  bad = dict(bad, y=np.full_like(bad["y"], np.nan))
  before = jax.tree.leaves(state.params)
  state2, m = step(state, bad, jax.random.key(0))
  assert not bool(m["finite"]) and int(m["skipped"]) == 1 and int(state2.step) == 0
  for x, y in zip(before, jax.tree.leaves(state2.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  state3, m3 = step(state2, bad, jax.random.key(0))
  with pytest.raises(FloatingPointError, match="2 consecutive"):
    ns["check_health"](m3, 2)
  state4, m4 = step(state3, good, jax.random.key(0))
  assert bool(m4["finite"]) and int(m4["bad_in_row"]) == 0 and int(state4.step) == 1
  assert int(m4["skipped"]) == 2 and "mae" in m4
