r"""URGT training config: ``python train.py --config=configs/urgt.py:ARG --workdir=DIR``.

``ARG`` is a comma-separated list (big_vision style), e.g. ``data=folder`` or ``runlocal``:

- ``preset``: ``urgt`` (the released configuration, default) or ``urgt-tiny`` (geojax-only).
- ``data``: ``synthetic`` (built-in procedural high-resolution images, default), ``folder``
  (scene folders; normals are fitted to their depth) or ``tfds`` (as in ``configs/da3.py``).
- ``runlocal``: a small run for a CPU laptop or CI (``make demo-urgt``): ``urgt-tiny`` with
  70-pixel crops on 280x280 images (a 4 x 4 lattice of 70-pixel patches), batch 2, 300 steps,
  chunked attention switched to XLA's (a few hundred tokens), evaluation
  of the prior and of the model before and after on 4 held-out images.

GridMix (the paper's variable multi-patch training, :mod:`geojax.data.pipeline` with
``family="urgt"``): the training image is a 4 x 4 lattice of patches of ``H/4 x W/4``; each batch
draws ``M`` in 1..4 with ``data.pipeline.gridmix_probs`` (0.1, 0.2, 0.3, 0.4) and every sample
keeps a random contiguous ``M x M`` block of patches (``M = 4``: the whole image). The block's
patches are the crops, resized to ``model.crop_size``, with global RoPE positions from their
true lattice cells. The training size is one bucket (``data.pipeline.buckets``), a multiple of
4 x 14 per side.

Fields beyond ``configs/da3.py``'s (see its docstring for the shared ones):

  model.crop_size: side every crop is resized to (518 for the released weights).
  model.head_chunk: crops the DPT heads run at a time (0 = all).
  init.vggt: VGGT-1B weights (``facebook/VGGT-1B``'s ``model.pt`` converted once with
    ``geojax convert --family urgt --tensors-only model.pt DIR``), the paper's start: the
    aggregator and depth head from VGGT-1B, the normal head at its initialisation
    (``geojax.convert.urgt.merge_vggt``). init.weights: official URGT weights (directory or
    .safetensors) to fine-tune from; init.checkpoint: a geojax URGT checkpoint. Except when
    fine-tuning a URGT, the prior embeddings and the heads' last convs start at N(0, 1e-4)
    with zero bias (``geojax.models.urgt.init_training_start``).
  prior.source: the coarse priors of training images: ``degraded`` (the GT made coarse and
    distorted, ``geojax.losses.urgt.degraded_prior``: ``factor``, ``gamma``, ``noise``) or
    ``model`` (a frozen DA3 model run inside the step on each GridMix block at long side
    ``prior.size``, ``prior.weights`` a geojax DA3 checkpoint or official DA3 weights;
    ``geojax.families.urgt.model_prior``); normal priors are fitted to the depth prior.
    Evaluation uses the same source (``eval.prior_source`` / ``eval.prior_weights`` follow
    ``prior.*`` unless set).
  loss: ``depth_weight``, ``normal_weight``, ``grad_weight``, ``normal_mse_weight``,
    ``grad_scales`` (``geojax.losses.urgt.urgt_loss``) and ``normal_target``: ``pseudo``
    (normals fitted to GT depth, the paper's) or ``gt`` (the dataset's normals).
  optim: AdamW, warm-up and cosine; the backbone (patch embedding, frame and global blocks,
    camera and register tokens) at 0.1x the learning rate of the heads and prior embeddings
    (1e-5 vs 1e-4; reference ``urgt.md`` section 8).
  eval.*: held-out synthetic images scored with ``depth,normal,seam`` (depth aligned by scale
    and shift, as the reference proposes) at ``eval.patch_split`` with overlapping crops and
    true RoPE positions; ``eval.prior_source="degraded"`` gives them the training prior, and
    the summary's ``prior`` entry scores the prior itself (with ``model``: the prior model
    on the whole held-out image).
"""

import ml_collections

