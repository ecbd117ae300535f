"""D4RT: one video encoder and an independent-query decoder for 4D reconstruction (built from
the paper, arXiv 2512.08924; there is no official code, see ``shared/reference/d4rt.md``).

``D4RT(video, queries)``:

* **Encoder** (:class:`VideoEncoder`): a square clip ``(B, T, S, S, 3)`` RGB in [0, 1]
  (ImageNet-normalised inside) is cut into ``2 x 16 x 16`` tubelets, a learned space-time
  position table (resized trilinearly to the clip's grid) is added, and the blocks alternate
  frame-local attention (the ``(S/16)^2`` tokens of one temporal slot; even layers) and global
  attention (every token of the clip plus one aspect-ratio token, ``Linear(log(W / H))`` of
  the original video; odd layers). The output ``F`` ``(B, T/2 * (S/16)^2 + 1, C)`` (final
  LayerNorm; the aspect token last) is the clip's fixed scene representation.
* **Decoder** (:class:`QueryDecoder`): each query ``(u, v, t_src, t_tgt, t_cam)`` becomes one
  token: a Linear of Fourier features of ``(u, v)`` + learned embeddings of ``t_src``, ``t_tgt``
  and ``t_cam`` (one table per role) + an MLP of the ``9 x 9`` RGB patch at ``(u, v)`` in frame
  ``t_src`` (bilinear, from ``frames``: the full-resolution video when given, else the encoder's
  input). Pre-LN cross-attention blocks (keys and values projected from ``C``; no attention
  between queries) and one Linear read out 13 values per query. Queries are independent, so
  any chunking of them gives the same answers (``chunk``), and they split over devices.
* **Outputs** (:func:`readout`): ``points`` (3: the point seen at ``(u, v)`` in frame ``t_src``,
  at time ``t_tgt``, in the camera of frame ``t_cam``), ``uv`` (2: its image position in frame
  ``t_tgt``), ``visibility`` (1, a logit), ``displacement`` (3: its motion from ``t_src`` to
  ``t_tgt`` in the ``t_cam`` frame), ``normal`` (3, unit) and ``confidence`` (1, ``1 +
  exp(raw)``), all in the clip's relative units.

Choices where the paper is silent (reference ``d4rt.md`` section 9 unless stated):
decoder width 1216 = 19 heads x 64 with a 4x MLP (the paper's 144M decoder; the reference's
fallback of 1024 wide gives 108M), 10 Fourier octaves, time tables of ``num_frames`` rows, the
RGB patch ImageNet-normalised like the encoder input, the aspect token only in global layers,
VideoMAE-style blocks (no LayerScale, LayerNorm eps 1e-6, exact GELU).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geojax.nn import layers, queries as qf, video as vid
from geojax.nn.alternating import local_attention
from geojax.nn.cross_attention import CrossOnlyBlock
from geojax.nn.stack import LayerStack, unstack
from geojax.nn.vit import Block, BlockConfig, Mlp
from geojax.parallel.sharding import create, shard_views

OUT_DIM = 13
# (name, first channel, width) of the decoder's read-out
OUTPUTS = (("points", 0, 3), ("uv", 3, 2), ("visibility", 5, 1), ("displacement", 6, 3),
           ("normal", 9, 3), ("confidence", 12, 1))


@dataclasses.dataclass(frozen=True)
class D4RTConfig:
  """One D4RT network (defaults: ``d4rt-g``, the paper's main model).

  ``enc_*``: the video ViT (``tubelet x patch x patch`` tubelets, position table for
  ``num_frames`` frames at ``img_size``^2); ``dec_*``: the query decoder; ``fourier_octaves``
  and ``rgb_patch`` shape the query token; ``num_frames`` is also the number of rows of each
  time table (the longest clip a query can address). Runtime: ``attn_impl``, ``remat``,
  ``scan``, ``dtype``."""
  enc_dim: int = 1408
  enc_depth: int = 40
  enc_heads: int = 16
  enc_mlp_ratio: float = 48 / 11
  tubelet: int = 2
  patch: int = 16
  img_size: int = 256
  num_frames: int = 48
  dec_dim: int = 1216
  dec_depth: int = 8
  dec_heads: int = 19
  dec_mlp_ratio: float = 4.0
  fourier_octaves: int = 10
  rgb_patch: int = 9
  ln_eps: float = 1e-6
  attn_impl: str = "xla"
  remat: str = "none"
  scan: bool = True
  dtype: Any = None

  def __post_init__(self):
    if self.enc_depth < 2 or self.enc_depth % 2:
      raise ValueError(f"enc_depth must be even (local, global pairs); got {self.enc_depth}")
    if self.img_size % self.patch or self.num_frames % self.tubelet:
      raise ValueError(f"img_size {self.img_size} / num_frames {self.num_frames} must be "
                       f"multiples of patch {self.patch} / tubelet {self.tubelet}")

  @property
  def grid(self) -> tuple[int, int, int]:
    """The position table's ``(slots, gh, gw)``."""
    g = self.img_size // self.patch
    return self.num_frames // self.tubelet, g, g


_VIT = dict(tubelet=2, patch=16)
PRESETS: dict[str, D4RTConfig] = {
    "d4rt-g": D4RTConfig(),
    "d4rt-l": D4RTConfig(enc_dim=1024, enc_depth=24, enc_heads=16, enc_mlp_ratio=4.0),
    "d4rt-b": D4RTConfig(enc_dim=768, enc_depth=12, enc_heads=12, enc_mlp_ratio=4.0),
    # geojax-only: CPU-sized, for tests and make demo-d4rt (8-frame clips at 64^2).
    "d4rt-tiny": D4RTConfig(enc_dim=96, enc_depth=4, enc_heads=4, enc_mlp_ratio=4.0,
                            img_size=64, num_frames=8, dec_dim=96, dec_depth=2, dec_heads=4,
                            fourier_octaves=6),
}
PRESET_NAMES = tuple(PRESETS)


def get_config(name: str, **overrides) -> D4RTConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown D4RT preset {name!r}; expected one of {PRESET_NAMES}")
  return dataclasses.replace(PRESETS[name], **overrides)


def _concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_video(video, cfg: D4RTConfig, name: str = "video") -> None:
  """A clear ``ValueError`` for a clip the encoder cannot take."""
  shape = getattr(video, "shape", None)
  if shape is None or len(shape) != 5 or shape[-1] != 3:
    raise ValueError(f"{name} must be (B, T, S, S, 3) RGB in [0, 1]; got "
                     f"{None if shape is None else tuple(shape)}")
  _, t, h, w, _ = shape
  if t < cfg.tubelet or t % cfg.tubelet:
    raise ValueError(f"{name} has {t} frame(s): D4RT needs a positive multiple of the "
                     f"{cfg.tubelet}-frame tubelet (repeat the last frame to pad a clip)")
  if t > cfg.num_frames:
    raise ValueError(f"{name} has {t} frames; this model's time embeddings address at most "
                     f"{cfg.num_frames}: run longer videos in overlapping chunks")
  if h != w or h % cfg.patch or h == 0:
    raise ValueError(f"{name}: frames must be square with a side that is a multiple of "
                     f"{cfg.patch}; got {h} x {w} (resize the video to e.g. "
                     f"{cfg.img_size} x {cfg.img_size} first)")


def check_queries(queries, num_frames: int, name: str = "queries") -> None:
  """``queries`` ``(B, N, 5)`` ``[u, v, t_src, t_tgt, t_cam]``: ``u, v`` in [0, 1] and integer
  frame indices below ``num_frames`` (checked on concrete values)."""
  shape = getattr(queries, "shape", None)
  if shape is None or len(shape) != 3 or shape[-1] != 5:
    raise ValueError(f"{name} must be (B, N, 5) [u, v, t_src, t_tgt, t_cam]; got "
                     f"{None if shape is None else tuple(shape)}")
  if not _concrete(queries):
    return
  q = np.asarray(queries, np.float64)
  if not np.isfinite(q).all():
    raise ValueError(f"{name} holds non-finite values")
  uv = q[..., :2]
  if (uv < 0).any() or (uv > 1).any():
    i = np.argwhere((uv < 0) | (uv > 1))[0]
    raise ValueError(f"{name}[{i[0]}, {i[1]}] has (u, v) = {tuple(q[i[0], i[1], :2])}: u and v "
                     "must lie in [0, 1] (pixel centre (x + 0.5) / W, (y + 0.5) / H)")
  t = q[..., 2:]
  bad = (t < 0) | (t > num_frames - 1) | (t != np.round(t))
  if bad.any():
    i = np.argwhere(bad)[0]
    raise ValueError(f"{name}[{i[0]}, {i[1]}] asks for frame {q[i[0], i[1], 2 + i[2]]:g} "
                     f"({('t_src', 't_tgt', 't_cam')[i[2]]}); the clip has frames 0 .. "
                     f"{num_frames - 1}")


def _normalise(rgb: jax.Array) -> jax.Array:
  mean = jnp.asarray(layers.IMAGENET_MEAN)
  std = jnp.asarray(layers.IMAGENET_STD)
  return (rgb.astype(jnp.float32) - mean) / std


class VideoEncoder(nnx.Module):
  """The video ViT (module docstring): ``(B, T, S, S, 3)`` in [0, 1] -> ``(B, N + 1, C)``."""

  def __init__(self, cfg: D4RTConfig, *, rngs: nnx.Rngs):
    c = self.cfg = cfg
    self.patch_embed = vid.TubeletEmbed(c.tubelet, c.patch, c.enc_dim, rngs=rngs,
                                        dtype=c.dtype)
    self.pos_embed = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(),
                                                            (*c.grid, c.enc_dim)))
    self.aspect_embed = layers.linear(1, c.enc_dim, rngs=rngs, axes=(None, "embed"))
    bc = BlockConfig(dim=c.enc_dim, num_heads=c.enc_heads, mlp_ratio=c.enc_mlp_ratio,
                     ln_eps=c.ln_eps, layerscale=None, attn_impl=c.attn_impl, dtype=c.dtype)
    self.blocks = LayerStack(lambda r: Block(bc, rngs=r), c.enc_depth, rngs=rngs, scan=c.scan,
                             remat=c.remat)
    self.norm = layers.layer_norm(c.enc_dim, c.ln_eps, rngs=rngs)

  def __call__(self, video: jax.Array, aspect: jax.Array | float = 1.0) -> jax.Array:
    """``aspect``: ``W / H`` of the original video, a scalar or ``(B,)``."""
    c = self.cfg
    check_video(video, c)
    b, t, h, w, _ = video.shape
    x = self.patch_embed(_normalise(video)).astype(jnp.float32)  # (B, slots, n, C)
    grid = self.patch_embed.grid(t, h, w)
    pos = vid.resize_space_time(self.pos_embed[...].astype(jnp.float32), grid)
    x = (x + pos.reshape(1, grid[0], grid[1] * grid[2], -1)).astype(c.dtype or jnp.float32)
    log_ar = jnp.log(jnp.broadcast_to(jnp.asarray(aspect, jnp.float32), (b,)))
    a = self.aspect_embed(log_ar[:, None, None]).astype(x.dtype)  # (B, 1, C)

    def pair(carry, blk):  # frame-local layer, then global layer with the aspect token
      x, a = carry
      loc, glo = unstack(blk, 2)
      x = local_attention(loc, x, None)
      bb, s, n, d = x.shape
      y = glo(jnp.concatenate([x.reshape(bb, s * n, d), a], 1), None, cross_view=True)
      return shard_views(y[:, :s * n].reshape(bb, s, n, d), 1), y[:, s * n:]

    x, a = self.blocks.run((x, a), pair, group=2)
    x = jnp.concatenate([x.reshape(b, -1, x.shape[-1]), a], 1)
    return self.norm(x)


