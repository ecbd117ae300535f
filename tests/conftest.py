import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole session, shared with the subprocesses that
# tests start (entry points read GEOJAX_CACHE_DIR) and with pytest-xdist workers (they inherit
# the controller's environment; only the process that made the folder removes it).
if "GEOJAX_CACHE_DIR" not in os.environ:
  os.environ["GEOJAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="geojax-test-cache-")
  atexit.register(shutil.rmtree, os.environ["GEOJAX_CACHE_DIR"], True)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_enable_x64", False)
jax.config.update("jax_compilation_cache_dir", os.environ["GEOJAX_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

# Fewer LLVM passes for the CPU code of the main (xdist) run: ~30% less compile time, which is
# most of this suite; numerics are unchanged at the tolerances used. The memory-heavy parity
# run (`-m heavy`, giant models where run time dominates) keeps the full optimisation, as does
# GEOJAX_TEST_FULL_OPT=1. Subprocess tests append their own flags to the inherited XLA_FLAGS.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def pytest_configure(config):
  if (config.getoption("markexpr", "") or "").strip() == "heavy":
    return
  if os.environ.get("GEOJAX_TEST_FULL_OPT") == "1":
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE_FLAGS}".strip()
