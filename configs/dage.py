r"""DAGE training config: ``python train.py --config=configs/dage.py:ARG --workdir=DIR``.

``ARG`` is a comma-separated list (big_vision style), e.g. ``stage=2`` or ``runlocal``:

- ``stage``: ``1`` (distillation from a frozen Pi3 teacher run inside the step at twice the
  student's LR resolution, plus the stage-2 terms: lr 1e-4, 40k steps; set
  ``teacher.weights``), ``2`` (default; the official second stage: all DAGE losses, lr 1e-5,
  10k steps) or ``3`` (confidence head: confidence BCE, lr 1e-5, 10k steps).
- ``preset``: ``dage`` (the released configuration, default) or ``dage-tiny`` (geojax-only).
- ``data``: ``synthetic`` (built-in procedural scenes, default), ``folder`` or ``tfds`` (as in
  ``configs/da3.py``).
- ``runlocal``: a small run for a CPU laptop or CI (``make demo-dage``): ``dage-tiny`` at 84x126,
  3 frames, batch 2, stage-2 losses, evaluation before and after on 4 held-out scenes (with
  ``stage=1`` the teacher is a random ``pi3-tiny`` unless ``teacher.*`` is set: a smoke run).

Fields beyond ``configs/da3.py``'s (see its docstring for the shared ones):

  stage: 1, 2 or 3 (above).
  model.lr_max_size: longest side of the LR stream during training (official 518 at training
    resolutions; the eval/predict default is 252).
  model.hr_num_tokens: HR token budget during training (official 3600).
  init.weights: official DAGE weights (directory or .safetensors) to fine-tune from;
    init.checkpoint: a geojax DAGE checkpoint; init.moge2 + init.pi3: the official stage-1
    initialisation, merged from MoGe-2 (``Ruicheng/moge-2-vitl``'s model.pt converted once with
    ``geojax convert --family dage --tensors-only``) and Pi3 (``yyfz233/Pi3``'s model.safetensors).
  teacher.weights / teacher.checkpoint: stage 1's Pi3 teacher (official safetensors or a geojax
    Pi3 checkpoint); teacher.preset: its preset when neither is set (only ``pi3-tiny``, random:
    smoke runs); teacher.max_size: its longest side (672, a multiple of 28; the student's LR
    stream runs at exactly half).
  optim: the official recipe: AdamW (b2 0.95, wd 0.05), cosine with 1000 warm-up steps to
    1e-3 of the peak, clipping 1.0; both ViT encoders frozen; the Pi3-initialised parts (LR
    decoder, registers, camera decoder and head, token splitter) at 0.1x the learning rate;
    biases and 1-D parameters without weight decay (``geojax.train.optim``).
  loss: keyword arguments of the stage's loss (``geojax.losses.dage.distill_loss`` /
    ``pi3_loss`` / ``conf_loss``), e.g. ``edge_weight``, ``camera_weight``, ``metric_scale_weight``.
  eval.lr_max_size, eval.hr_num_tokens, eval.chunk: inference options of the evaluation.
"""

import ml_collections

from geojax.parallel.sharding import DEFAULT_RULES
from geojax.train.config_util import parse_arg
from geojax.train.optim import default_optim_config

PRESETS = ("dage", "dage-tiny")
SOURCES = ("synthetic", "folder", "tfds")
STAGES = (1, 2, 3)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, preset="", data="synthetic", stage=2, runlocal=False)
  arg.preset = arg.preset or ("dage-tiny" if arg.runlocal else "dage")
  if arg.preset not in PRESETS:
    raise ValueError(f"preset={arg.preset!r}: expected one of {PRESETS}")
  if arg.data not in SOURCES:
    raise ValueError(f"data={arg.data!r}: expected one of {SOURCES}")
  if int(arg.stage) not in STAGES:
    raise ValueError(f"stage={arg.stage}: expected one of {STAGES}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stage = int(arg.stage)
  c.total_steps = 10_000
  c.batch_size = 16

  c.model = ml_collections.ConfigDict(dict(
      family="dage", preset=arg.preset, attn_impl="xla", dtype="bfloat16", remat="none",
      scan=True, lr_max_size=518, hr_num_tokens=3600))
  c.init = ml_collections.ConfigDict(dict(weights="", checkpoint="", moge2="", pi3=""))
  c.teacher = ml_collections.ConfigDict(dict(weights="", checkpoint="", preset="pi3",
                                             max_size=672, seed=0))

  c.data = ml_collections.ConfigDict(dict(
      source=arg.data, path="", exif=True, seed=0, num_scenes=10_000, num_views=6, height=518, width=518))
  c.data.pipeline = ml_collections.ConfigDict(dict(
      buckets=((518, 518), (392, 518), (336, 518), (518, 392), (294, 518)),
      min_views=2, max_views=6, view_order="ordered", augment=True, random_crop=True,
      num_workers=8, num_epochs=None))

  c.optim = default_optim_config()
  c.optim.total_steps = c.get_ref("total_steps")
  c.optim.lr = 1e-5
  c.optim.warmup_steps = 1_000
  c.optim.end_lr_factor = 1e-3
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.05
  c.optim.clip_norm = 1.0
  c.optim.ema_decay = 0.999
  c.optim.frozen = (r"^encoder/", r"^hr_encoder/")
  c.optim.lr_multipliers = ((r"^(decoder|register_token|camera_decoder|camera_head|"
                             r"token_splitter)(/|$)", 0.1),)

  c.loss = ml_collections.ConfigDict()
  if c.stage == 1:
    c.total_steps = 40_000
    c.optim.lr = 1e-4

  c.mesh = ml_collections.ConfigDict(dict(
      shape=(-1, 1, 1, 1), axes=("data", "fsdp", "tensor", "view"), rules=DEFAULT_RULES))

  c.eval = ml_collections.ConfigDict(dict(
      every=2_000, at_start=False, at_end=True, use_ema=True, seed=1_000_003, num_scenes=8,
      num_views=4, height=280, width=504, metrics="depth,pose", depth_align="median",
      pose_thresholds=(3, 5, 15, 30), pointcloud_threshold=0.05, pictures=True, tb_pictures=2,
      lr_max_size=252, hr_num_tokens=3600, chunk=0))
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
    c.model.update(lr_max_size=70, hr_num_tokens=54)
    c.batch_size = 2
    c.total_steps = 300
    c.data.update(num_scenes=64, num_views=6, height=84, width=126)
    c.data.pipeline.update(buckets=((84, 126),), min_views=3, max_views=3, random_crop=False,
                           num_workers=0)
    c.optim.update(lr=5e-4, warmup_steps=20, ema_decay=0.0, frozen=(), lr_multipliers=())
    c.eval.update(every=0, at_start=True, at_end=True, num_scenes=4, num_views=3, height=84,
                  width=126, pictures=True, lr_max_size=70, hr_num_tokens=54)
    c.checkpoint.update(every=100, keep_last=2)
    c.log_every = 25
    c.teacher.preset = "pi3-tiny"
  return c
