r"""DA3 training config: ``python train.py --config=configs/da3.py:ARG --workdir=DIR``.

``ARG`` is a comma-separated list (big_vision style), e.g. ``preset=large,data=folder`` or
``runlocal``:

- ``preset``: ``tiny`` (geojax-only ViT-Ti/14, no official weights), ``small``, ``base``,
  ``large`` or ``giant`` -> model ``da3-<preset>`` (default ``small``; ``tiny`` with
  ``runlocal``).
- ``data``: ``synthetic`` (built-in procedural scenes, default), ``folder`` (``data.path`` = a
  folder of scene folders, ``geojax.data.formats.scene_folder``) or ``tfds`` (``data.path`` = a
  built ArrayRecord TFDS dataset folder, ``geojax.data.tfds_builder``).
- ``runlocal``: a small run for a CPU laptop or CI (``make demo``): 84x126, 3 views,
  batch 2, 400 steps (about 4 minutes on 2 cores), no point term (see below), evaluation
  before and after on 4 held-out synthetic scenes.

Every field can be overridden on the command line (``--config.optim.lr=1e-4``). Fields:

  model.family, model.preset: registry family and preset (``geojax.models.da3.PRESET_NAMES``).
  model.attn_impl: ``xla``, ``cudnn`` (cuDNN needs bf16 compute on a GPU) or ``chunked``
    (blockwise attention, memory linear in the tokens, any backend).
  model.dtype: compute dtype of the backbone, ``float32`` or ``bfloat16`` (parameters stay fp32).
  model.remat: remat policy of the block stacks (``geojax.nn.stack.REMAT_POLICIES``).
  model.scan: scan the block stacks with ``nnx.scan`` (faster compiles).
  init.weights: official DA3 checkpoint (directory or .safetensors) to fine-tune from.
  init.checkpoint: geojax model checkpoint (``workdir/model`` of an earlier run) to start from.
  data.source, data.path: see ``data`` above.
  data.exif: turn scene-folder images (with their cameras and maps) upright by their EXIF
    orientation (``geojax.data.formats.orientation``); False reads the stored pixels.
  data.seed, data.num_scenes, data.num_views, data.height, data.width: the synthetic scene
    family (seed, scene count, views rendered per scene, render size).
  data.pipeline: ``geojax.data.pipeline.PipelineConfig`` fields (buckets, min/max views,
    augmentation, workers, ...); ``batch_size`` comes from the top-level ``batch_size``.
  batch_size: global batch size (scenes per step, split over processes and the batch axes).
  total_steps: training steps, one batch each (``optim.total_steps`` follows it). With
    gradient accumulation (``optim.accum_steps = k``, a divisor of ``total_steps``) the
    optimizer updates every k steps and its schedule runs over ``total_steps / k`` updates.
  optim: ``geojax.train.optim.default_optim_config`` (AdamW, warm-up + cosine, clipping,
    weight-decay mask, lr multipliers / frozen modules, EMA, gradient accumulation).
  loss: ``geojax.losses.da3.DA3LossConfig`` fields (term weights, ``conf_lambda``,
    ``pose_cond_prob``, ``teacher_switch_fraction``).
  mesh.shape, mesh.axes: device mesh (one -1 entry takes the remaining devices); axes ``data``,
    ``fsdp``, ``tensor`` and ``view`` (reserved for view-parallel attention).
  mesh.rules: logical axis -> mesh axes (``geojax.parallel.sharding.DEFAULT_RULES``).
  eval.every, eval.at_start, eval.at_end: periodic evaluation on held-out synthetic scenes
    (``eval.seed`` differs from ``data.seed``); metrics as in ``evaluate.py``.
  eval.use_ema: evaluate the EMA parameters when ``optim.ema_decay > 0``.
  eval.ref_view_strategy: ``first`` by default, the frame the loss uses during training
    (``evaluate.py`` and inference default to ``saddle_balanced``).
  checkpoint.every (0: only at the end), keep_last, best_metric, best_mode, keep_best,
    async_save: Orbax checkpoints (last N plus best N by an eval metric such as ``abs_rel``).
  log_every: stdout / TensorBoard scalar interval; tensorboard: write event files.
  max_bad_in_row: stop after this many consecutive non-finite steps (0 = never).
  export_model: write ``workdir/model`` (EMA if enabled) at the end for ``evaluate.py``.
  summary_path: JSON summary (default ``workdir/summary.json``).
  distributed: ``coordinator_address``, ``num_processes``, ``process_id`` for
    ``jax.distributed.initialize`` (or ``auto=True`` on clusters JAX detects itself).
"""

