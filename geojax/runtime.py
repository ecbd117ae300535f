"""Process-level settings shared by the entry points (demo, evaluate, train, predict, bench):
JAX's persistent compilation cache and the host allocator."""

from __future__ import annotations

import ctypes
import os
import sys

import jax

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "geojax", "jax")


def enable_compilation_cache(path: str | None = None, min_compile_secs: float = 1.0) -> str:
  """Turn on JAX's persistent compilation cache (``$GEOJAX_CACHE_DIR`` or ``~/.cache/geojax``).

  Programs that took at least ``min_compile_secs`` to compile are stored and reused by later
  runs with the same shapes, which removes most start-up time of repeated evaluations.
  """
  path = path or os.environ.get("GEOJAX_CACHE_DIR") or DEFAULT_CACHE_DIR
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
  return path


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def tune_host_allocator() -> bool:
  """Let glibc keep freed host memory for reuse instead of returning it to the OS.

  XLA:CPU allocates each program's temporaries and its kernels' scratch buffers (hundreds of
  MB for a DA3 forward) afresh on every call. glibc serves blocks that large with ``mmap``
  (always, in the per-thread arenas of XLA's worker threads) and unmaps them on free, so every
  call faults in brand-new pages: on the 2-core VM of ``BENCHMARKS.md`` a da3-small forward
  took about 300k page faults and ran 5-20% slower than with this setting. This turns
  ``mmap`` off for allocations, keeps one malloc arena for all threads and disables heap
  trimming, so freed blocks stay mapped and later calls reuse them.

  Call it first thing in a program, before JAX starts its threads. The cost is that the
  process keeps its peak host memory until it exits, which suits the entry points
  (``geojax predict``, ``train.py``, ``evaluate.py``, ``demo.py``, ``bench/``), the only
  callers; importing geojax changes nothing. ``GEOJAX_TUNE_MALLOC=0`` opts out. Returns
  whether the setting was applied (Linux with glibc only).
  """
  if os.environ.get("GEOJAX_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # glibc only: musl and others have other mallopt semantics
  except (OSError, AttributeError):
    return False
  # mallopt returns 1 on success; a trim threshold of -1 disables trimming (mallopt(3)).
  return all(libc.mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
