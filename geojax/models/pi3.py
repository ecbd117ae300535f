"""Pi3: permutation-equivariant multi-view geometry (``yyfz/Pi3``), from the shared Pi3 blocks.

``Pi3(images)`` with ``images`` ``(B, N, H, W, 3)`` RGB in [0, 1], ``H`` and ``W`` multiples of
14:

* a DINOv2 ViT-L/14 encoder with 4 registers (position embedding resized by antialiased
  bicubic, size-based) gives normalised patch tokens per frame;
* 5 shared register tokens are prepended and a 36-block
  :class:`~geojax.nn.pi3.AlternatingDecoder` (even blocks within a frame, odd blocks across
  frames, 2D RoPE on real positions) returns ``[frame || global]`` features (2048-d);
* three 5-block :class:`~geojax.nn.pi3.TransformerDecoder` s read them: points and confidence
  (each through a :class:`~geojax.nn.pi3.LinearPts3d` pixel-shuffle head) and cameras
  (:class:`~geojax.nn.pi3.CameraHead`, 9-D rotation projected by SVD).

Outputs (the official conventions, computed in float32): ``local_points`` ``(B, N, H, W, 3)`` in
each camera's frame (OpenCV axes), remapped ``(x * exp(z), y * exp(z), exp(z))``; ``conf``
``(B, N, H, W)`` logits; ``camera_poses`` ``(B, N, 4, 4)`` camera-to-world; ``points`` the world
points ``camera_poses @ [local_points, 1]``. Units are relative (no metric scale). There is no
reference view: the outputs are equivariant to a permutation of the frames.

DAGE's low-resolution stream is this trunk (``geojax.models.dage``); Pi3 is also DAGE's
stage-1 distillation teacher (``tap`` returns a decoder block's tokens).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from geojax.nn import pi3, resize
from geojax.nn.vit import DinoV2
from geojax.parallel.sharding import create

PATCH = 14
PIXEL_LIMIT = 255_000  # the official loader's pixel budget


@dataclasses.dataclass(frozen=True)
class Pi3Config:
  """One Pi3 network (defaults = the released ``yyfz233/Pi3``: ``decoder_size="large"``).

  ``enc_*``: DINOv2-reg encoder; ``dec_*``: alternating decoder with ``num_registers``
  registers; ``head_*``: the point and confidence decoders (projecting to ``point_out``);
  ``cam_*``: the camera decoder (projecting to ``cam_out``, the camera head's width).
  Runtime: ``attn_impl`` (the global blocks see ``N * (5 + h*w)`` tokens: ``"chunked"`` for
  long videos on CPU/TPU, ``"cudnn"`` on GPU), ``remat``, ``scan``, ``dtype``."""
  enc_dim: int = 1024
  enc_depth: int = 24
  enc_heads: int = 16
  dec_dim: int = 1024
  dec_depth: int = 36
  dec_heads: int = 16
  num_registers: int = 5
  head_dim: int = 1024
  head_depth: int = 5
  head_heads: int = 16
  point_out: int = 1024
  cam_dim: int = 1024
  cam_depth: int = 5
  cam_heads: int = 16
  cam_out: int = 512
  attn_impl: str = "xla"
  remat: str = "none"
  scan: bool = True
  dtype: Any = None

  def __post_init__(self):
    if self.enc_dim != self.dec_dim:
      raise ValueError(f"Pi3: enc_dim ({self.enc_dim}) must equal dec_dim ({self.dec_dim})")


# The official ``decoder_size`` variants share the encoder and heads; only "large" has weights.
PRESETS: dict[str, Pi3Config] = {
    "pi3": Pi3Config(),
    # geojax-only (no official weights): toy widths for CPU demos, tests and as a toy teacher.
    "pi3-tiny": Pi3Config(enc_dim=64, enc_depth=4, enc_heads=4, dec_dim=64, dec_depth=4,
                          dec_heads=4, head_dim=32, head_depth=1, head_heads=2, point_out=32,
                          cam_dim=32, cam_depth=1, cam_heads=2, cam_out=32),
}
PRESET_NAMES = tuple(PRESETS)
OFFICIAL_PRESETS = ("pi3",)


def get_config(name: str, **overrides) -> Pi3Config:
  if name not in PRESETS:
    raise ValueError(f"unknown Pi3 preset {name!r}; expected one of {PRESET_NAMES}")
  return dataclasses.replace(PRESETS[name], **overrides)


def pixel_limit_size(h: int, w: int, limit: int = PIXEL_LIMIT) -> tuple[int, int]:
  """The official loader's input size for an ``h x w`` image: scaled to about ``limit`` pixels
  (up or down), sides rounded to multiples of 14, then shrunk one patch at a time on the side
  that keeps the aspect ratio closest until ``H * W <= limit``."""
  if h < 1 or w < 1 or limit < PATCH * PATCH:
    raise ValueError(f"pixel_limit_size needs a non-empty image and a limit of at least "
                     f"{PATCH * PATCH} pixels; got {w}x{h}, limit {limit}")
  scale = math.sqrt(limit / (w * h))
  wt, ht = w * scale, h * scale
  k, m = round(wt / PATCH), round(ht / PATCH)
  while (k * PATCH) * (m * PATCH) > limit:
    if k / m > wt / ht:
      k -= 1
    else:
      m -= 1
  return max(1, m) * PATCH, max(1, k) * PATCH


class Pi3(nnx.Module):
  """The Pi3 network (module docstring). Build with :meth:`from_preset`."""

  def __init__(self, cfg: Pi3Config, *, rngs: nnx.Rngs):
    c = cfg
    self.cfg = cfg
    rt = dict(attn_impl=c.attn_impl, scan=c.scan, remat=c.remat, dtype=c.dtype)
    self.encoder = DinoV2(dim=c.enc_dim, depth=c.enc_depth, num_heads=c.enc_heads, rngs=rngs,
                          num_registers=4, pos_resize="antialias", **rt)
    self.register_token = nnx.Param(
        jax.random.normal(rngs.params(), (1, 1, c.num_registers, c.dec_dim)) * 1e-6)
    self.decoder = pi3.AlternatingDecoder(dim=c.dec_dim, depth=c.dec_depth,
                                          num_heads=c.dec_heads, rngs=rngs, **rt)
    head = dict(in_dim=2 * c.dec_dim, dim=c.head_dim, depth=c.head_depth,
                num_heads=c.head_heads, rngs=rngs, **rt)
    cam = dict(in_dim=2 * c.dec_dim, dim=c.cam_dim, depth=c.cam_depth, num_heads=c.cam_heads,
               rngs=rngs, **rt)
    self.point_decoder = pi3.TransformerDecoder(out_dim=c.point_out, **head)
    self.point_head = pi3.LinearPts3d(PATCH, c.point_out, 3, rngs=rngs)
    self.conf_decoder = pi3.TransformerDecoder(out_dim=c.point_out, **head)
    self.conf_head = pi3.LinearPts3d(PATCH, c.point_out, 1, rngs=rngs)
    self.camera_decoder = pi3.TransformerDecoder(out_dim=c.cam_out, **cam)
    self.camera_head = pi3.CameraHead(c.cam_out, rngs=rngs)

  @classmethod
  def from_preset(cls, name: str, *, rngs: nnx.Rngs, **overrides) -> "Pi3":
    """Randomly initialised model for a preset (``"pi3"``: the released configuration)."""
    return cls.from_config(get_config(name, **overrides), rngs=rngs)

  @classmethod
  def from_config(cls, cfg: Pi3Config, *, rngs: nnx.Rngs) -> "Pi3":
    return create(lambda r: cls(cfg, rngs=r), rngs)

  def __call__(self, images: jax.Array, *, tap: int | None = None,
               out_hw: tuple[int, int] | None = None,
               collect: list | None = None) -> dict[str, jax.Array]:
    """Run Pi3 (module docstring for the conventions).

    ``tap``: also return ``features`` ``(B, N * (R + h*w), C)``, the output of decoder block
    ``tap`` in the global-attention layout (DAGE's distillation target is block
    ``dec_depth - 3``). ``out_hw``: resize the raw point and confidence maps (bilinear, no
    antialias) to ``out_hw`` before the ``exp`` remap, as DAGE's Pi3 teacher does to meet the
    student's resolution. ``collect`` (a list): every decoder block's output (parity tests)."""
    shape = getattr(images, "shape", None)
    if shape is None or len(shape) != 5 or shape[-1] != 3:
      raise ValueError("Pi3 images must be a float array (B, N, H, W, 3) of RGB in [0, 1] "
                       f"(channels last); got {None if shape is None else tuple(shape)}")
    b, n, h, w, _ = shape
    if min(b, n, h, w) < 1 or h % PATCH or w % PATCH:
      raise ValueError(f"Pi3 images must be non-empty with H and W multiples of {PATCH}; got "
                       f"{w}x{h} (resize with geojax.models.pi3.pixel_limit_size)")
    if tap is not None and not 0 <= int(tap) < self.cfg.dec_depth:
      raise ValueError(f"tap must be a decoder block in [0, {self.cfg.dec_depth}); got {tap}")
    grid = (h // PATCH, w // PATCH)
    r = self.cfg.num_registers
    tokens = pi3.encode_patches(self.encoder, images.reshape(b * n, h, w, 3))
    hidden, tapped = pi3.decode_frames(self.decoder, self.register_token[...], tokens, b, grid,
                                       tap=tap, collect=collect)
    pos = jnp.asarray(pi3.decoder_positions(grid, r))[None]
    point_h = self.point_decoder(hidden, pos)[:, r:].astype(jnp.float32)
    conf_h = self.conf_decoder(hidden, pos)[:, r:].astype(jnp.float32)
    cam_h = self.camera_decoder(hidden, pos)[:, r:].astype(jnp.float32)
    raw = self.point_head(point_h, (h, w))
    raw_conf = self.conf_head(conf_h, (h, w))
    if out_hw is not None:
      raw = resize.resize_bilinear(raw, tuple(out_hw))
      raw_conf = resize.resize_bilinear(raw_conf, tuple(out_hw))
      h, w = out_hw
    z = jnp.exp(raw[..., 2:])
    local = jnp.concatenate([raw[..., :2] * z, z], -1).reshape(b, n, h, w, 3)
    conf = raw_conf[..., 0].reshape(b, n, h, w)
    poses, _ = self.camera_head(cam_h)
    poses = poses.reshape(b, n, 4, 4)
    world = jnp.einsum("bnij,bnhwj->bnhwi", poses[..., :3, :3], local) + poses[
        ..., None, None, :3, 3]
    out = dict(points=world, local_points=local, conf=conf, camera_poses=poses)
    if tap is not None:
      out["features"] = tapped.reshape(b, -1, tapped.shape[-1])
    return out


def infer(model: Pi3, images: jax.Array, *, conf_threshold: float = 0.1,
          focal_iterations: int = 100) -> dict[str, jax.Array]:
  """Pi3 with the post-processing of the official example: ``mask`` =
  ``sigmoid(conf) > conf_threshold`` (0.1), and ``intrinsics`` ``(B, N, 3, 3)`` normalised by
  the image size (``fx / W``, ``fy / H``, principal point 0.5) from MoGe's focal solver on the
  masked local points (:func:`geojax.geometry.alignment.intrinsics_from_points`). Returns
  ``local_points``, ``global_points``, ``camera_poses`` (camera-to-world), ``conf`` logits,
  ``mask``, ``intrinsics``; relative units. (The example's extra depth-normal edge filter of
  the exported cloud is not applied.)"""
  from geojax.geometry.alignment import intrinsics_from_points
  out = model(images)
  mask = jax.nn.sigmoid(out["conf"]) > conf_threshold
  k = intrinsics_from_points(out["local_points"], mask, iterations=focal_iterations)
  return dict(local_points=out["local_points"], global_points=out["points"],
              camera_poses=out["camera_poses"], conf=out["conf"], mask=mask, intrinsics=k)
