"""Pixel-Perfect Depth (PPD): flow-matching depth diffusion directly in pixel space.

``gangweix/pixel-perfect-depth`` (``ppd/models/dit.py``; reference ``ppd.md`` sections 0-3):

* **Input** ``x`` ``(B, H, W, 4)`` = [noisy depth latent, image - 0.5] (RGB in [0, 1]), H and W
  multiples of 16; a 16 x 16 stride-16 patch embedding gives ``(H/16)(W/16)`` tokens, no
  absolute position embedding.
* **Conditioning** ``c`` from the raw integer timestep (:class:`geojax.nn.dit.TimestepEmbedder`);
  every block is an adaLN-Zero DiT block with 2D RoPE (base 100, positions from 0).
* **Cascade**: the first ``depth/2`` blocks run on the 16-pixel grid; then the tokens, concatenated
  with the L2-normalised semantic prompt of a frozen encoder ``(B, (H/16)(W/16), S)``, go
  through ``proj_fusion`` (three linears with SiLU, to ``4 D``) and split into 2 x 2 tokens of
  the 8-pixel grid (:func:`geojax.nn.dit.cascade_split`), where the other blocks run.
* **Output**: the final adaLN layer and unpatchify give the velocity ``(B, H, W, 1)``.

:func:`sample` runs the Euler sampler (:mod:`geojax.diffusion.flow`) in one ``lax.scan``; depth
= final latent + 0.5, an affine-normalised log-depth.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geojax.diffusion import flow
from geojax.nn import dit, layers, rope
from geojax.nn.stack import LayerStack
from geojax.nn.vit import PatchEmbed
from geojax.parallel.sharding import create

GRID = 16  # pixels per stage-1 token (the semantic prompt's grid)


@dataclasses.dataclass(frozen=True)
class PPDConfig:
  """One PPD DiT (defaults = the released ``DiT()``: width 1024, 24 blocks, 16 heads, patch 8).

  ``semantics``: the frozen encoder whose prompt the DiT was trained with (``"da2"``: DA-V2
  ViT-L, ``"moge2"``: MoGe-2's encoder; informative, the DiT only sees its
  ``semantics_dim``-wide tokens). Runtime: ``attn_impl``, ``remat``, ``scan``, ``dtype``."""
  dim: int = 1024
  depth: int = 24
  num_heads: int = 16
  patch: int = 8
  mlp_ratio: float = 4.0
  in_channels: int = 4
  out_channels: int = 1
  semantics_dim: int = 1024
  semantics: str = "da2"
  attn_impl: str = "xla"
  remat: str = "none"
  scan: bool = True
  dtype: Any = None

  def __post_init__(self):
    if self.patch * 2 != GRID:
      raise ValueError(f"the cascade runs a 16-pixel then an 8-pixel grid: patch must be 8; "
                       f"got {self.patch}")
    if self.depth < 2 or self.depth % 2:
      raise ValueError(f"depth must be an even number >= 2 (two cascade stages); got {self.depth}")


@dataclasses.dataclass(frozen=True)
class PPVDConfig:
  """The PPVD video DiT (defaults = the released ``DiT_Video()``; reference ``ppd.md`` §5).

  Frames are ``size x size`` (512: the fixed 32 x 32 sin-cos position table); semantics are
  ``semantics_dim``-wide Pi3 tokens. From block ``ref_start`` on, the pooled stage-2 tokens of
  frames ``0 .. ref_frames - 1`` (``ref_pool x ref_pool`` average) are appended to every frame
  for the block and dropped after it; the last ``temporal_depth`` blocks are each preceded by a
  temporal block (attention across frames per token)."""
  dim: int = 1024
  depth: int = 24
  num_heads: int = 16
  patch: int = 8
  mlp_ratio: float = 4.0
  in_channels: int = 4
  out_channels: int = 1
  semantics_dim: int = 2048
  semantics: str = "pi3"
  size: int = 512
  temporal_depth: int = 3
  ref_start: int = 18
  ref_frames: int = 3
  ref_pool: int = 4
  attn_impl: str = "xla"
  remat: str = "none"
  scan: bool = True
  dtype: Any = None

  def __post_init__(self):
    if self.patch * 2 != GRID or self.size % GRID:
      raise ValueError(f"patch must be 8 and size a multiple of 16; got {self.patch}, "
                       f"{self.size}")
    half = self.depth // 2
    if self.depth % 2 or not half <= self.ref_start <= self.depth - self.temporal_depth:
      raise ValueError(f"PPVD needs an even depth with the cascade ({half}) <= ref_start "
                       f"({self.ref_start}) <= depth - temporal_depth "
                       f"({self.depth - self.temporal_depth})")
    if (self.size // self.patch) % self.ref_pool:
      raise ValueError(f"ref_pool {self.ref_pool} does not divide the {self.size // self.patch}"
                       "-token stage-2 grid")


PRESETS: dict[str, PPDConfig | PPVDConfig] = {
    "ppd": PPDConfig(),
    "ppd-moge": PPDConfig(semantics="moge2"),
    # geojax-only (no official weights): the parity fixture's sizes, for CPU demos and tests.
    "ppd-tiny": PPDConfig(dim=32, depth=4, num_heads=2),
    # geojax-only: wide enough to carry a 16 x 16 patch's noise through the DiT (a pixel-space
    # diffusion model needs width >= pixels per token), small enough to train on a CPU.
    "ppd-small": PPDConfig(dim=256, depth=4, num_heads=4),
    "ppvd": PPVDConfig(),
    # geojax-only: the video fixture's width (depth and frame size are fixed by the design).
    "ppvd-tiny": PPVDConfig(dim=16, num_heads=2),
}
PRESET_NAMES = tuple(PRESETS)
OFFICIAL_PRESETS = ("ppd", "ppd-moge", "ppvd")


def get_config(name: str, **overrides) -> PPDConfig | PPVDConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown PPD preset {name!r}; expected one of {PRESET_NAMES}")
  return dataclasses.replace(PRESETS[name], **overrides)


def _timestep(t, batch: int) -> jax.Array:
  """A scalar (one timestep for the batch, conditioning ``(1, D)``) or ``(B,)`` timesteps."""
  t = jnp.asarray(t)
  if t.ndim == 0:
    return t[None]
  if t.shape != (batch,):
    raise ValueError(f"t must be a scalar or have shape ({batch},); got {tuple(t.shape)}")
  return t


class _CascadeDiT(nnx.Module):
  """What the image and video DiTs share: the 16-pixel patch embedding, the timestep
  embedder, ``depth`` adaLN-Zero blocks, the semantic fusion MLP and the final layer."""

  def __init__(self, cfg: PPDConfig | PPVDConfig, *, rngs: nnx.Rngs):
    c = cfg
    self.cfg = cfg
    self.x_embedder = PatchEmbed(GRID, c.dim, rngs=rngs, in_chans=c.in_channels, dtype=c.dtype)
    self.t_embedder = dit.TimestepEmbedder(c.dim, rngs=rngs, dtype=c.dtype)
    self.blocks = LayerStack(self._block, c.depth, rngs=rngs, scan=c.scan, remat=c.remat)
    self.proj_fusion_0 = layers.linear(c.dim + c.semantics_dim, 4 * c.dim, rngs=rngs,
                                       dtype=c.dtype)
    self.proj_fusion_2 = layers.linear(4 * c.dim, 4 * c.dim, rngs=rngs, dtype=c.dtype,
                                       axes=("mlp", None))
    self.proj_fusion_4 = layers.linear(4 * c.dim, 4 * c.dim, rngs=rngs, dtype=c.dtype,
                                       axes=("mlp", "embed"))
    self.final_layer = dit.FinalLayer(c.dim, c.patch, c.out_channels, rngs=rngs, dtype=c.dtype)

  def _block(self, rngs: nnx.Rngs) -> dit.DiTBlock:
    c = self.cfg
    return dit.DiTBlock(c.dim, c.num_heads, rngs=rngs, mlp_ratio=c.mlp_ratio,
                        attn_impl=c.attn_impl, dtype=c.dtype)

  def fuse(self, x: jax.Array, semantics: jax.Array) -> jax.Array:
    """``proj_fusion`` on ``[x, semantics / ||semantics||]`` -> ``(B, T, 4 D)``."""
    s = semantics.astype(jnp.float32)
    s = s / jnp.maximum(jnp.linalg.norm(s, axis=-1, keepdims=True), 1e-12)
    h = jnp.concatenate([x, s.astype(x.dtype)], -1)
    h = jax.nn.silu(self.proj_fusion_0(h))
    h = jax.nn.silu(self.proj_fusion_2(h))
    return self.proj_fusion_4(h)


class PPD(_CascadeDiT):
  """The PPD image DiT (module docstring). Build with :meth:`from_preset`."""

  @classmethod
  def from_preset(cls, name: str, *, rngs: nnx.Rngs, **overrides) -> "PPD":
    """Randomly initialised model for a preset (``"ppd"``: the released DA-V2 variant)."""
    return cls.from_config(get_config(name, **overrides), rngs=rngs)

  @classmethod
  def from_config(cls, cfg: PPDConfig, *, rngs: nnx.Rngs) -> "PPD":
    if not isinstance(cfg, PPDConfig):
      raise ValueError("PPD is built from a PPDConfig (an image preset such as 'ppd'); video "
                       "presets build PPVD")
    return create(lambda r: cls(cfg, rngs=r), rngs)

  def __call__(self, x: jax.Array, semantics: jax.Array, t, *, intermediates: bool = False):
    """Velocity ``(B, H, W, out_channels)`` of ``x`` ``(B, H, W, 4)`` with ``semantics``
    ``(B, (H/16)(W/16), semantics_dim)`` at timestep(s) ``t`` (a scalar or ``(B,)``, raw
    integers in [0, 1000]). ``intermediates=True`` also returns a dict of the embeddings,
    every block's output and the fusion output (blocks run one at a time)."""
    c = self.cfg
    b, hh, ww = _check_call(x, semantics, c)
    h, w = hh // GRID, ww // GRID
    cond = self.t_embedder(_timestep(t, b))
    tok = self.x_embedder(x)
    pos = (jnp.asarray(rope.grid_positions(h, w))[None],
           jnp.asarray(rope.grid_positions(2 * h, 2 * w))[None])
    aux: dict[str, Any] = {"x_embed": tok, "t_emb": cond} if intermediates else {}
    half = c.depth // 2
    for stage, (start, stop) in enumerate(((0, half), (half, c.depth))):
      if stage == 1:
        fused = self.fuse(tok, semantics)
        tok = dit.cascade_split(fused, h, w)
        if intermediates:
          aux.update(proj_fusion=fused, stage2_in=tok)
      p = pos[stage]
      if intermediates:
        for i in range(start, stop):
          tok = self.blocks.run(tok, lambda z, blk: blk(z, cond, p), i, i + 1)
          aux[f"block{i}"] = tok
      else:
        tok = self.blocks.run(tok, lambda z, blk: blk(z, cond, p), start, stop)
    out = self.final_layer(tok, cond)
    if intermediates:
      aux["final_layer"] = out
    v = dit.unpatchify(out, 2 * h, 2 * w, c.patch).astype(jnp.float32)
    return (v, aux) if intermediates else v


