"""Process settings of the entry points: the host-allocator tuning keeps XLA's freed
temporaries mapped, so repeated calls stop page-faulting on fresh memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted function with 16 MiB temporaries and matmul scratch, which glibc serves with mmap
# (worker-thread arenas always do for blocks this large): untuned, each call faults them in.
PROBE = r"""
import json, resource, sys
from geojax import runtime
applied = runtime.tune_host_allocator() if sys.argv[1] == "1" else False
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.tanh(jnp.sin(x) @ x) @ jnp.cos(x)).sum())
x = jnp.ones((2048, 2048), jnp.float32)
for _ in range(3):
  f(x).block_until_ready()
faults = []
for _ in range(6):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps({"applied": applied, "faults": min(faults)}))
"""


def _probe(tuned: bool, **env) -> dict:
  r = subprocess.run([sys.executable, "-c", PROBE, "1" if tuned else "0"], capture_output=True,
                     text=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuned_allocator_stops_page_faults_on_repeated_calls():
  plain, tuned = _probe(False), _probe(True)
  assert tuned["applied"] and not plain["applied"]
  # fewest page faults of six calls: untuned, every call faults in its scratch afresh (about
  # 8k 4 KiB pages); tuned, once the heap has grown to the program's needs, none
  assert plain["faults"] > 2000, plain
  assert tuned["faults"] < plain["faults"] / 10, (plain, tuned)


def test_opt_out_leaves_allocator_alone():
  assert _probe(True, GEOJAX_TUNE_MALLOC="0")["applied"] is False
