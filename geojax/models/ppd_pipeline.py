"""The whole PPD / PPVD model: a frozen semantic encoder and the DiT it prompts.

The official ``PixelPerfectDepth`` / ``PixelPerfectVideoDepth`` hold ``sem_encoder`` (DA-V2,
MoGe-2 or Pi3; :mod:`geojax.models.ppd_semantics`) and ``dit``
(:class:`geojax.models.ppd.PPD` / :class:`~geojax.models.ppd.PPVD`); so does
:class:`PixelPerfectDepth`, under the same names, so its official state dict is
``dit.*`` + ``sem_encoder.*``.

Presets pair a DiT preset with an encoder preset (:data:`PRESETS`): ``ppd`` (DA-V2 ViT-L),
``ppd-moge`` (MoGe-2), ``ppvd`` (Pi3), and geojax-only ``ppd-tiny`` / ``ppvd-tiny`` (the tiny
DiTs prompted by tiny random frozen encoders, whose token width the DiT's ``semantics_dim``
follows). :func:`depth` runs the image model end to end: semantics once per image, the Euler
sampler over one or several noise seeds, their mean.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from geojax.models import ppd, ppd_semantics
from geojax.parallel.sharding import create

# preset -> (DiT preset, semantic encoder preset)
PRESETS: dict[str, tuple[str, str]] = {
    "ppd": ("ppd", "da2"),
    "ppd-moge": ("ppd-moge", "moge2"),
    "ppvd": ("ppvd", "pi3"),
    "ppd-tiny": ("ppd-tiny", "da2-tiny"),
    "ppd-small": ("ppd-small", "da2-tiny"),
    "ppvd-tiny": ("ppvd-tiny", "pi3-tiny"),
}
PRESET_NAMES = tuple(PRESETS)
OFFICIAL_PRESETS = ("ppd", "ppd-moge", "ppvd")
RUNTIME = ("attn_impl", "scan", "remat", "dtype")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """A DiT config and its encoder's config (``dit.semantics_dim`` = the encoder's width)."""
  dit: ppd.PPDConfig | ppd.PPVDConfig
  semantics: ppd_semantics.SemanticsConfig

  def __post_init__(self):
    video = isinstance(self.dit, ppd.PPVDConfig)
    if video != (self.semantics.kind == "pi3"):
      raise ValueError("PPVD is prompted by Pi3 and PPD by DA-V2 or MoGe-2; got a "
                       f"{'video' if video else 'image'} DiT with a {self.semantics.kind!r} "
                       "encoder")
    if self.dit.semantics_dim != self.semantics.out_dim:
      raise ValueError(f"the DiT takes {self.dit.semantics_dim}-d semantics but the "
                       f"{self.semantics.kind!r} encoder gives {self.semantics.out_dim}-d")

  @property
  def video(self) -> bool:
    return isinstance(self.dit, ppd.PPVDConfig)


def get_config(name: str, **overrides) -> PipelineConfig:
  """The config of preset ``name``; ``overrides``: runtime fields (both parts) or DiT fields."""
  if name not in PRESETS:
    raise ValueError(f"unknown PPD preset {name!r}; expected one of {PRESET_NAMES}")
  dit_name, sem_name = PRESETS[name]
  rt = {k: v for k, v in overrides.items() if k in RUNTIME}
  sem = ppd_semantics.get_config(sem_name, **rt)
  dit_cfg = ppd.get_config(dit_name, **{**overrides, "semantics_dim": sem.out_dim,
                                        "semantics": sem_name})
  return PipelineConfig(dit_cfg, sem)


class PixelPerfectDepth(nnx.Module):
  """``sem_encoder`` + ``dit`` (module docstring). Build with :meth:`from_preset`, or from
  loaded parts with ``PixelPerfectDepth(dit, sem_encoder)``."""

  def __init__(self, dit: ppd.PPD | ppd.PPVD, sem_encoder: nnx.Module):
    self.cfg = PipelineConfig(dit.cfg, sem_encoder.cfg)
    self.dit = dit
    self.sem_encoder = sem_encoder

  @classmethod
  def from_preset(cls, name: str, *, rngs: nnx.Rngs, **overrides) -> "PixelPerfectDepth":
    return cls.from_config(get_config(name, **overrides), rngs=rngs)

  @classmethod
  def from_config(cls, cfg: PipelineConfig, *, rngs: nnx.Rngs) -> "PixelPerfectDepth":
    return create(lambda r: cls(ppd.build(cfg.dit, rngs=r),
                                ppd_semantics.build(cfg.semantics, rngs=r)), rngs)

  @property
  def video(self) -> bool:
    return self.cfg.video

  def semantics(self, images: jax.Array) -> jax.Array:
    """The frozen prompt ``(N, (H/16)(W/16), S)`` of RGB ``(N, H, W, 3)`` in [0, 1] (no
    gradient flows into the encoder). For PPVD ``images`` is one window of frames."""
    return jax.lax.stop_gradient(self.sem_encoder(images))


def depth(model: PixelPerfectDepth, images: jax.Array, noise: jax.Array, *, steps: int = 4
          ) -> jax.Array:
  """Affine-normalised depth ``(B, H, W)`` (final latent + 0.5) of images ``(B, H, W, 3)`` in
  [0, 1] (sides multiples of 16), averaged over the seeds of ``noise`` ``(E, B, H, W)`` (the
  ensemble; ``E = 1`` is the official single sample). Semantics are computed once per image;
  the ``E * B`` samples run as one batch through the compiled sampler."""
  if model.video:
    raise ValueError("depth() runs the image model; PPVD videos go through "
                     "geojax.models.ppd.infer_video")
  if getattr(noise, "ndim", 0) != 4 or tuple(noise.shape[1:]) != tuple(images.shape[:3]):
    raise ValueError(f"noise must be (E, B, H, W) = (seeds, *images.shape[:3]) = "
                     f"(E, {', '.join(map(str, images.shape[:3]))}); got "
                     f"{tuple(getattr(noise, 'shape', ()))}")
  e = noise.shape[0]
  sem = model.semantics(images)
  tile = lambda a: jnp.broadcast_to(a[None], (e, *a.shape)).reshape(-1, *a.shape[1:])
  out = ppd.sample(model.dit, tile(images), tile(sem), steps=steps,
                   noise=noise.reshape(-1, *noise.shape[2:]))
  return out.reshape(e, *images.shape[:3]).mean(0)
