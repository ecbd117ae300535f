"""TFDS: scene folders or synthetic scenes -> ArrayRecord datasets for ``tfds.data_source``.

One example is one scene: ``images`` (S, H, W, 3) uint8, ``depth`` (S, H, W) float32 (0 =
invalid), ``valid`` (S, H, W) bool, ``intrinsics`` (S, 3, 3), ``extrinsics`` (S, 4, 4)
world-to-camera, ``name``; ``normals`` (S, H, W, 3) when ``with_normals``. Arrays are stored
zlib-compressed; scenes may differ in view count and resolution. Building needs no TensorFlow.

    path = build_dataset("/data/tfds", scenes=scene_folder_scenes("/data/my_scenes"))
    source = load_data_source(path, "train")          # random access, Grain-ready
    ds = grain.MapDataset.source(source)
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator

import numpy as np

KEYS = ("images", "depth", "valid", "intrinsics", "extrinsics")


def _features(with_normals: bool):
  import tensorflow_datasets as tfds
  t = lambda shape, dtype: tfds.features.Tensor(shape=shape, dtype=dtype, encoding="zlib")
  feats = {
      "images": t((None, None, None, 3), np.uint8),
      "depth": t((None, None, None), np.float32),
      "valid": t((None, None, None), np.bool_),
      "intrinsics": t((None, 3, 3), np.float32),
      "extrinsics": t((None, 4, 4), np.float32),
      "name": tfds.features.Text(),
  }
  if with_normals:
    feats["normals"] = t((None, None, None, 3), np.float32)
  return tfds.features.FeaturesDict(feats)


def _example(name: str, scene: dict[str, np.ndarray], with_normals: bool) -> dict:
  missing = [k for k in KEYS + (("normals",) if with_normals else ()) if k not in scene]
  if missing:
    raise ValueError(f"scene {name!r} lacks {missing} needed by the TFDS dataset")
  ex = {"images": np.asarray(scene["images"], np.uint8),
        "depth": np.asarray(scene["depth"], np.float32),
        "valid": np.asarray(scene["valid"], bool),
        "intrinsics": np.asarray(scene["intrinsics"], np.float32),
        "extrinsics": np.asarray(scene["extrinsics"], np.float32), "name": name}
  if with_normals:
    ex["normals"] = np.asarray(scene["normals"], np.float32)
  s = ex["images"].shape[0]
  for k in ("depth", "valid", "intrinsics", "extrinsics"):
    if ex[k].shape[0] != s:
      raise ValueError(f"scene {name!r}: {k} has {ex[k].shape[0]} views, images have {s}")
  return ex


def synthetic_scenes(seed: int, num_scenes: int, **render_kwargs
                     ) -> Callable[[], Iterator[tuple[str, dict]]]:
  """Scene factory over ``geojax.data.synthetic.render_scene(seed, i, **render_kwargs)``."""
  def gen():
    from geojax.data.synthetic import render_scene
    for i in range(num_scenes):
      yield f"synthetic_{seed}_{i:06d}", render_scene(seed, i, **render_kwargs)
  return gen


def scene_folder_scenes(root: str) -> Callable[[], Iterator[tuple[str, dict]]]:
  """Scene factory over the scene folders (with ``cameras.json``) directly under ``root``."""
  def gen():
    from geojax.data.formats.scene_folder import read_scene
    if not os.path.isdir(root):
      raise FileNotFoundError(f"scene root {root} does not exist")
    for d in sorted(os.listdir(root)):
      path = os.path.join(root, d)
      if os.path.isfile(os.path.join(path, "cameras.json")):
        yield d, read_scene(path)
  return gen


def _builder_class():
  import tensorflow_datasets as tfds

  class GeojaxScenes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """geojax scenes (one example per scene)."""
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Scenes with images, depth, validity and cameras."}

    def __init__(self, *, scenes: Callable[[], Iterable[tuple[str, dict]]],
                 with_normals: bool, **kwargs):
      self._scenes, self._with_normals = scenes, with_normals
      super().__init__(**kwargs)

    def _info(self):
      return self.dataset_info_from_configs(features=_features(self._with_normals))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      seen = set()
      for name, scene in self._scenes():
        if name in seen:
          raise ValueError(f"duplicate scene name {name!r}")
        seen.add(name)
        yield name, _example(name, scene, self._with_normals)

  return GeojaxScenes


def build_dataset(data_dir: str, *, scenes: Callable[[], Iterable[tuple[str, dict]]],
                  with_normals: bool = False) -> str:
  """Write the scenes as an ArrayRecord TFDS dataset under ``data_dir``; returns its folder.

  An existing, complete dataset of the same version is reused, never rewritten.
  """
  builder = _builder_class()(scenes=scenes, with_normals=with_normals, data_dir=data_dir,
                             file_format="array_record")
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)


class CheckedSource:
  """A TFDS data source whose unreadable records raise one ``ValueError`` naming the dataset
  folder, the record and the cause (ArrayRecord and decoding failures otherwise surface as
  assorted ``RuntimeError`` / ``TypeError`` from deep inside the readers)."""

  def __init__(self, source, dataset_dir: str, split: str):
    self.source, self.dataset_dir, self.split = source, dataset_dir, split

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int):
    try:
      return self.source[index]
    except (IndexError, KeyboardInterrupt):
      raise
    except Exception as e:  # noqa: BLE001 - any reader failure is a damaged record
      msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
      raise ValueError(f"{self.dataset_dir}: {self.split} record {index} cannot be read "
                       f"(corrupt or truncated ArrayRecord file?): {msg}") from None

  def __repr__(self) -> str:
    return f"CheckedSource({self.dataset_dir!r}, split={self.split!r}, records={len(self)})"


def load_data_source(dataset_dir: str, split: str = "train", *, probe: bool = True):
  """Random-access source (``len``, ``[i]`` -> dict of NumPy arrays) of a built dataset.

  Every read failure is a ``ValueError`` naming the folder and record (:class:`CheckedSource`);
  ``probe`` reads the first and last records at once, so a damaged file is reported before a
  run builds its model.
  """
  import tensorflow_datasets as tfds
  if not os.path.isdir(dataset_dir):
    raise FileNotFoundError(f"TFDS dataset folder {dataset_dir} does not exist")
  try:
    builder = tfds.builder_from_directory(dataset_dir)
    raw = builder.as_data_source(split=split)
  except Exception as e:  # noqa: BLE001 - broken dataset_info.json / features.json, no split
    msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    raise ValueError(f"{dataset_dir}: not a readable TFDS dataset (split {split!r}): {msg}"
                     ) from None
  src = CheckedSource(raw, dataset_dir, split)
  if probe and len(src):
    src[0]
    src[len(src) - 1]
  return src