class QueryDecoder(nnx.Module):
  """The query decoder (module docstring). :meth:`context` turns encoder features into each
  layer's keys and values once; :meth:`__call__` answers a batch of queries against them."""

  def __init__(self, cfg: D4RTConfig, *, rngs: nnx.Rngs):
    c = self.cfg = cfg
    d = c.dec_dim
    normal = nnx.initializers.normal(0.02)
    self.uv_embed = layers.linear(qf.feature_dim(c.fourier_octaves), d, rngs=rngs,
                                  axes=(None, "embed"))
    self.t_src_embed = nnx.Param(normal(rngs.params(), (c.num_frames, d)))
    self.t_tgt_embed = nnx.Param(normal(rngs.params(), (c.num_frames, d)))
    self.t_cam_embed = nnx.Param(normal(rngs.params(), (c.num_frames, d)))
    self.patch_embed = Mlp(3 * c.rgb_patch ** 2, d, out_dim=d, rngs=rngs, dtype=c.dtype)
    self.blocks = LayerStack(
        lambda r: CrossOnlyBlock(d, c.dec_heads, rngs=r, mlp_ratio=c.dec_mlp_ratio,
                                 ln_eps=c.ln_eps, attn_impl=c.attn_impl,
                                 context_dim=c.enc_dim, dtype=c.dtype),
        c.dec_depth, rngs=rngs, scan=c.scan, remat=c.remat)
    self.norm = layers.layer_norm(d, c.ln_eps, rngs=rngs)
    self.head = layers.linear(d, OUT_DIM, rngs=rngs, axes=("embed", None))

  def context(self, features: jax.Array):
    """Every layer's keys and values of ``features`` ``(B, N, C)``: two ``(L, B, N, heads,
    head_dim)`` arrays."""
    return self.blocks.map_layers(lambda blk: blk.context_kv(features))

  def embed(self, queries: jax.Array, frames: jax.Array) -> jax.Array:
    """Query tokens ``(B, N, D)`` of ``queries`` ``(B, N, 5)`` with RGB patches from ``frames``
    ``(B, T, H, W, 3)`` in [0, 1]."""
    c = self.cfg
    q = queries.astype(jnp.float32)
    uv = q[..., :2]
    ts, tt, tc = (jnp.round(q[..., i]).astype(jnp.int32) for i in (2, 3, 4))
    x = self.uv_embed(qf.fourier_features(uv, c.fourier_octaves))
    x = x + self.t_src_embed[...][ts] + self.t_tgt_embed[...][tt] + self.t_cam_embed[...][tc]
    patches = qf.sample_patches(_normalise(frames), ts, uv, c.rgb_patch)
    x = x + self.patch_embed(patches)
    return x.astype(c.dtype or jnp.float32)

  def __call__(self, kv, queries: jax.Array, frames: jax.Array) -> jax.Array:
    """Raw read-out ``(B, N, 13)`` of ``queries`` against :meth:`context`'s ``kv``."""
    x = shard_views(self.embed(queries, frames), 1)  # queries split over "view" devices
    x = self.blocks.run_with(x, lambda h, blk, kv_i: blk(h, kv=kv_i), kv)
    return shard_views(self.head(self.norm(x)).astype(jnp.float32), 1)


