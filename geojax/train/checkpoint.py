"""Training checkpoints with Orbax: train state, data-iterator state and config per step.

Each step directory holds three items: ``state`` (the :class:`geojax.train.step.TrainState`:
parameters, optimizer state, EMA, counters), ``data`` (the Grain iterator state, when an
iterator is given) and ``config`` (JSON). Orbax writes every step into a temporary directory and
renames it when complete, so an interrupted or crashed save is never picked up by
:meth:`TrainCheckpointer.latest_step`. Saves are asynchronous by default; :meth:`wait` blocks
until the last one is on disk.

Retention: the newest ``keep_last`` steps, plus the ``keep_best`` best by ``best_metric`` (a key
of the metrics passed to :meth:`save`; ``best_mode`` ``"min"`` or ``"max"``; a save without that
metric counts as the worst).

Write failures (a full disk, a lost bucket, a permission change): the step being written stays a
temporary directory, never picked up and removed by the next run's manager; the failure
surfaces, from :meth:`TrainCheckpointer.save` or :meth:`TrainCheckpointer.wait` (asynchronous
saves fail in the background), as one :class:`CheckpointWriteError` naming the directory, the
step, the cause and the newest complete step, which stays restorable. Orbax's own traceback
logs of such failures are folded into that one error.

Restoring onto another mesh: pass an abstract state whose leaves carry the new shardings
(``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``, e.g. from :func:`abstract_like`); Orbax
reads each array directly into its new layout.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


def abstract_like(state: Any) -> Any:
  """Shape/dtype/sharding skeleton of ``state`` (for :meth:`TrainCheckpointer.restore`)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      state)


class CheckpointWriteError(OSError):
  """Writing a checkpoint failed; the previous complete checkpoint is intact."""


class _FoldOrbaxWriteErrors(logging.Filter):
  """Drops Orbax's ERROR tracebacks of failed background saves (re-raised as one line)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and
                f"{os.sep}orbax{os.sep}" in (record.pathname or ""))


def complete_steps(directory: str) -> list[int]:
  """Steps with a finished checkpoint directory in ``directory`` (scanned from disk)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if re.fullmatch(r"\d+", d) and os.path.isdir(os.path.join(directory, d)))


class TrainCheckpointer:
  """Save / restore / resume for one training run directory."""

  def __init__(self, directory: str, *, keep_last: int = 3, best_metric: str | None = None,
               best_mode: str = "min", keep_best: int = 1, async_save: bool = True):
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max'; got {best_mode!r}")
    if keep_last < 1:
      raise ValueError(f"keep_last must be >= 1; got {keep_last}")
    self.directory = os.path.abspath(directory)
    keep = [policies.LatestN(n=keep_last)]
    if best_metric:
      worst = float("inf") if best_mode == "min" else float("-inf")
      keep.append(policies.BestN(get_metric_fn=lambda m: m.get(best_metric, worst),
                                 reverse=best_mode == "min", n=keep_best,
                                 keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep),
        enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._pending: int | None = None
    self._filter = _FoldOrbaxWriteErrors()
    logging.getLogger("absl").addFilter(self._filter)

  def _write_error(self, step: int | None, e: BaseException) -> CheckpointWriteError:
    done = [s for s in complete_steps(self.directory) if s != step]
    prev = (f"the previous checkpoint (step {done[-1]}) is intact; rerun to resume from it"
            if done else "there is no earlier complete checkpoint")
    cause = " ".join(f"{type(e).__name__}: {e}".split())
    err = CheckpointWriteError(f"{self.directory}: writing the checkpoint of step {step} failed "
                               f"({cause}); {prev}")
    err.errno = getattr(e, "errno", None)
    return err

  def latest_step(self) -> int | None:
    """Newest complete checkpoint step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, data_iterator=None, config: dict | None = None,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    """Start saving ``state`` (and iterator state, config) as ``step``; returns whether it did."""
    import grain
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
      items["config"] = ocp.args.JsonSave(config)
    try:  # an earlier asynchronous save that failed surfaces here too
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - any writer failure becomes one CheckpointWriteError
      raise self._write_error(self._pending, e) from e
    try:
      saved = self._manager.save(int(step), args=ocp.args.Composite(**items),
                                 metrics={k: float(v) for k, v in (metrics or {}).items()},
                                 force=force)
    except Exception as e:  # noqa: BLE001
      raise self._write_error(int(step), e) from e
    if saved:
      self._pending = int(step)
    return saved

  def restore(self, abstract_state: Any, *, step: int | None = None, data_iterator=None) -> Any:
    """The train state at ``step`` (default: latest), laid out like ``abstract_state``.

    ``data_iterator``, if given, is moved to the saved position in place.
    """
    import grain
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    out = self._manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"]

  def config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    out = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return dict(out["config"])

  def wait(self) -> None:
    """Block until the last save is on disk; raises :class:`CheckpointWriteError` if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._write_error(self._pending, e) from e

  def close(self) -> None:
    """Finish pending saves (raising :class:`CheckpointWriteError` if one failed) and close."""
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # noqa: BLE001 - the failure was raised by wait() already
        pass
      logging.getLogger("absl").removeFilter(self._filter)