class PPVD(_CascadeDiT):
  """The PPVD video DiT (:class:`PPVDConfig`). Build with :meth:`from_preset`.

  ``model(x, semantics, t)``: the frames of one window ``x`` ``(N, size, size, 4)`` (N >=
  ``ref_frames``; frames 0-2 are the reference frames), Pi3 semantics ``(N, (size/16)^2,
  semantics_dim)`` and one scalar timestep -> velocities ``(N, size, size, 1)``. The fixed
  sin-cos table (:func:`geojax.nn.dit.sincos_2d_table`, the official frozen ``pos_embed``) is
  added to the stage-1 tokens; there is no RoPE."""

  def __init__(self, cfg: PPVDConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.temporal_blocks = LayerStack(self._block, cfg.temporal_depth, rngs=rngs, scan=cfg.scan,
                                      remat=cfg.remat)

  @classmethod
  def from_preset(cls, name: str, *, rngs: nnx.Rngs, **overrides) -> "PPVD":
    """Randomly initialised model for a video preset (``"ppvd"``: the released one)."""
    return cls.from_config(get_config(name, **overrides), rngs=rngs)

  @classmethod
  def from_config(cls, cfg: PPVDConfig, *, rngs: nnx.Rngs) -> "PPVD":
    if not isinstance(cfg, PPVDConfig):
      raise ValueError("PPVD is built from a PPVDConfig (a video preset such as 'ppvd')")
    return create(lambda r: cls(cfg, rngs=r), rngs)

  def pos_embed(self) -> np.ndarray:
    """The fixed ``(1, (size/16)^2, dim)`` table (the official ``pos_embed`` buffer)."""
    return video_pos_embed(self.cfg)

  def _refs(self, tok: jax.Array, g: int) -> jax.Array:
    """The pooled tokens of the reference frames, tiled over the window: ``(N, R*(g/k)^2, D)``."""
    c = self.cfg
    n, _, d = tok.shape
    k = c.ref_pool
    r = tok[:c.ref_frames].reshape(c.ref_frames, g // k, k, g // k, k, d)
    r = r.astype(jnp.float32).mean((2, 4)).astype(tok.dtype)
    r = r.reshape(1, c.ref_frames * (g // k) ** 2, d)
    return jnp.broadcast_to(r, (n,) + r.shape[1:])

  def __call__(self, x: jax.Array, semantics: jax.Array, t, *, intermediates: bool = False):
    """Velocities ``(N, size, size, out_channels)`` (class docstring). ``intermediates=True``
    also returns the embeddings, block outputs, the fusion output, the appended reference
    tokens of block ``ref_start`` and the temporal blocks' outputs (token-major)."""
    c = self.cfg
    n = _check_video_call(x, semantics, t, c)
    g1 = c.size // GRID
    g2 = 2 * g1
    cond = self.t_embedder(jnp.asarray(t)[None])
    emb = self.x_embedder(x)
    tok = emb + jnp.asarray(self.pos_embed(), emb.dtype)
    aux: dict[str, Any] = {"x_embed": emb, "t_emb": cond} if intermediates else {}
    plain = lambda z, blk: blk(z, cond)
    half = c.depth // 2
    first_temporal = c.depth - c.temporal_depth
    if intermediates:
      for i in range(half):
        tok = self.blocks.run(tok, plain, i, i + 1)
        aux[f"block{i}"] = tok
    else:
      tok = self.blocks.run(tok, plain, 0, half)
    fused = self.fuse(tok, semantics)
    tok = dit.cascade_split(fused, g1, g1)
    if intermediates:
      aux["proj_fusion"] = fused
      for i in range(half, c.ref_start):
        tok = self.blocks.run(tok, plain, i, i + 1)
        aux[f"block{i}"] = tok
    else:
      tok = self.blocks.run(tok, plain, half, c.ref_start)
    length = g2 * g2
    for i in range(c.ref_start, c.depth):
      if i >= first_temporal:
        j = i - first_temporal
        tok = self.temporal_blocks.run(tok.transpose(1, 0, 2), plain, j, j + 1)
        if intermediates:
          aux[f"temporal{j}"] = tok
        tok = tok.transpose(1, 0, 2)
      tok = jnp.concatenate([tok, self._refs(tok, g2)], 1)
      tok = self.blocks.run(tok, plain, i, i + 1)
      if intermediates:
        aux[f"block{i}"] = tok[:, :length]
        aux[f"block{i}_refs"] = tok[:, length:]
      tok = tok[:, :length]
    out = self.final_layer(tok, cond)
    v = dit.unpatchify(out, g2, g2, c.patch).astype(jnp.float32)
    return (v, aux) if intermediates else v


def video_pos_embed(cfg: PPVDConfig) -> np.ndarray:
  """The video DiT's fixed ``(1, (size/16)^2, dim)`` sin-cos table (x first)."""
  return dit.sincos_2d_table(cfg.dim, cfg.size // GRID)[None]


def build(cfg: PPDConfig | PPVDConfig, *, rngs: nnx.Rngs) -> PPD | PPVD:
  """The image DiT for a :class:`PPDConfig`, the video DiT for a :class:`PPVDConfig`."""
  return (PPVD if isinstance(cfg, PPVDConfig) else PPD).from_config(cfg, rngs=rngs)


def _check_video_call(x, semantics, t, cfg: PPVDConfig) -> int:
  shape = getattr(x, "shape", None)
  want = (cfg.size, cfg.size, cfg.in_channels)
  if shape is None or len(shape) != 4 or tuple(shape[1:]) != want:
    raise ValueError(f"x must be (N, {cfg.size}, {cfg.size}, {cfg.in_channels}) = [latent, "
                     f"frame - 0.5] (frames resized to {cfg.size} x {cfg.size}); got "
                     f"{None if shape is None else tuple(shape)}")
  n = shape[0]
  if n < cfg.ref_frames:
    raise ValueError(f"x: a PPVD window needs at least {cfg.ref_frames} frames (the reference "
                     f"frames); got {n}")
  sem = (n, (cfg.size // GRID) ** 2, cfg.semantics_dim)
  if tuple(getattr(semantics, "shape", ())) != sem:
    raise ValueError(f"semantics must be {sem} (Pi3 tokens per frame); got "
                     f"{tuple(getattr(semantics, 'shape', ()))}")
  if jnp.ndim(t) != 0:
    raise ValueError(f"t: the video DiT takes one scalar timestep per window; got shape "
                     f"{tuple(jnp.shape(t))}")
  return n


def _check_call(x, semantics, cfg: PPDConfig) -> tuple[int, int, int]:
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) != 4 or shape[-1] != cfg.in_channels:
    raise ValueError(f"x must be (B, H, W, {cfg.in_channels}) = [latent, image - 0.5]; got "
                     f"{None if shape is None else tuple(shape)}")
  b, hh, ww, _ = shape
  if hh % GRID or ww % GRID or hh == 0 or ww == 0:
    raise ValueError(f"x: height and width must be positive multiples of {GRID}; got {hh} x "
                     f"{ww} (resize the image first, e.g. geojax.models.ppd.process_size)")
  want = (b, (hh // GRID) * (ww // GRID), cfg.semantics_dim)
  if tuple(getattr(semantics, "shape", ())) != want:
    raise ValueError(f"semantics must be {want} (one {cfg.semantics_dim}-d token per 16 x 16 "
                     f"patch); got {tuple(getattr(semantics, 'shape', ()))}")
  return b, hh, ww


def process_size(h: int, w: int, area: int = 1024 * 768) -> tuple[int, int]:
  """The official inference size of an ``h x w`` image: the area of ``area`` at the same aspect
  ratio, each side ``max(16, round(side / 16) * 16)`` (Python ``round``: half to even)."""
  scale = (area / (h * w)) ** 0.5
  return (max(GRID, int(round(h * scale / GRID)) * GRID),
          max(GRID, int(round(w * scale / GRID)) * GRID))


def sample(model: PPD, image: jax.Array, semantics: jax.Array, *, steps: int = 4,
           noise: jax.Array, return_trajectory: bool = False):
  """Depth ``(B, H, W)`` (final latent + 0.5) of images ``(B, H, W, 3)`` in [0, 1] from the
  initial ``noise`` ``(B, H, W)`` with the official Euler sampler (``steps`` timesteps, one
  scalar timestep per step). The loop is one ``lax.scan`` (traceable: wrap in ``nnx.jit`` to
  compile the whole sampler once). ``model`` is a :class:`PPD` (a batch of images, or one
  image under several noise seeds) or a :class:`PPVD` (``B`` = the frames of one window).
  ``return_trajectory=True`` also returns the velocities and latents of every step
  ``(steps, B, H, W)``."""
  layers.check_image_batch(image, "image", multiple=GRID, ndim=4)
  b, h, w, _ = image.shape
  if tuple(noise.shape) != (b, h, w):
    raise ValueError(f"noise must be ({b}, {h}, {w}) (one latent per image); got "
                     f"{tuple(noise.shape)}")
  ts, nxt = sampling_tables(steps)
  cond = image.astype(jnp.float32) - 0.5

  def step(latent, tt):
    t, s = tt
    v = model(jnp.concatenate([latent[..., None], cond], -1), semantics, t)[..., 0]
    new = flow.euler_step(v, latent, t, s)
    return new, (v, new)

  latent, (vs, lats) = jax.lax.scan(step, jnp.asarray(noise, jnp.float32),
                                    (jnp.asarray(ts), jnp.asarray(nxt)))
  depth = latent + 0.5
  return (depth, {"velocities": vs, "latents": lats}) if return_trajectory else depth


# ------------------------------------------------------------------------- PPVD windows

WINDOW = 16  # frames per PPVD window (official INFER_LEN)
KEYFRAMES = (0, 8, 15)  # frames of the previous window that open the next one
OVERLAP = len(KEYFRAMES)
STRIDE = WINDOW - OVERLAP  # 13


def video_windows(length: int) -> tuple[int, list[np.ndarray]]:
  """The official window plan of a ``length``-frame video: ``(padded length, windows)``, each
  window ``(16,)`` indices into the padded video (padding repeats the last frame so that
  ``(padded - 16) % 13 == 0``; a video shorter than a window is padded to 16). From the second
  window on, its first 3 frames are frames 0, 8 and 15 of the previous window's input, so
  frame 0 of every window is the video's first frame."""
  if length < 1:
    raise ValueError(f"a video needs at least one frame; got {length}")
  # the official (length - 16) % 13 rule; shorter videos (where it breaks below 4 frames)
  # are padded to one window
  padded = max(WINDOW, length + (-(length - WINDOW)) % STRIDE)
  wins, prev = [], None
  for start in range(0, padded - WINDOW + 1, STRIDE):
    idx = np.minimum(np.arange(start, start + WINDOW), length - 1)
    if prev is not None:
      idx[:OVERLAP] = prev[list(KEYFRAMES)]
    wins.append(idx)
    prev = idx
  return padded, wins


def lstsq_scale_shift_all(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
  """The official closed-form least-squares ``(scale, shift)`` of ``pred`` onto ``target``
  over all pixels (float32 sums; ``(1, 0)`` when the system is singular)."""
  p, t = pred.astype(np.float32), target.astype(np.float32)
  a00, a01, a11 = np.sum(p * p), np.sum(p), np.float32(p.size)
  b0, b1 = np.sum(p * t), np.sum(t)
  det = a00 * a11 - a01 * a01
  if det == 0:
    return 1.0, 0.0
  return float((a11 * b0 - a01 * b1) / det), float((-a01 * b0 + a00 * b1) / det)


def align_video_windows(preds: list[np.ndarray]) -> np.ndarray:
  """Window predictions ``[(16, H, W)]`` -> one aligned sequence ``(16 + 13 (n - 1), H, W)``:
  window 0 whole; window ``i`` scaled and shifted (:func:`lstsq_scale_shift_all`) so that its
  first 3 frames match [window 0's frame 0, the previous aligned window's frames 8 and 15],
  then its frames 3..15 appended (the official ``align_video_depth``)."""
  out = list(np.asarray(preds[0], np.float32))
  ref = [np.asarray(preds[0][k], np.float32) for k in KEYFRAMES]
  for p in preds[1:]:
    p = np.asarray(p, np.float32)
    scale, shift = lstsq_scale_shift_all(np.concatenate(p[:OVERLAP]), np.concatenate(ref))
    new = p * np.float32(scale) + np.float32(shift)
    out.extend(new[OVERLAP:])
    ref = ref[:1] + [new[k] for k in KEYFRAMES[1:]]
  return np.stack(out)


def infer_video(model: PPVD, frames: np.ndarray, semantics_fn, *, steps: int = 4,
                noise: np.ndarray, sampler=None) -> np.ndarray:
  """Depth ``(L, H, W)`` of a video ``frames`` ``(L, H, W, 3)`` in [0, 1], as the official
  ``infer_video``: frames resized (bilinear) to ``size x size``, padded and cut into windows
  (:func:`video_windows`), each window's semantics from ``semantics_fn(window (16, size, size,
  3)) -> (16, (size/16)^2, semantics_dim)`` and its depth sampled from the **same** initial
  ``noise`` ``(16, size, size)``; predictions resized back, aligned across windows
  (:func:`align_video_windows`) and trimmed to ``L``. ``sampler``: a compiled
  ``f(model, window, semantics, noise)`` (default: :func:`sample` under ``nnx.jit``)."""
  from geojax.nn import resize
  frames = np.asarray(frames, np.float32)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"frames must be (L, H, W, 3) RGB in [0, 1]; got {frames.shape}")
  size = model.cfg.size
  if tuple(np.shape(noise)) != (WINDOW, size, size):
    raise ValueError(f"noise must be ({WINDOW}, {size}, {size}) (one latent per window frame, "
                     f"shared by every window); got {tuple(np.shape(noise))}")
  length, h, w = frames.shape[:3]
  small = np.asarray(resize.resize_bilinear(jnp.asarray(frames), (size, size)))
  if sampler is None:
    sampler = nnx.jit(lambda m, x, s, n: sample(m, x, s, steps=steps, noise=n))
  _, wins = video_windows(length)
  preds = []
  for idx in wins:
    window = small[idx]
    depth = sampler(model, jnp.asarray(window), semantics_fn(window), jnp.asarray(noise))
    preds.append(np.asarray(resize.resize_bilinear(jnp.asarray(depth)[..., None], (h, w))
                            )[..., 0])
  return align_video_windows(preds)[:length]


def sampling_tables(steps: int) -> tuple[np.ndarray, np.ndarray]:
  """The Euler sampler's ``(timesteps, next timesteps)`` (:func:`geojax.diffusion.flow
  .sampling_timesteps` with ``T = 1000``)."""
  return flow.sampling_timesteps(steps, flow.T)
