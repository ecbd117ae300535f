r"""Expand a config's ``sweep(add)`` into training runs.

    python -m geojax.train.sweep --config=configs/<family>.py:runlocal --workdir=runs/sweep
    python -m geojax.train.sweep --config=configs/<family>.py:runlocal --workdir=runs/sweep --run

A config file may define ``sweep(add)``; each ``add(**overrides)`` call is one run, with keys
that are dotted config paths (``add(**{"optim.lr": 1e-4})``). Without ``--run`` the launcher
prints one ``train.py`` command per run (to paste into a cluster scheduler); with ``--run`` it
runs them here one after the other and stops at the first failure. Each run gets its own
workdir ``<workdir>/<index>-<key=value,...>``, so rerunning the sweep resumes every run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from typing import Any

from absl import app, flags



def _define_flags() -> None:
  """Flags exist only when this module runs as a program (importing it defines none)."""
  flags.DEFINE_string("config", None, "Config file with a sweep(add) function, optionally with "
                      "its argument: configs/<family>.py:runlocal.")
  flags.DEFINE_string("workdir", None, "Root folder; each run gets a subfolder.")
  flags.DEFINE_bool("run", False, "Run the sweep here, sequentially (default: print).")
  flags.DEFINE_string("train_script", None, "train.py to launch (default: the repo's).")


def load_sweep(config_spec: str) -> list[dict[str, Any]]:
  """The override dicts of ``config_spec``'s ``sweep(add)`` (``path[:arg]``)."""
  path = config_spec.split(":", 1)[0]
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location("_sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "sweep"):
    raise ValueError(f"{path} defines no sweep(add) function")
  runs: list[dict[str, Any]] = []
  module.sweep(lambda **overrides: runs.append(dict(overrides)))
  if not runs:
    raise ValueError(f"{path}: sweep(add) added no runs")
  base = module.get_config(config_spec.split(":", 1)[1] if ":" in config_spec else None)
  for overrides in runs:
    for key in overrides:
      node = base
      for part in key.split("."):
        if part not in node:
          raise ValueError(f"{path}: sweep key {key!r} is not a field of the config")
        node = node[part]
  return runs


def _value(v: Any) -> str:
  return v if isinstance(v, str) else repr(v)


def run_name(index: int, overrides: dict[str, Any]) -> str:
  """``003-optim.lr=0.0001,loss.pose_cond_prob=0.2`` (file-name safe)."""
  parts = ",".join(f"{k}={_value(v)}" for k, v in overrides.items())
  return f"{index:03d}-" + re.sub(r"[^A-Za-z0-9._=,+-]", "_", parts)


def commands(config_spec: str, workdir: str, train_script: str | None = None
             ) -> list[list[str]]:
  """One ``train.py`` argument list per run of the sweep."""
  train_script = train_script or os.path.join(
      os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "train.py")
  out = []
  for i, overrides in enumerate(load_sweep(config_spec)):
    cmd = [sys.executable, train_script, f"--config={config_spec}",
           f"--workdir={os.path.join(workdir, run_name(i, overrides))}"]
    cmd += [f"--config.{k}={_value(v)}" for k, v in overrides.items()]
    out.append(cmd)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  if not f.config or not f.workdir:
    raise app.UsageError("--config and --workdir are required")
  try:
    cmds = commands(f.config, f.workdir, f.train_script)
  except (ValueError, FileNotFoundError) as e:
    print(f"sweep: error: {e}", file=sys.stderr)
    sys.exit(2)
  for i, cmd in enumerate(cmds):
    line = shlex.join(cmd)
    if not f.run:
      print(line)
      continue
    print(f"[sweep {i + 1}/{len(cmds)}] {line}", flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
      print(f"sweep: run {i} failed with exit status {rc}; stopping", file=sys.stderr)
      sys.exit(rc)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
