r"""Train a geojax model.

    python train.py --config=configs/da3.py:runlocal --workdir=runs/local
    python train.py --config=configs/da3.py:preset=large,data=folder \
        --config.data.path=/data/scenes --workdir=gs://bucket/runs/da3-large

Rerunning the same command resumes from the newest complete checkpoint in ``workdir``. SIGTERM
(preemption) saves a checkpoint and exits with status 0. Bad input or config: status 2 and one
line; a fault that stops the run (a checkpoint write fails, a data worker dies): status 1 and one
line, the previous checkpoint intact. A second run on a workdir that a live run holds is refused. Multi-process: set
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
  from geojax.train.config_util import load_config_flag
  from geojax.train.trainer import run
  code = run(load_config_flag(_CONFIG, "train.py"), _WORKDIR.value)
  if code == 1:  # a fault: skip interpreter teardown, where stuck writer threads or dead data
    sys.stdout.flush()  # workers would add noise or hang; the kernel frees the workdir lock
    sys.stderr.flush()
    os._exit(1)
  sys.exit(code)


if __name__ == "__main__":
  from geojax.train.config_util import flags_parser
  app.run(main, flags_parser=flags_parser("train.py"))
