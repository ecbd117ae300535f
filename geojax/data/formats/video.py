"""Read a video file, or a folder of frames, as ``(frames (T, H, W, 3) uint8, timestamps (T,))``.

Video files are decoded with imageio's v3 API (``imageio.v3.imiter`` / ``immeta``) and its
ffmpeg plugin, an optional dependency: ``pip install imageio imageio-ffmpeg`` (geojax extra
``video``). Timestamps are in seconds from the first frame, ``index / fps`` of the stream (the
ffmpeg plugin reports a constant frame rate).

A folder is read as a video of its image files (PNG/JPEG) sorted by name, at ``folder_fps``
frames per second (default 30); it needs only Pillow.

``fps`` subsamples to (at most) the requested rate: a frame is kept when its timestamp reaches
the next slot ``t_0 + k / fps``; asking for a rate at or above the source's keeps every frame.
``max_frames`` stops after that many *kept* frames (decoding stops early too).

:func:`write_video` writes uint8 frames as an H.264 mp4 (atomically), e.g. ``tracks.mp4`` of
``geojax predict``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import numpy as np

from geojax.data.formats.scene_folder import IMAGE_EXTS, MissingFileError, load_rgb

_INSTALL_HINT = ("reading or writing video files needs imageio with its ffmpeg plugin: "
                 "pip install imageio imageio-ffmpeg  (or pip install 'geojax[video]')")


@contextlib.contextmanager
def _ffmpeg_quiet():
  """Silence the ``os.fork()`` RuntimeWarning JAX raises when imageio starts its ffmpeg
  subprocess: the child execs ffmpeg at once and runs no JAX code."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    yield


def _imageio():
  try:
    import imageio.v3 as iio  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(_INSTALL_HINT) from e
  return iio


def list_frames(folder: str | os.PathLike, exts: tuple[str, ...] = IMAGE_EXTS) -> list[str]:
  """Image files (default PNG/JPEG; ``exts`` lower-case) of ``folder``, sorted by name."""
  folder = os.fspath(folder)
  return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                if f.lower().endswith(exts) and not f.startswith(".")
                and os.path.isfile(os.path.join(folder, f)))


def _subsample(stream: Iterator[tuple[float, np.ndarray]], fps: float | None,
               max_frames: int | None) -> tuple[list[np.ndarray], list[float]]:
  frames, times = [], []
  next_t = None
  eps = 1e-9
  for t, frame in stream:
    if max_frames is not None and len(frames) >= max_frames:
      break
    if fps is not None:
      if next_t is not None and t + eps < next_t:
        continue
      # advance the slot past t (several slots may be skipped by a low-rate source)
      base = t if next_t is None else next_t
      next_t = base + (np.floor((t - base) * fps + eps) + 1) / fps
    frames.append(frame)
    times.append(t)
  return frames, times


def _check_frame(frame: np.ndarray, where: str) -> np.ndarray:
  a = np.asarray(frame)
  if a.ndim == 2:
    a = np.repeat(a[..., None], 3, -1)
  if a.ndim != 3 or a.shape[-1] not in (3, 4):
    raise ValueError(f"{where}: expected an RGB frame, got shape {a.shape}")
  if a.dtype != np.uint8:
    raise ValueError(f"{where}: expected 8-bit frames, got {a.dtype}")
  return np.ascontiguousarray(a[..., :3])


def _ffmpeg_reason(e: BaseException) -> str:
  """One line for an imageio/ffmpeg failure: its message without ffmpeg's banner and build
  configuration, plus ffmpeg's own last complaint (e.g. ``moov atom not found``)."""
  text = str(e)
  head, _, tail = text.partition("=== stderr ===")
  reason = " ".join(head.split()) or type(e).__name__
  lines = [l.strip() for l in tail.splitlines() if l.strip()]
  last = next((l for l in reversed(lines) if not l.startswith(("ffmpeg version", "built with",
                                                               "configuration:", "lib"))), "")
  if last and last not in reason:
    reason = f"{reason}; ffmpeg: {last}"
  return reason if len(reason) <= 300 else reason[:297] + "..."