import ml_collections

from geojax.parallel.sharding import DEFAULT_RULES
from geojax.train.config_util import parse_arg
from geojax.train.optim import default_optim_config

PRESETS = ("tiny", "small", "base", "large", "giant")
SOURCES = ("synthetic", "folder", "tfds")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, preset="", data="synthetic", runlocal=False)
  arg.preset = arg.preset or ("tiny" if arg.runlocal else "small")
  if arg.preset not in PRESETS:
    raise ValueError(f"preset={arg.preset!r}: expected one of {PRESETS}")
  if arg.data not in SOURCES:
    raise ValueError(f"data={arg.data!r}: expected one of {SOURCES}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 200_000
  c.batch_size = 16

  c.model = ml_collections.ConfigDict(dict(
      family="da3", preset=f"da3-{arg.preset}", attn_impl="xla", dtype="bfloat16", remat="none",
      scan=True))
  c.init = ml_collections.ConfigDict(dict(weights="", checkpoint=""))

  c.data = ml_collections.ConfigDict(dict(
      source=arg.data, path="", exif=True, seed=0, num_scenes=10_000, num_views=18, height=504, width=504))
  c.data.pipeline = ml_collections.ConfigDict(dict(
      buckets=((504, 504), (378, 504), (336, 504), (280, 504), (504, 336), (504, 896)),
      min_views=2, max_views=18, view_order="ordered", augment=True, random_crop=True,
      num_workers=8, num_epochs=None))

  c.optim = default_optim_config()
  c.optim.total_steps = c.get_ref("total_steps")
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 8_000
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.05
  c.optim.clip_norm = 1.0
  # Backbone at 0.1x the head's learning rate (reference da3.md section 10).
  c.optim.lr_multipliers = ((r"^backbone/", 0.1),)
  c.optim.ema_decay = 0.0

  c.loss = ml_collections.ConfigDict(dict(
      depth_weight=1.0, ray_weight=1.0, point_weight=1.0, camera_weight=1.0, grad_weight=1.0,
      conf_lambda=0.2, pose_cond_prob=0.2, teacher_switch_fraction=0.6))

  c.mesh = ml_collections.ConfigDict(dict(
      shape=(-1, 1, 1, 1), axes=("data", "fsdp", "tensor", "view"), rules=DEFAULT_RULES))

  c.eval = ml_collections.ConfigDict(dict(
      every=5_000, at_start=False, at_end=True, use_ema=True, seed=1_000_003, num_scenes=8,
      num_views=4, height=280, width=504, metrics="depth,pose", depth_align="median",
      pose_thresholds=(3, 5, 15, 30), pointcloud_threshold=0.05,
      ref_view_strategy="first", pictures=True, tb_pictures=2))
  c.checkpoint = ml_collections.ConfigDict(dict(
      every=2_000, keep_last=3, best_metric="abs_rel", best_mode="min", keep_best=1,
      async_save=True))
  c.log_every = 50
  c.tensorboard = True
  c.progress = True
  c.max_bad_in_row = 20
  c.export_model = True
  c.summary_path = ""
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="", num_processes=0, process_id=-1, timeout_s=300, auto=False))

  if arg.runlocal:
    c.model.dtype = "float32"
    c.batch_size = 2
    c.total_steps = 400
    c.data.update(num_scenes=64, num_views=6, height=84, width=126)
    c.data.pipeline.update(buckets=((84, 126),), min_views=3, max_views=3, random_crop=False,
                           num_workers=0)
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 20
    c.optim.lr_multipliers = ()
    # With only a few hundred steps the point term, acting through still-random rays, pulls
    # the depth towards the camera, and DA3's exp depth activation then stops learning (depth
    # collapsed to ~0 in a 300-step run). The short run trains depth, rays and cameras without it.
    c.loss.point_weight = 0.0
    c.eval.update(every=0, at_start=True, at_end=True, num_scenes=4, num_views=3, height=84,
                  width=126, pictures=True)
    c.checkpoint.update(every=100, keep_last=2)
    c.log_every = 25
  return c


def sweep(add):
  """Learning-rate x pose-conditioning sweep (``python -m geojax.train.sweep``)."""
  for lr in (1e-4, 2e-4, 4e-4):
    for p in (0.0, 0.2):
      add(**{"optim.lr": lr, "loss.pose_cond_prob": p})
