"""URGT with its crops split over a ``"view"`` mesh axis (and heads in crop chunks) equals the
single-device run of :func:`geojax.models.urgt.refine`. Runs in a subprocess with 4 CPU
devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np


def _report() -> dict:
  """In the 4-device subprocess: refine() on one device, then with 4 view devices and
  ``head_chunk=2`` (a 4 x 2 grid: 8 crops, two per device, one chunk step per device)."""
  import jax
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from geojax.models import urgt
  from geojax.parallel import sharding

  jax.config.update("jax_default_matmul_precision", "highest")
  assert jax.device_count() == 4, jax.devices()
  keys = jax.random.split(jax.random.key(0), 3)
  image = jax.random.uniform(keys[0], (1, 64, 48, 3))
  depth = jax.random.uniform(keys[1], (1, 64, 48))
  normal = jax.random.normal(keys[2], (1, 64, 48, 3))
  opts = dict(patch_split=(4, 2), overlap=False, crop_size=28, rope_positions="true")

  def run(head_chunk, mesh=None):
    model = urgt.URGT.from_preset("urgt-tiny", rngs=nnx.Rngs(0), head_chunk=head_chunk)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, *a: {k: v for k, v in urgt.refine(
        nnx.merge(graphdef, st), *a, **opts).items() if k != "layout"})
    if mesh is None:
      return jax.device_get(fn(state, image, depth, normal)), None
    with jax.set_mesh(mesh):
      rep = jax.device_put(state, NamedSharding(mesh, P()))
      out = fn(rep, image, depth, normal)
      # The network's per-crop outputs stay split over the view devices.
      crops = jax.device_put(jax.random.uniform(keys[0], (1, 8, 28, 28, 3)),
                             NamedSharding(mesh, P(None, "view")))
      pos = urgt.rope_positions(np.zeros((8, 2)), 2)
      net = jax.jit(lambda st, c: nnx.merge(graphdef, st)(c, c[..., :1], c, positions=pos))(
          rep, crops)
      spec = [str(s) for s in net["depth"].sharding.spec]
    return jax.device_get(out), spec

  want, _ = run(0)
  got, spec = run(2, sharding.make_view_mesh(4))
  err = {k: float(np.abs(np.asarray(got[k], np.float64) - want[k]).max()
                  / max(1.0, float(np.abs(want[k]).max()))) for k in ("depth", "normal")}
  return {"errors": err, "depth_spec": spec}


def test_urgt_crops_over_view_devices_match_single_device():
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_urgt_view_parallel "
          "as t; print('REPORT', json.dumps(t._report()))")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"))
  r = subprocess.run([sys.executable, "-c", code, tests_dir], env=env, capture_output=True,
                     text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  report = json.loads([l for l in r.stdout.splitlines() if l.startswith("REPORT")][0][7:])
  assert max(report["errors"].values()) < 1e-5, report
  assert report["depth_spec"][:2] == ["None", "view"], report
