r"""Train a geojax model.

    python train.py --config=configs/da3.py:runlocal --workdir=runs/local
    python train.py --config=configs/da3.py:preset=large,data=folder \
        --config.data.path=/data/scenes --workdir=gs://bucket/runs/da3-large

Rerunning the same command resumes from the newest complete checkpoint in ``workdir``. SIGTERM
(preemption) saves a checkpoint and exits with status 0. Multi-process: set
``--config.distributed.coordinator_address=HOST:PORT``, ``num_processes`` and ``process_id`` (or
``--config.distributed.auto=True`` where JAX detects the cluster). See ``configs/da3.py`` for
every field and ``geojax/train/trainer.py`` for what a workdir holds.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/da3.py:runlocal.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, summary).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/da3.py:runlocal")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  if not flags.FLAGS["verbosity"].present:  # keep Orbax's per-save INFO lines out of stdout
    logging.set_verbosity(logging.WARNING)
  from geojax.runtime import enable_compilation_cache, tune_host_allocator
  from geojax.train import trainer
  tune_host_allocator()
  try:
    trainer.maybe_initialize_distributed(_CONFIG.value)
    enable_compilation_cache()
    summary = trainer.train(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
    print(f"train.py: error: {e}", file=sys.stderr)
    sys.exit(2)
  if summary.get("preempted"):
    print(f"stopped by SIGTERM at step {summary['steps']}; rerun the same command to resume")
  else:
    keys = ("abs_rel", "auc30")
    fmt = lambda m: ", ".join(f"{k} {m[k]:.4f}" for k in keys if k in m) or "-"
    print(f"done: {summary['steps']} steps in {summary['seconds']:.0f}s; "
          f"eval before: {fmt(summary['before'])}; after: {fmt(summary['after'])}")


if __name__ == "__main__":
  app.run(main)
