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
