"""Process settings of the entry points: the host-allocator tuning keeps XLA's freed
temporaries mapped, so repeated calls stop page-faulting on fresh memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What XLA:CPU does on every call, without XLA (whose own page-fault counts vary with the
# machine and the thread pool): a worker thread allocates a 40 MiB temporary, touches it and
# frees it. 40 MiB is above glibc's largest dynamic mmap threshold (32 MiB), so untuned every
# block is a fresh mmap that faults in all its pages; tuned, the block is carved from the one
# arena's heap, which is never trimmed, so after the first call the pages are already there.
PROBE = r"""
import ctypes, json, resource, sys, threading
from geojax import runtime
applied = runtime.tune_host_allocator() if sys.argv[1] == "1" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
N = 40 << 20
faults = []
def work():
  for _ in range(6):
    r0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    p = libc.malloc(N)
    libc.memset(p, 1, N)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - r0)
t = threading.Thread(target=work)
t.start()
t.join()
print(json.dumps({"applied": applied, "faults": faults}))
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
  pages = (40 << 20) // 4096
  # untuned, every call faults in the whole block afresh; tuned, only the first does
  assert min(plain["faults"]) > pages // 2, plain
  assert tuned["faults"][0] > pages // 2, tuned
  assert max(tuned["faults"][1:]) < pages // 100, (plain, tuned)


def test_opt_out_leaves_allocator_alone():
  assert _probe(True, GEOJAX_TUNE_MALLOC="0")["applied"] is False
