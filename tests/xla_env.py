"""XLA_FLAGS for the subprocesses tests start: the flags of this run (conftest's faster CPU
compilation) with a simulated device count or other flags added."""

import os


def xla_flags(extra: str) -> str:
  keep = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join(keep + extra.split())
