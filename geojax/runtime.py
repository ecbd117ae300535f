"""Process-level JAX settings shared by the entry points (demo, evaluate, train, bench)."""

from __future__ import annotations

import os

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
