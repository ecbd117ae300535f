"""The frozen semantic encoders that prompt PPD / PPVD (reference ``ppd.md`` section 2).

Each takes RGB in [0, 1] ``(N, H, W, 3)`` (``H``, ``W`` multiples of 16) and returns one token
per 16 x 16 pixel patch of the DiT's stage-1 grid, ``(N, (H/16)(W/16), out_dim)``:

* :class:`DAV2Semantics` - the Depth Anything V2 ViT-L encoder (``forward_semantics`` of the
  official ``depth_anything_v2/dpt.py``): ImageNet normalisation, then bicubic (``A = -0.75``,
  ``align_corners=False``, no antialias, size-based) to ``((H/16) 14, (W/16) 14)`` so the 14-pixel
  ViT grid equals the DiT's 16-pixel grid; DINOv2 without registers (scale-factor position
  embedding resize); the normalised patch tokens (1024-d).
* :class:`MoGe2Semantics` - MoGe-2's encoder (``moge/model/v2.py::forward_semantics``) at the
  token grid ``(H/16, W/16)``: the sum of the 1x1 projections of four normalised DINOv2 layers
  (:class:`geojax.nn.moge.DinoV2Encoder`, shared with DAGE's high-resolution stream; 1024-d).
* :class:`Pi3Semantics` - Pi3 over all frames of a PPVD window jointly
  (``pi3.py::forward_semantics``): bilinear (``align_corners=False``) to the 14-pixel grid, the
  encoder, the alternating decoder, the concatenated outputs of its last two blocks without the
  register tokens (2048-d). It holds a whole :class:`geojax.models.pi3.Pi3`, as the official
  model does, so that the released ``pi3.safetensors`` loads unchanged.

Presets: ``da2``, ``moge2``, ``pi3`` (the released encoders) and geojax-only tiny ones
(``da2-tiny``, ``moge2-tiny``, ``pi3-tiny``: random frozen features for CPU demos and tests).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from geojax.models import pi3 as pi3_lib
from geojax.nn import layers, pi3, resize
from geojax.nn.moge import DinoV2Encoder
from geojax.nn.vit import DinoV2
from geojax.parallel.sharding import create

GRID = 16  # DiT pixels per semantic token
VIT_PATCH = 14


@dataclasses.dataclass(frozen=True)
class SemanticsConfig:
  """One frozen encoder: ``kind`` (``"da2"``, ``"moge2"`` or ``"pi3"``), the DINOv2 sizes
  (``dim``, ``depth``, ``heads``; for MoGe-2 also ``taps`` and ``out``), or for Pi3 the Pi3
  preset. Runtime: ``attn_impl``, ``scan``, ``remat``, ``dtype``."""
  kind: str
  dim: int = 1024
  depth: int = 24
  heads: int = 16
  taps: tuple[int, ...] = (5, 11, 17, 23)
  out: int = 1024
  pi3_preset: str = "pi3"
  attn_impl: str = "xla"
  scan: bool = True
  remat: str = "none"
  dtype: Any = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"semantic encoder kind must be one of {KINDS}; got {self.kind!r}")

  @property
  def out_dim(self) -> int:
    """Width of the semantic tokens the DiT receives."""
    if self.kind == "da2":
      return self.dim
    if self.kind == "moge2":
      return self.out
    return 2 * pi3_lib.get_config(self.pi3_preset).dec_dim


KINDS = ("da2", "moge2", "pi3")
PRESETS: dict[str, SemanticsConfig] = {
    "da2": SemanticsConfig("da2"),
    "moge2": SemanticsConfig("moge2"),
    "pi3": SemanticsConfig("pi3"),
    "da2-tiny": SemanticsConfig("da2", dim=64, depth=2, heads=4),
    "moge2-tiny": SemanticsConfig("moge2", dim=64, depth=4, heads=4, taps=(1, 3), out=64),
    "pi3-tiny": SemanticsConfig("pi3", pi3_preset="pi3-tiny"),
}
PRESET_NAMES = tuple(PRESETS)


def get_config(name: str, **overrides) -> SemanticsConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown semantic encoder {name!r}; expected one of {PRESET_NAMES}")
  return dataclasses.replace(PRESETS[name], **overrides)


def _check(images, what: str) -> tuple[int, int, int]:
  shape = getattr(images, "shape", None)
  if shape is None or len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f"{what} images must be (N, H, W, 3) RGB in [0, 1]; got "
                     f"{None if shape is None else tuple(shape)}")
  n, h, w, _ = shape
  if min(n, h, w) < 1 or h % GRID or w % GRID:
    raise ValueError(f"{what} images must be non-empty with H and W multiples of {GRID} (the "
                     f"DiT's token grid); got {w}x{h}")
  return n, h, w


class DAV2Semantics(nnx.Module):
  """Depth Anything V2's DINOv2 encoder as PPD's semantic prompt (module docstring)."""

  def __init__(self, cfg: SemanticsConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.pretrained = DinoV2(dim=cfg.dim, depth=cfg.depth, num_heads=cfg.heads, rngs=rngs,
                             pos_resize="scale_factor", mask_token=True,
                             attn_impl=cfg.attn_impl, scan=cfg.scan, remat=cfg.remat,
                             dtype=cfg.dtype)

  def __call__(self, images: jax.Array) -> jax.Array:
    _, h, w = _check(images, "DA-V2 semantics")
    x = (images.astype(jnp.float32) - layers.IMAGENET_MEAN) / layers.IMAGENET_STD
    x = resize.resize_bicubic(x, ((h // GRID) * VIT_PATCH, (w // GRID) * VIT_PATCH))
    enc = self.pretrained
    t = enc.norm(enc.run_layers(enc.tokens(x), 0, enc.depth))
    return t[:, 1:].astype(jnp.float32)


class MoGe2Semantics(nnx.Module):
  """MoGe-2's encoder as PPD's semantic prompt (module docstring)."""

  def __init__(self, cfg: SemanticsConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = DinoV2Encoder(dim=cfg.dim, depth=cfg.depth, num_heads=cfg.heads,
                                 taps=cfg.taps, dim_out=cfg.out, rngs=rngs,
                                 attn_impl=cfg.attn_impl, scan=cfg.scan, remat=cfg.remat,
                                 dtype=cfg.dtype)

  def __call__(self, images: jax.Array) -> jax.Array:
    _, h, w = _check(images, "MoGe-2 semantics")
    return self.encoder(images, h // GRID, w // GRID)[0].astype(jnp.float32)


class Pi3Semantics(nnx.Module):
  """Pi3 (all frames of a window at once) as PPVD's semantic prompt (module docstring)."""

  def __init__(self, cfg: SemanticsConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.model = pi3_lib.Pi3(pi3_lib.get_config(
        cfg.pi3_preset, attn_impl=cfg.attn_impl, scan=cfg.scan, remat=cfg.remat,
        dtype=cfg.dtype), rngs=rngs)

  def __call__(self, frames: jax.Array) -> jax.Array:
    """``frames`` ``(N, H, W, 3)``: one video window (the frames attend to each other)."""
    n, h, w = _check(frames, "Pi3 semantics")
    grid = (h // GRID, w // GRID)
    x = resize.resize_bilinear(frames.astype(jnp.float32),
                               (grid[0] * VIT_PATCH, grid[1] * VIT_PATCH))
    m = self.model
    tokens = pi3.encode_patches(m.encoder, x)
    hidden, _ = pi3.decode_frames(m.decoder, m.register_token[...], tokens, 1, grid)
    return hidden[:, m.cfg.num_registers:].astype(jnp.float32)


_CLASSES = {"da2": DAV2Semantics, "moge2": MoGe2Semantics, "pi3": Pi3Semantics}


def build(cfg: SemanticsConfig | str, *, rngs: nnx.Rngs, **overrides) -> nnx.Module:
  """A semantic encoder from a config or a preset name."""
  cfg = get_config(cfg, **overrides) if isinstance(cfg, str) else dataclasses.replace(
      cfg, **overrides)
  return create(lambda r: _CLASSES[cfg.kind](cfg, rngs=r), rngs)
