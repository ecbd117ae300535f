"""Evaluation config: ``python evaluate.py --config=configs/evaluate.py[:PRESET]``.

``PRESET`` is a preset name of any registered model family (default ``da3-small``); it selects
the family. Every field can be overridden on the command line, e.g.
``--config.data.num_scenes=8 --config.model.weights=/path/to/DA3-LARGE``.

Fields:
  model.family: registry name of the model family (set from the preset).
  model.preset: preset of the family (DA3: ``da3-small`` ... ``da3nested-giant-large``).
  model.checkpoint: a geojax model checkpoint directory (``geojax.io.checkpoint.save_model``).
  model.weights: official weights (directory with ``model.safetensors`` or the file itself).
    With neither, the model is randomly initialised (``model.seed``) - useful only as a smoke
    test of the pipeline.
  model.*: every other field is an inference option of the family (``Family.eval_options``),
    e.g. DA3's ``process_res`` (long side the views are resized to, rounded to multiples of
    14), ``ref_view_strategy`` and ``use_ray_pose``.
  data.source: ``synthetic`` (built-in scenes, ``geojax.data.synthetic``), ``scene_folder``
    (``data.path`` is one scene folder or a folder of them, ``geojax.data.formats``) or
    ``colmap`` (``data.path`` is a sparse model folder, ``data.images`` its images folder,
    default ``<path>/../images``, or ``<path>/../../images`` for ``sparse/0``; cameras only,
    so only pose metrics apply) or ``tapvid3d``
    (``data.path`` is a TAPVid-3D ``.npz`` or a folder of them, ``geojax.data.formats.tapvid3d``;
    3D tracks only, scored with the ``track`` group exactly as the official TAPVid-3D code:
    median scale, depth-adaptive thresholds at evaluation resolution 256).
  data.seed, data.num_scenes, data.num_views, data.height, data.width: synthetic scene family,
    how many scenes, views per scene and their resolution (``num_scenes`` also caps the scene
    folders read; 0 = all). ``data.dynamic``: moving objects and ground-truth 3D tracks
    (needed by the ``track`` group).
  data.max_depth: ground-truth depth above this is ignored (0 = no limit).
  data.exif: turn scene-folder and COLMAP images (and their cameras, depth, masks, normals)
    upright by their EXIF orientation (``geojax.data.formats.orientation``); False reads the
    stored pixels, as the official code does (for parity runs).
  metrics: comma-separated metric groups (``depth``, ``pose``, ``pointcloud``, ``pointmap``,
    ``normal``, ``track``, ``edge``, ``seam``) or ``all``; groups that do not apply to the
    model's outputs are skipped (with a note for the geometry groups), ``normal`` / ``track``
    need ground-truth normals / tracks in the scenes, and ``seam`` a model that refines crops
    (URGT; a provisional metric).
  depth_align: alignment of predicted to GT depth per view before depth metrics:
    ``none``, ``median``, ``scale``, ``scale_shift``, ``disparity_affine`` or ``log_affine``
    (affine in ``log(1 + d)``); the family's default (PPD: ``log_affine``), else ``median``.
  depth_scope: ``view`` (default: one alignment per view) or ``sequence`` (one alignment over all
    views of a scene: video depth as video benchmarks score it, e.g. D4RT with
    ``depth_align=scale`` or ``scale_shift``).
  pose_thresholds: AUC thresholds in degrees.
  pointcloud_threshold: precision/recall distance in GT units (metres for synthetic scenes);
    predicted points are aligned to GT points by Umeyama Sim(3) over pixel correspondences.
  pointcloud_max_points: points per side after random subsampling (seeded).
  pointmap_align: alignment of the predicted camera-frame point maps to the GT ones, one fit per
    scene, before Rel^p / delta^p (``rel_p``, ``delta_p``): ``none``, ``scale`` or
    ``scale_shift``.
  out_dir: output folder (``results.json``, ``scenes.csv``, ``pictures/``); an existing
    ``results.json`` is never replaced unless ``overwrite=True``.
  pictures: write one PNG per scene (views x [image, GT depth, predicted depth, AbsRel error]).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  from geojax.models import registry
  preset = arg or "da3-small"
  family = registry.family_for_preset(preset)
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(
      family=family.name, preset=preset, checkpoint="", weights="", seed=0,
      **family.eval_options))
  c.data = ml_collections.ConfigDict(dict(
      source="synthetic", path="", images="", seed=0, num_scenes=4, num_views=4, height=280,
      width=504, max_depth=0.0, dynamic=False, exif=True))
  c.metrics = "all"
  c.depth_align = family.depth_align or "median"
  c.depth_scope = "view"
  c.pose_thresholds = (3, 5, 15, 30)
  c.pointcloud_threshold = 0.05
  c.pointcloud_max_points = 200_000
  c.pointmap_align = "scale"
  c.out_dir = "outputs/eval"
  c.overwrite = False
  c.pictures = True
  return c