def readout(raw: jax.Array) -> dict[str, jax.Array]:
  """The 13 raw channels as named outputs: ``points``, ``uv``, ``visibility_logit``,
  ``visibility`` (probability), ``displacement``, ``normal`` (unit), ``confidence``
  (``1 + exp``) and ``raw``."""
  out = {name: raw[..., s:s + n] for name, s, n in OUTPUTS}
  vis = out.pop("visibility")[..., 0]
  n = out["normal"]
  return {
      "points": out["points"], "uv": out["uv"], "visibility_logit": vis,
      "visibility": jax.nn.sigmoid(vis), "displacement": out["displacement"],
      "normal": n / jnp.maximum(jnp.linalg.norm(n, axis=-1, keepdims=True), 1e-8),
      "confidence": 1.0 + jnp.exp(jnp.clip(out["confidence"][..., 0], -30.0, 30.0)),
      "raw": raw,
  }


class D4RT(nnx.Module):
  """The D4RT network (module docstring). Build with :meth:`from_preset`."""

  def __init__(self, cfg: D4RTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = VideoEncoder(cfg, rngs=rngs)
    self.decoder = QueryDecoder(cfg, rngs=rngs)

  @classmethod
  def from_preset(cls, name: str, *, rngs: nnx.Rngs, **overrides) -> "D4RT":
    return cls.from_config(get_config(name, **overrides), rngs=rngs)

  @classmethod
  def from_config(cls, cfg: D4RTConfig, *, rngs: nnx.Rngs) -> "D4RT":
    return create(lambda r: cls(cfg, rngs=r), rngs)

  def encode(self, video: jax.Array, aspect: jax.Array | float = 1.0) -> jax.Array:
    """The clip's scene representation ``F`` ``(B, T/2 * (S/16)^2 + 1, C)``."""
    return self.encoder(video, aspect)

  def decode(self, features: jax.Array, queries: jax.Array, frames: jax.Array, *,
             chunk: int | None = None) -> dict[str, jax.Array]:
    """Answers to ``queries`` ``(B, N, 5)`` (:func:`readout`'s dict, leading dims ``(B, N)``)
    from encoder ``features`` and the clip's ``frames`` ``(B, T, H, W, 3)`` in [0, 1] (any
    resolution: the RGB patches are sampled there). ``chunk``: decode at most this many queries
    at a time (a loop over equal chunks, the last one padded); the answers do not depend on
    it."""
    check_queries(queries, frames.shape[1])
    kv = self.decoder.context(features)
    b, n, _ = queries.shape
    if chunk is None or chunk >= n:
      return readout(self.decoder(kv, queries, frames))
    if chunk < 1:
      raise ValueError(f"chunk must be a positive number of queries; got {chunk}")
    m = -(-n // chunk)
    pad = m * chunk - n
    q = jnp.concatenate([queries, jnp.broadcast_to(queries[:, :1], (b, pad, 5))], 1)
    q = q.reshape(b, m, chunk, 5).swapaxes(0, 1)
    raw = jax.lax.map(lambda qc: self.decoder(kv, qc, frames), q)  # (m, B, chunk, 13)
    raw = raw.swapaxes(0, 1).reshape(b, m * chunk, OUT_DIM)[:, :n]
    return readout(raw)

  def __call__(self, video: jax.Array, queries: jax.Array, *, aspect: jax.Array | float = 1.0,
               frames: jax.Array | None = None, chunk: int | None = None
               ) -> dict[str, jax.Array]:
    """Encode ``video`` ``(B, T, S, S, 3)`` and answer ``queries``; patches from ``frames``
    (the full-resolution clip) when given, else from ``video``."""
    frames = video if frames is None else frames
    if frames.shape[:2] != video.shape[:2]:
      raise ValueError(f"frames {tuple(frames.shape)} must have the video's batch and frame "
                       f"count {tuple(video.shape[:2])}")
    return self.decode(self.encode(video, aspect), queries, frames, chunk=chunk)
