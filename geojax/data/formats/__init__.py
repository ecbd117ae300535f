"""Readers and writers for on-disk formats users already have.

- :mod:`~geojax.data.formats.scene_folder`: the geojax scene folder (``images/``, ``depth/``,
  ``normals/``, ``masks/``, ``cameras.json``) and :class:`SceneFolderSource` for Grain.
- :mod:`~geojax.data.formats.colmap`: COLMAP sparse models (text and binary) and scenes.
- :mod:`~geojax.data.formats.video`: video files (optional ``imageio`` + ``imageio-ffmpeg``) and
  folders of frames.

Scene dicts use the layout of :func:`geojax.data.synthetic.render_scene`: OpenCV camera axes,
world-to-camera ``extrinsics`` (S, 4, 4) float32, ``intrinsics`` (S, 3, 3) float32 in pixels with
pixel centres at integer coordinates, ``depth`` z-depth in metres with 0 = invalid.
"""

from __future__ import annotations

from geojax.data.formats.colmap import (Camera, Image, Model, Point3D, camera_to_pinhole,
                                        image_to_w2c, model_from_scene, models_equal,
                                        pinhole_camera, read_colmap_scene, read_model,
                                        write_model)
from geojax.data.formats.scene_folder import (MissingFileError, SceneFolderSource, read_scene,
                                              write_scene)
from geojax.data.formats.video import read_video

__all__ = [
    "Camera", "Image", "MissingFileError", "Model", "Point3D", "SceneFolderSource",
    "camera_to_pinhole", "image_to_w2c", "model_from_scene", "models_equal", "pinhole_camera",
    "read_colmap_scene", "read_model", "read_scene", "read_video", "write_model", "write_scene",
]