def read_video(path: str | os.PathLike, *, fps: float | None = None,
               max_frames: int | None = None, folder_fps: float = 30.0,
               exif: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Decode frames of a video file or a folder of images.

  Args:
    path: a video file (anything imageio's ffmpeg plugin opens: mp4, mov, avi, mkv, webm, ...)
      or a folder of image files (sorted by name).
    fps: target rate in frames per second (subsampling only); None keeps every frame.
    max_frames: keep at most this many frames.
    folder_fps: the frame rate assumed for a folder of images.
    exif: turn frame images upright by their EXIF orientation (folders only).

  Returns:
    ``frames`` (T, H, W, 3) uint8 RGB and ``timestamps`` (T,) float64 seconds.

  Raises:
    ImportError with an install hint when a video file is given and imageio is missing;
    MissingFileError (``FileNotFoundError`` and ``ValueError``) for a missing path;
    ValueError for unreadable files, frames of different sizes or no frames at all.
  """
  path = os.fspath(path)
  if fps is not None and not fps > 0:
    raise ValueError(f"fps must be positive, got {fps}")
  if max_frames is not None and max_frames < 1:
    raise ValueError(f"max_frames must be >= 1, got {max_frames}")
  if os.path.isdir(path):
    files = list_frames(path)
    if not folder_fps > 0:
      raise ValueError(f"folder_fps must be positive, got {folder_fps}")

    def stream():
      for i, f in enumerate(files):
        yield i / folder_fps, f
    picked, times = _subsample(stream(), fps, max_frames)
    frames = [load_rgb(f, exif=exif) for f in picked]
  elif os.path.isfile(path):
    iio = _imageio()
    try:
      with _ffmpeg_quiet():
        meta = iio.immeta(path, plugin="FFMPEG")
      src_fps = float(meta.get("fps") or 0.0)
      if not src_fps > 0:
        raise ValueError(f"{path}: the video reports no frame rate")

      def stream():
        with _ffmpeg_quiet():
          for i, fr in enumerate(iio.imiter(path, plugin="FFMPEG")):
            yield i / src_fps, _check_frame(fr, f"{path} frame {i}")
      frames, times = _subsample(stream(), fps, max_frames)
    except ImportError:
      raise
    except ValueError:
      raise
    except Exception as e:  # imageio/ffmpeg raise assorted OSError/RuntimeError/IndexError
      raise ValueError(f"{path}: cannot decode video (corrupt, truncated or not a video): "
                       f"{_ffmpeg_reason(e)}") from None
  else:
    raise MissingFileError(f"{path}: video file or frame folder not found")
  if not frames:
    raise ValueError(f"{path}: no frames")
  shapes = {f.shape for f in frames}
  if len(shapes) > 1:
    raise ValueError(f"{path}: frames have different sizes {sorted(shapes)}")
  return np.stack(frames), np.asarray(times, np.float64)


def video_available() -> bool:
  """Whether mp4 files can be written (the ``video`` extra: imageio and imageio-ffmpeg)."""
  import importlib.util
  return all(importlib.util.find_spec(m) is not None for m in ("imageio", "imageio_ffmpeg"))


def write_video(path: str, frames: np.ndarray, fps: float = 8.0) -> None:
  """Write uint8 ``(S, H, W, 3)`` frames as an H.264 mp4 (the ``video`` extra), atomically: a
  temporary file in the same folder, renamed when complete. Odd sizes are padded by one edge
  row / column (H.264 in yuv420p needs even sides)."""
  iio = _imageio()
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
    raise ValueError(f"frames must be uint8 (S, H, W, 3) with S >= 1; got {frames.dtype} "
                     f"{frames.shape}")
  h, w = frames.shape[1:3]
  frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
  tmp = f"{path}.tmp-{os.getpid()}.mp4"
  try:
    with _ffmpeg_quiet():
      iio.imwrite(tmp, frames, extension=".mp4", fps=float(fps), codec="libx264",
                  macro_block_size=1, quality=8, ffmpeg_log_level="error")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
