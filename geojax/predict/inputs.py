"""What ``geojax predict`` reads: command-line inputs resolved into scenes.

Each ``INPUT`` is one of:

- **image files** (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``): consecutive image
  arguments form one scene, named after their folder;
- **a video file** (``.mp4``, ``.mov``, ``.avi``, ``.mkv``, ``.webm``, ``.m4v``): one scene of
  frames sampled at ``fps`` (all frames when ``fps`` is None), named after the file;
- **a scene folder** (``cameras.json`` + ``images/``, see :mod:`geojax.data.formats.scene_folder`):
  its images, with its cameras as known poses;
- **a COLMAP folder**: ``images/`` plus a sparse model in ``sparse/0/``, ``sparse/`` or the folder
  itself (``cameras``/``images``/``points3D``, ``.bin`` or ``.txt``). Poses and intrinsics of
  undistorted (pinhole) cameras become known poses; other camera models are refused;
- **a folder of images**: its image files sorted by name form one scene.

Scene names are made unique by appending ``-2``, ``-3``, ...
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from geojax.data.formats import colmap, scene_folder, video
from geojax.data.formats.scene_folder import MissingFileError, load_rgb

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")


@dataclasses.dataclass
class Scene:
  """One scene to predict.

  Attributes:
    name: output sub-folder name.
    kind: ``images``, ``folder``, ``video``, ``scene`` or ``colmap``.
    source: the input path(s), for messages.
    images: ``S`` uint8 RGB arrays (sizes may differ; see :mod:`geojax.predict.preprocess`).
    names: ``S`` view names (file names, or ``frame_000000`` for videos).
    intrinsics: ``(S, 3, 3)`` known pixel intrinsics (geojax convention), or None.
    extrinsics: ``(S, 4, 4)`` known world-to-camera poses, or None.
  """
  name: str
  kind: str
  source: str
  images: list[np.ndarray]
  names: list[str]
  intrinsics: np.ndarray | None = None
  extrinsics: np.ndarray | None = None


def _is_image(path: str) -> bool:
  return path.lower().endswith(IMAGE_EXTS)


def _colmap_model_dir(folder: str) -> str | None:
  for sub in (os.path.join("sparse", "0"), "sparse", ""):
    d = os.path.join(folder, sub)
    if os.path.isdir(d) and any(os.path.isfile(os.path.join(d, "cameras" + e))
                                for e in (".bin", ".txt")):
      return d
  return None


def _load_images(paths: Sequence[str], exif: bool) -> list[np.ndarray]:
  return [load_rgb(p, exif=exif) for p in paths]


def _folder_scene(path: str, max_views: int | None, exif: bool) -> Scene:
  name = os.path.basename(os.path.normpath(path)) or "scene"
  if os.path.isfile(os.path.join(path, scene_folder.CAMERAS_FILE)):
    sc = scene_folder.read_scene(path, load_depth=False, load_normals=False, load_masks=False,
                                 exif=exif)
    sl = slice(0, max_views)
    return Scene(name, "scene", path, list(sc["images"][sl]), list(sc["names"][sl]),
                 sc["intrinsics"][sl], sc["extrinsics"][sl])
  model_dir = _colmap_model_dir(path)
  if model_dir is not None:
    img_dir = os.path.join(path, "images")
    if not os.path.isdir(img_dir):
      raise MissingFileError(f"{path}: COLMAP folder without an images/ sub-folder")
    sc = colmap.read_colmap_scene(model_dir, img_dir, exif=exif)
    sl = slice(0, max_views)
    return Scene(name, "colmap", path, list(sc["images"][sl]), list(sc["names"][sl]),
                 sc["intrinsics"][sl], sc["extrinsics"][sl])
  files = video.list_frames(path, IMAGE_EXTS)
  if not files and os.path.isdir(os.path.join(path, "images")):
    files = video.list_frames(os.path.join(path, "images"), IMAGE_EXTS)
  if not files:
    raise ValueError(f"{path}: no images found (looked for {', '.join(IMAGE_EXTS)} files, "
                     f"a scene folder's cameras.json or a COLMAP model)")
  files = files[:max_views]
  return Scene(name, "folder", path, _load_images(files, exif),
               [os.path.basename(f) for f in files])


def _video_scene(path: str, fps: float | None, max_views: int | None, exif: bool) -> Scene:
  frames, _ = video.read_video(path, fps=fps, max_frames=max_views, exif=exif)
  name = os.path.splitext(os.path.basename(path))[0]
  return Scene(name, "video", path, list(frames), [f"frame_{i:06d}" for i in range(len(frames))])


def resolve(inputs: Sequence[str], *, fps: float | None = None,
            max_views: int | None = None, exif: bool = True) -> list[Scene]:
  """Read every input into :class:`Scene` objects (see the module docstring).

  ``exif``: images are turned upright by their EXIF orientation, with the known cameras of
  scene and COLMAP folders (see :mod:`geojax.data.formats.orientation`); False reads the stored
  pixels, as the official DA3 input processor does.

  Raises:
    ValueError (``MissingFileError`` for absent paths) naming the input and the problem: no
    images in a folder, an unreadable image, a non-pinhole COLMAP camera, an unknown file type.
  """
  if not inputs:
    raise ValueError("no inputs given: pass image files, folders, videos, scene or COLMAP folders")
  if max_views is not None and max_views < 1:
    raise ValueError(f"max_views must be >= 1; got {max_views}")
  scenes: list[Scene] = []
  pending: list[str] = []

  def flush():
    if pending:
      folder = os.path.basename(os.path.dirname(os.path.abspath(pending[0]))) or "images"
      files = pending[:max_views]
      scenes.append(Scene(folder, "images", ", ".join(files), _load_images(files, exif),
                          [os.path.basename(f) for f in files]))
      pending.clear()

  for raw in inputs:
    path = os.fspath(raw)
    if os.path.isfile(path) and _is_image(path):
      pending.append(path)
      continue
    flush()
    if os.path.isdir(path):
      scenes.append(_folder_scene(path, max_views, exif))
    elif os.path.isfile(path) and path.lower().endswith(VIDEO_EXTS):
      scenes.append(_video_scene(path, fps, max_views, exif))
    elif os.path.isfile(path):
      raise ValueError(f"{path}: not an image ({', '.join(IMAGE_EXTS)}), a video "
                       f"({', '.join(VIDEO_EXTS)}) or a folder")
    else:
      raise MissingFileError(f"{path}: no such file or folder")
  flush()
  used: set[str] = set()
  for sc in scenes:
    base, k = sc.name, 2
    while sc.name in used:
      sc.name, k = f"{base}-{k}", k + 1
    used.add(sc.name)
  return scenes
