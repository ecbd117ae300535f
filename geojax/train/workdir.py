"""One run per workdir: an advisory lock that a killed run cannot leave stale.

:func:`lock_workdir` takes an exclusive ``flock`` on ``workdir/.lock``. The kernel drops the lock
when its holder exits in any way (SIGKILL, a crash, a lost node), so there is nothing to clean
up, and a second run on the same workdir, in another process or this one, is refused with the
holder's pid, host and start time, which the holder writes into the file. On systems without
``fcntl`` (Windows) and on filesystems that do not support ``flock`` the lock is skipped with a
warning. Only the chief process of a multi-process run takes it.
"""

from __future__ import annotations

import datetime
import os
import socket

from absl import logging

LOCK_FILE = ".lock"


class WorkdirBusyError(FileExistsError):
  """The workdir is held by another live run."""


class WorkdirLock:
  """A held workdir lock; :meth:`release` (or process exit) frees it."""

  def __init__(self, path: str, fd: int | None):
    self.path, self._fd = path, fd

  def release(self) -> None:
    if self._fd is not None:
      import fcntl
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def lock_workdir(workdir: str) -> WorkdirLock:
  """Take ``workdir``'s lock (creating the folder) or raise :class:`WorkdirBusyError`."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  try:
    import fcntl
  except ImportError:
    logging.warning("no fcntl on this system: workdir %s is not locked against a second run",
                    workdir)
    return WorkdirLock(path, None)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    try:
      holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another run"
    finally:
      os.close(fd)
    raise WorkdirBusyError(f"workdir {workdir} is in use by {holder}; wait for that run to "
                           "finish (or stop it) or choose another --workdir") from None
  except OSError as e:  # e.g. a network filesystem without flock
    os.close(fd)
    logging.warning("cannot lock workdir %s (%s): not protected against a second run",
                    workdir, e)
    return WorkdirLock(path, None)
  now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  os.ftruncate(fd, 0)
  os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {now}\n".encode(), 0)
  return WorkdirLock(path, fd)
