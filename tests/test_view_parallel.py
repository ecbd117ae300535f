"""View-parallel DA3 inference (views split over a ``"view"`` mesh axis) and chunked DPT heads.

The multi-device checks run in a subprocess with 8 CPU devices
(``--xla_force_host_platform_device_count=8``; the pytest process has one) that executes
:func:`_view_parallel_report` from this file and prints its findings as one JSON line; the
assertions are made here so that a failure shows the numbers.

Weights are random but drawn with numpy (:func:`random_state`) rather than by the model's
initialisers: those take ~30 s of XLA compilation on CPU, and any weights do for comparing two
executions of the same network.

Tolerance. Outputs are compared as ``max |a - b| / max(1, max |b|)`` per output: an absolute
1e-5 for outputs of order one, relative to the output's scale where it is large (random weights
give focal lengths up to ~1e8 pixels and confidences ~10). The scale is the output's largest
magnitude rather than each element's, because fp32 rounding in the shared trunk reaches every
output element with the size of the activations it was computed from, not its own. The
sharded program accumulates in other orders (per-device matmul shapes, the all-gathered
attention with the softmax normalised after the value product), which gives ~1e-6 of that scale.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geojax.models.da3 import DA3, get_config
from geojax.parallel import sharding

OUTPUTS = ("depth", "depth_conf", "ray", "ray_conf", "extrinsics", "intrinsics")
TOL = 1e-5
MEMORY_FRACTION = 0.35  # per-device temp memory, 8 view devices, S = 16, vs one device


def random_state(make, seed: int = 0):
  """``(graphdef, state)`` of the module built by ``make()``, with numpy-drawn weights.

  Kernels are lecun-normal over their fan-in (the leading layer axis of stacked blocks
  excluded), norm/LayerScale scales ``1 + 0.1 N``, everything else ``0.02 N``.
  """
  with sharding.creation_context():
    abstract = nnx.eval_shape(make)
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    names = [str(getattr(p, "key", p)) for p in path]
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if names[-1] == "kernel":
      dims = leaf.shape[1:-1] if "layers" in names else leaf.shape[:-1]
      return noise / np.float32(np.sqrt(np.prod(dims)))
    if names[-1] in ("scale", "gamma"):
      return 1 + 0.1 * noise
    return 0.02 * noise

  pure = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  return graphdef, jax.tree.map(jnp.asarray, state)


def tiny_state(**overrides):
  return random_state(lambda: DA3(get_config("da3-tiny", **overrides), rngs=nnx.Rngs(0)))


def tiny_graphdef(**overrides):
  """Only the graph (config included) of a da3-tiny variant; weights come from elsewhere."""
  with sharding.creation_context():
    return nnx.split(nnx.eval_shape(
        lambda: DA3(get_config("da3-tiny", **overrides), rngs=nnx.Rngs(0))))[0]


def scaled_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def forward(graphdef):
  """Jitted ``state, images -> outputs`` (the six compared outputs only)."""
  return jax.jit(lambda st, x: {k: v for k, v in nnx.merge(graphdef, st)(x).items()
                                if k in OUTPUTS})


def test_sharding_helpers_are_no_ops_without_a_view_axis():
  x = jnp.ones((1, 4, 3, 2))
  assert sharding.view_axis_size() == 1
  assert sharding.shard_views(x) is x and sharding.gather_tokens(x) is x
  mesh = sharding.make_view_mesh()
  assert dict(mesh.shape) == {"data": 1, "view": 1}
  with pytest.raises(ValueError, match="does not divide"):
    sharding.make_view_mesh(2)
  with pytest.raises(ValueError, match=">= 1"):
    sharding.make_view_mesh(0)
  with pytest.raises(ValueError, match="head_chunk"):
    get_config("da3-tiny", head_chunk=-1)


def test_chunked_heads_equal_unchunked():
  """``head_chunk=2`` over 5 views (three scan steps, one padded view) gives the outputs of the
  heads run on all views at once: the DualDPT head and the GS head (which also takes images).
  Driven through ``DA3._run_head`` on random features, so no backbone is compiled; the whole
  forward with chunks is compared in the view-parallel test below."""
  graphdef, state = tiny_state(gs_head=True)
  chunked = tiny_graphdef(gs_head=True, head_chunk=2)
  keys = jax.random.split(jax.random.key(1), 5)
  feats = [jax.random.normal(keys[i], (5, 6, 384)) for i in range(4)]
  images = jax.random.normal(keys[4], (5, 28, 42, 3))

  def heads(st, feats, images, graphdef):
    m = nnx.merge(graphdef, st)
    depth = m._run_head(m.head, lambda h, xs: h(xs, (28, 42)), feats)
    gs = m._run_head(m.gs_head, lambda h, xs: h(xs[:-1], (28, 42), images=xs[-1]),
                     [*feats, images])
    return depth, gs

  run = jax.jit(heads, static_argnums=3)
  want, got = run(state, feats, images, graphdef), run(state, feats, images, chunked)
  assert got[0]["depth"].shape == (5, 28, 42) and got[1]["pred"].shape == (5, 28, 42, 37)
  errors = {k: scaled_error(got[i][k], want[i][k]) for i in (0, 1) for k in want[i]}
  assert max(errors.values()) < TOL, errors


def _view_parallel_report() -> dict:
  """Runs in the 8-device subprocess: single-device vs view-parallel forwards of da3-tiny."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  from geojax.nn import attention
  from geojax.runtime import enable_compilation_cache

  jax.config.update("jax_default_matmul_precision", "highest")
  if os.environ.get("GEOJAX_CACHE_DIR"):
    enable_compilation_cache()
  assert jax.device_count() == 8, jax.devices()
  report: dict = {"mesh_errors": []}
  for bad in (3, 16):
    try:
      sharding.make_view_mesh(bad)
    except ValueError as e:
      report["mesh_errors"].append(str(e))
  mesh = sharding.make_view_mesh(8)
  report["mesh"] = dict(mesh.shape)

  # The cuDNN path's shard_map (local queries, gathered keys/values), with the XLA kernel.
  keys = jax.random.split(jax.random.key(2), 3)
  q, k, v = (jax.random.normal(key, (2, 64, 2, 8)) for key in keys)
  dense = attention.attend(q, k, v)
  kernel = lambda q, k, v: attention._attend_xla(q, k, v, None, None)
  with jax.set_mesh(mesh):
    got = jax.jit(lambda q, k, v: attention.gathered_kv_shard_map(kernel, q, k, v))(q, k, v)
  report["shard_map_attention"] = scaled_error(got, dense)

  graphdef, state = tiny_state()
  replicated = jax.device_put(state, NamedSharding(mesh, P()))
  # (B, S, (H, W), head_chunk): B*S = 24 views in chunks of 16 (padded to 32, two steps); 16
  # views at 168 x 168 in chunks of 8. The memory is compared at the latter size: at 28 x 42
  # the temporaries are mostly what no activation sharding divides (one layer's weights,
  # gathered keys and values).
  for b, s, hw, chunk in ((3, 8, (28, 42), 16), (1, 16, (168, 168), 8)):
    chunked = tiny_graphdef(head_chunk=chunk)
    x = jax.random.normal(jax.random.key(s), (b, s, *hw, 3))
    lowered = [forward(graphdef).lower(state, x)]
    with jax.set_mesh(mesh):
      xs = jax.device_put(x, NamedSharding(mesh, P(None, "view")))
      lowered += [forward(gd).lower(replicated, xs) for gd in (graphdef, chunked)]
    # XLA compiles without the GIL: the three programs compile side by side.
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
      single, default, head_chunk = pool.map(lambda lo: lo.compile(), lowered)
    want = single(state, x)
    entry = {"temp_bytes": [single.memory_analysis().temp_size_in_bytes,
                            default.memory_analysis().temp_size_in_bytes]}
    for name, compiled in (("default", default), ("head_chunk", head_chunk)):
      got = compiled(replicated, xs)
      entry[name] = {k: scaled_error(got[k], want[k]) for k in OUTPUTS}
      entry[name + "_depth_spec"] = list(got["depth"].sharding.spec)
    report[f"S={s}"] = entry
  return report


