"""DAGE with its frames split over a ``"view"`` mesh axis equals the single-device run: the LR
decoder's global layers gather keys/values across devices, the HR stream runs each device's own
frames. Runs in a subprocess with 4 CPU devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

OUTPUTS = ("local_points", "conf", "camera_poses", "metric_scale")


def _report() -> dict:
  """In the 4-device subprocess: single-device and view-parallel forwards of dage-tiny."""
  import jax
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from geojax.models import dage
  from geojax.parallel import sharding

  jax.config.update("jax_default_matmul_precision", "highest")
  assert jax.device_count() == 4, jax.devices()
  model = dage.DAGE.from_preset("dage-tiny", rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  x = jax.random.uniform(jax.random.key(0), (1, 8, 42, 70, 3))
  fwd = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v, lr_max_size=56, hr_num_tokens=24))
  want = jax.device_get(fwd(state, x))
  mesh = sharding.make_view_mesh(4)
  with jax.set_mesh(mesh):
    rep = jax.device_put(state, NamedSharding(mesh, P()))
    xs = jax.device_put(x, NamedSharding(mesh, P(None, "view")))
    out = fwd(rep, xs)
    spec = list(out["local_points"].sharding.spec)
    got = jax.device_get(out)
  err = {k: float(np.abs(np.asarray(got[k], np.float64) - want[k]).max()
                  / max(1.0, float(np.abs(want[k]).max()))) for k in OUTPUTS}
  return {"errors": err, "points_spec": [str(s) for s in spec]}


def test_dage_view_parallel_matches_single_device():
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_dage_view_parallel "
          "as t; print('REPORT', json.dumps(t._report()))")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"))
  r = subprocess.run([sys.executable, "-c", code, tests_dir], env=env, capture_output=True,
                     text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  report = json.loads([l for l in r.stdout.splitlines() if l.startswith("REPORT")][0][7:])
  assert max(report["errors"].values()) < 1e-5, report
  assert report["points_spec"][:2] == ["None", "view"], report  # frames stay split
