r"""PPD / PPVD training config: ``python train.py --config=configs/ppd.py:ARG --workdir=DIR``.

``ARG`` is a comma-separated list (big_vision style), e.g. ``stage=pretrain`` or ``runlocal``:

- ``preset``: ``ppd`` (DA-V2 semantics, default), ``ppd-moge`` (MoGe-2 semantics), ``ppvd``
  (video, Pi3 semantics) or the geojax-only ``ppd-small`` (256 wide, 4 blocks), ``ppd-tiny``
  (32 wide: too narrow to carry a patch's noise, for tests only) and ``ppvd-tiny``.
- ``stage``: ``finetune`` (default: velocity MSE + 0.2 x the multi-scale gradient loss, the
  released fine-tune YAML) or ``pretrain`` (MSE only, the pretrain YAML).
- ``data``: ``synthetic`` (built-in procedural scenes, default), ``folder`` or ``tfds`` (as in
  ``configs/da3.py``).
- ``runlocal``: a small run for a CPU laptop or CI (``make demo-ppd``): ``ppd-small`` (a
  256-wide, 4-block DiT prompted by a tiny random frozen DA-V2 encoder) on 64 x 96 images,
  batch 8, 2000 steps; evaluation before and after on 4 held-out scenes, each depth the mean
  of 16 noise seeds (``eval.ensemble``; a small DiT's single samples are noisy).

What a step does (:class:`geojax.families.ppd.PPDTask`): RGB in [0, 1]; GT depth with pixels
that are invalid or non-finite masked (and counted: ``nonfinite_px``); the frozen encoder's
semantics (no gradient, and ``optim.frozen`` keeps its weights and optimizer state out); the
official flow-matching loss (:func:`geojax.losses.ppd.flow_matching_loss`): GT encoded as
``log(d + 1)`` normalised by its 2nd/98th percentiles below 80 m, noise then logit-normal
timesteps, velocity MSE over the mask (+ the gradient loss in fine-tuning).

PPVD (geojax's recipe; the official training code was never released): batches of windows of
``data.pipeline.max_views`` frames of one scene at ``size x size``; one timestep and one
depth normalisation per window; spatial blocks, embedders and final layer from PPD
(``init.ppd``), temporal blocks and the 3072-wide fusion MLP from their zero-gated start.

Fields beyond ``configs/da3.py``'s (see its docstring for the shared ones):

  init.semantics: the frozen encoder's weights (required for the released presets): converted
    official PPD weights (a ``geojax convert --family ppd`` directory: its ``sem_encoder``), or
    the encoder's own release converted once with ``geojax convert --family ppd --tensors-only
    depth_anything_v2_vitl.pth DIR`` (MoGe-2's ``model.pt``; Pi3's ``.safetensors`` as is).
  init.ppd: (PPVD) PPD weights whose DiT starts the video model (converted official directory or
    a geojax PPD checkpoint).
  init.weights / init.checkpoint: fine-tune a whole converted official / geojax model. Without
    any, the DiT starts at the official initialisation (xavier linears, N(0, 0.02) timestep MLP,
    zero adaLN modulations and final layer).
  loss.pretrain, loss.grad_weight (0.2), loss.loc / loss.scale (logit-normal timesteps 0, 1).
  eval.*: held-out synthetic scenes scored with ``depth,edge`` after ``eval.depth_align``
    (``log_affine``: least squares of the prediction against ``log(1 + d)``, the reference's
    default for PPD's affine-normalised log-depth; ``scale_shift`` aligns in depth), the
    edge-aware Chamfer distance (variant A) and the flying-pixel ratio; sampling with
    ``eval.steps``, ``eval.seed``, ``eval.ensemble`` at ``eval.area`` pixels.
"""

import ml_collections

from geojax.parallel.sharding import DEFAULT_RULES
from geojax.train.config_util import parse_arg
from geojax.train.optim import default_optim_config

PRESETS = ("ppd", "ppd-moge", "ppvd", "ppd-tiny", "ppd-small", "ppvd-tiny")
STAGES = ("finetune", "pretrain")
SOURCES = ("synthetic", "folder", "tfds")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, preset="", stage="finetune", data="synthetic", runlocal=False)
  arg.preset = arg.preset or ("ppd-small" if arg.runlocal else "ppd")
  if arg.preset not in PRESETS:
    raise ValueError(f"preset={arg.preset!r}: expected one of {PRESETS}")
  if arg.stage not in STAGES:
    raise ValueError(f"stage={arg.stage!r}: expected one of {STAGES}")
  if arg.data not in SOURCES:
    raise ValueError(f"data={arg.data!r}: expected one of {SOURCES}")
  video = arg.preset.startswith("ppvd")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 20_000 if arg.stage == "pretrain" else 60_000
  c.batch_size = 2 if video else 16

  c.model = ml_collections.ConfigDict(dict(
      family="ppd", preset=arg.preset, attn_impl="cudnn", dtype="bfloat16", remat="full",
      scan=True))
  c.init = ml_collections.ConfigDict(dict(weights="", checkpoint="", semantics="", ppd=""))

  # training size: the official 1024 x 768 area for images; PPVD's fixed 512 x 512 windows
  h, w = (512, 512) if video else (768, 1024)
  c.data = ml_collections.ConfigDict(dict(
      source=arg.data, path="", exif=True, seed=0, num_scenes=10_000, num_views=16 if video else 1,
      height=h, width=w))
  c.data.pipeline = ml_collections.ConfigDict(dict(
      family="da3", buckets=((h, w),), min_views=16 if video else 1,
      max_views=16 if video else 1, view_order="first", patch_size=16,
      augment=True, random_crop=True, num_workers=8, num_epochs=None))

  c.optim = default_optim_config()
  c.optim.total_steps = c.get_ref("total_steps")
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 1_000
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0
  c.optim.frozen = (r"^sem_encoder(/|$)",)

  c.loss = ml_collections.ConfigDict(dict(
      pretrain=arg.stage == "pretrain", grad_weight=0.2, loc=0.0, scale=1.0))

  c.mesh = ml_collections.ConfigDict(dict(
      shape=(-1, 1, 1, 1), axes=("data", "fsdp", "tensor", "view"), rules=DEFAULT_RULES))

  c.eval = ml_collections.ConfigDict(dict(
      every=5_000, at_start=False, at_end=True, use_ema=True, seed=1_000_003, num_scenes=8,
      num_views=16 if video else 1, height=h, width=w, metrics="depth,edge",
      depth_align="log_affine", pose_thresholds=(3, 5, 15, 30), pointcloud_threshold=0.05,
      pictures=True, tb_pictures=2, steps=4, ensemble=1, area=h * w))
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
    c.model.update(dtype="float32", attn_impl="xla", remat="none")
    c.batch_size = 8
    c.total_steps = 2000
    c.data.update(num_scenes=64, height=64, width=96)
    c.data.pipeline.update(buckets=((64, 96),), num_workers=0)
    c.optim.update(lr=2e-3, warmup_steps=50, ema_decay=0.0)
    # a small DiT's samples are noisy: the demo scores the mean of 16 seeds (--ensemble 16)
    c.eval.update(every=0, at_start=True, at_end=True, num_scenes=4, height=64, width=96,
                  area=64 * 96, steps=4, ensemble=16, pictures=True)
    c.checkpoint.update(every=500, keep_last=2)
    c.log_every = 100
  return c