def test_view_parallel_matches_single_device_with_less_memory():
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_view_parallel as t; "
          "print('REPORT', json.dumps(t._view_parallel_report()))")
  # LLVM -O0 roughly halves XLA:CPU compile time (six compiles dominate this test); the HLO
  # passes, hence the buffers and memory figures, are the same, and it is one flag for both
  # the single-device and the sharded programs.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"))
  r = subprocess.run([sys.executable, "-c", code, tests_dir], env=env, capture_output=True,
                     text=True)
  assert r.returncode == 0, r.stderr[-4000:]
  report = json.loads([l for l in r.stdout.splitlines() if l.startswith("REPORT")][0][7:])
  print(json.dumps(report, indent=1))
  assert report["mesh"] == {"data": 1, "view": 8}
  assert len(report["mesh_errors"]) == 2
  assert all("does not divide" in e for e in report["mesh_errors"]), report["mesh_errors"]
  assert report["shard_map_attention"] < TOL
  for s in (8, 16):
    entry = report[f"S={s}"]
    for name in ("default", "head_chunk"):
      assert max(entry[name].values()) < TOL, (s, name, entry[name])
      assert entry[name + "_depth_spec"][:2] == [None, "view"], entry
  single, per_device = report["S=16"]["temp_bytes"]
  print(f"S=16 temp memory: one device {single / 2**20:.1f} MiB, per device with 8 view "
        f"devices {per_device / 2**20:.1f} MiB ({per_device / single:.3f})")
  assert per_device <= MEMORY_FRACTION * single, (single, per_device)