from geojax.parallel.sharding import DEFAULT_RULES
from geojax.train.config_util import parse_arg
from geojax.train.optim import default_optim_config

PRESETS = ("urgt", "urgt-tiny")
SOURCES = ("synthetic", "folder", "tfds")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, preset="", data="synthetic", runlocal=False)
  arg.preset = arg.preset or ("urgt-tiny" if arg.runlocal else "urgt")
  if arg.preset not in PRESETS:
    raise ValueError(f"preset={arg.preset!r}: expected one of {PRESETS}")
  if arg.data not in SOURCES:
    raise ValueError(f"data={arg.data!r}: expected one of {SOURCES}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 40_000
  c.batch_size = 8

  c.model = ml_collections.ConfigDict(dict(
      family="urgt", preset=arg.preset, attn_impl="chunked", dtype="bfloat16", remat="none",
      scan=True, crop_size=518, head_chunk=0))
  c.init = ml_collections.ConfigDict(dict(weights="", checkpoint="", vggt=""))
  c.prior = ml_collections.ConfigDict(dict(source="degraded", factor=8, gamma=0.7, noise=0.05,
                                           weights="", size=504))

  size = 4 * 518  # 4 x 4 patches of 518: crops at their native size
  c.data = ml_collections.ConfigDict(dict(
      source=arg.data, path="", exif=True, seed=0, num_scenes=10_000, num_views=1, height=size,
      width=size))
  c.data.pipeline = ml_collections.ConfigDict(dict(
      family="urgt", buckets=((size, size),), min_views=1, max_views=1, view_order="first",
      augment=True, random_crop=True, gridmix_probs=(0.1, 0.2, 0.3, 0.4), gridmix_size=4,
      num_workers=8, num_epochs=None))

  c.optim = default_optim_config()
  c.optim.total_steps = c.get_ref("total_steps")
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 1_000
  c.optim.weight_decay = 0.05
  c.optim.clip_norm = 1.0
  c.optim.lr_multipliers = ((r"^(patch_embed|frame_blocks|global_blocks|camera_token|"
                             r"register_token)(/|$)", 0.1),)

  c.loss = ml_collections.ConfigDict(dict(
      depth_weight=1.0, normal_weight=1.0, grad_weight=0.5, normal_mse_weight=1.0,
      grad_scales=4, normal_target="pseudo"))

  c.mesh = ml_collections.ConfigDict(dict(
      shape=(-1, 1, 1, 1), axes=("data", "fsdp", "tensor", "view"), rules=DEFAULT_RULES))

  c.eval = ml_collections.ConfigDict(dict(
      every=5_000, at_start=False, at_end=True, use_ema=True, seed=1_000_003, num_scenes=8,
      num_views=1, height=2160, width=3840, metrics="depth,normal,seam",
      depth_align="scale_shift", pose_thresholds=(3, 5, 15, 30), pointcloud_threshold=0.05,
      pictures=True, tb_pictures=2, patch_split=(8, 8), grid=False, crop_size=518,
      rope_positions="true", prior_source="degraded", prior_weights="", prior_factor=8,
      prior_gamma=0.7, prior_noise=0.05))
  # held-out images get the training prior: the same degradation, or the same prior model
  c.eval.prior_source = c.prior.get_ref("source")
  c.eval.prior_weights = c.prior.get_ref("weights")
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
    c.model.update(dtype="float32", crop_size=70, attn_impl="xla")
    c.batch_size = 2
    c.total_steps = 300
    c.data.update(num_scenes=64, height=280, width=280)
    c.data.pipeline.update(buckets=((280, 280),), num_workers=0)
    c.optim.update(lr=1e-3, warmup_steps=20, lr_multipliers=(), ema_decay=0.0)
    c.eval.update(every=0, at_start=True, at_end=True, num_scenes=4, height=280, width=280,
                  patch_split=(4, 4), crop_size=70, pictures=True)
    c.checkpoint.update(every=100, keep_last=2)
    c.log_every = 25
  return c
