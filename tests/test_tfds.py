"""TFDS ArrayRecord datasets built offline from scenes read back equal, also through Grain."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
grain = pytest.importorskip("grain")

from geojax.data import tfds_builder  # noqa: E402
from geojax.data.synthetic import render_scene  # noqa: E402


def _scenes(n):
  return [(f"s{i}", render_scene(5, i, num_views=2 + i % 2, height=14 * (2 + i), width=42))
          for i in range(n)]


def test_build_and_read_back_through_grain(tmp_path):
  scenes = _scenes(3)
  path = tfds_builder.build_dataset(str(tmp_path / "tfds"), scenes=lambda: iter(scenes),
                                    with_normals=True)
  source = tfds_builder.load_data_source(path, "train")
  assert len(source) == 3
  ds = grain.MapDataset.source(source)
  got = {ex["name"].decode() if isinstance(ex["name"], bytes) else ex["name"]: ex
         for ex in (ds[i] for i in range(len(ds)))}
  for name, scene in scenes:
    ex = got[name]
    for k in ("images", "depth", "valid", "intrinsics", "extrinsics", "normals"):
      assert ex[k].dtype == np.asarray(scene[k]).dtype, k
      np.testing.assert_array_equal(ex[k], scene[k], err_msg=k)
  # building again reuses the finished dataset instead of rewriting it
  again = tfds_builder.build_dataset(str(tmp_path / "tfds"), scenes=lambda: iter(()),
                                     with_normals=True)
  assert again == path and len(tfds_builder.load_data_source(again)) == 3


def test_scene_folder_to_tfds_to_grain(tmp_path):
  """The done-when check: a TFDS dataset built from a tiny scene-folder root reads back equal."""
  from geojax.data.formats.scene_folder import read_scene, write_scene
  root = tmp_path / "scenes"
  for name, scene in _scenes(2):
    write_scene(scene, str(root / name), depth_format="npy")
  path = tfds_builder.build_dataset(str(tmp_path / "tfds"),
                                    scenes=tfds_builder.scene_folder_scenes(str(root)))
  ds = grain.MapDataset.source(tfds_builder.load_data_source(path))
  assert len(ds) == 2
  for ex in ds:
    name = ex["name"].decode() if isinstance(ex["name"], bytes) else ex["name"]
    ref = read_scene(str(root / name))
    for k in tfds_builder.KEYS:
      np.testing.assert_array_equal(ex[k], ref[k], err_msg=k)


def test_bad_scenes_are_reported(tmp_path):
  s = dict(_scenes(1)[0][1])
  del s["extrinsics"]
  with pytest.raises(ValueError, match="extrinsics"):
    tfds_builder.build_dataset(str(tmp_path / "bad"), scenes=lambda: iter([("x", s)]))
  with pytest.raises(FileNotFoundError, match="nowhere"):
    tfds_builder.load_data_source(str(tmp_path / "nowhere"))
