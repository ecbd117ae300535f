"""Helpers of the reliability tests: the one-line error check and picklable sources for the
fault tests (Grain worker processes import them by name)."""

import os
import signal

import numpy as np


def one_error_line(err: str, *needles: str) -> str:
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1, f"expected one line, got:\n{err}"
  assert "Traceback" not in err
  for n in needles:
    assert n in lines[0], f"{n!r} not in {lines[0]!r}"
  return lines[0]


class DyingSource:
  """Scenes from a list; a worker process that reads scene ``die_at`` is killed (SIGKILL).
  The process that built the source reads it normally."""

  def __init__(self, scenes, die_at: int):
    self.scenes, self.die_at, self.parent = scenes, die_at, os.getpid()

  def __len__(self):
    return len(self.scenes)

  def __getitem__(self, i):
    if int(i) == self.die_at and os.getpid() != self.parent:
      os.kill(os.getpid(), signal.SIGKILL)
    return {k: np.asarray(v) for k, v in self.scenes[int(i)].items()}
