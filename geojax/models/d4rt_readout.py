"""D4RT read-outs: depth, point clouds, 3D tracks, cameras, dense tracking and long videos, all
made of queries to one encoded clip (paper section 3.3 and App. B; reference ``d4rt.md``
section 5).

Every read-out takes an *answer function* ``answer(queries) -> dict``: ``queries`` ``(N, 5)``
float ``(u, v, t_src, t_tgt, t_cam)`` with ``(u, v)`` normalised to ``[0, 1]`` (pixel ``x`` of a
``W``-wide image is ``(x + 0.5) / W``), the dict holds NumPy ``points`` ``(N, 3)``, ``uv``
``(N, 2)``, ``visibility`` ``(N,)`` (probability), ``confidence`` ``(N,)`` and optionally
``normal`` / ``displacement`` ``(N, 3)``. :class:`ClipAnswers` makes one from a model and a clip
(encoded once, decoded in fixed-size chunks, so each query size compiles once); a test can make
one from exact ground truth, so the read-outs are checked independently of any network.

* :func:`depth_maps`: ``t_src = t_tgt = t_cam = t`` for every pixel; ``z``.
* :func:`point_cloud`: every pixel of every frame at its own time, in the camera of ``t_cam``.
* :func:`tracks`: fixed ``(u, v, t_src)``, ``t_tgt = t_cam = t`` for ``t = 0..T-1`` (camera frame)
  or ``t_cam`` fixed (the world frame of that camera).
* :func:`extrinsics`: on a coarse grid, ``(u, v, i, i, i)`` and ``(u, v, i, i, ref)`` are the same
  points in cameras ``i`` and ``ref``; a rigid Umeyama fit gives camera ``i``'s pose.
* :func:`intrinsics`: the median rule with a known principal point:
  ``f_x = p_z (u - c_u) / p_x`` (normalised) over the grid, then in pixels.
* :func:`dense_tracks`: the paper's Algorithm 1 (an occupancy grid over ``T x H x W``; full
  tracks start only from pixels no earlier track crossed visibly).
* :func:`reconstruct_long`: overlapping chunks, each aligned to the previous ones by a Sim(3)
  Umeyama fit on the most confident points of the shared frames (no loop closure).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Answer = Callable[[np.ndarray], dict]


def pixel_grid(h: int, w: int) -> np.ndarray:
  """Normalised pixel centres ``(h * w, 2)`` ``(u, v)`` of an ``h x w`` grid, row-major."""
  v, u = np.mgrid[0:h, 0:w].astype(np.float64)
  return np.stack([(u.ravel() + 0.5) / w, (v.ravel() + 0.5) / h], -1)


def make_queries(uv: np.ndarray, t_src, t_tgt, t_cam) -> np.ndarray:
  """``(N, 5)`` float32 queries of ``uv`` ``(N, 2)`` and times (scalars or ``(N,)``)."""
  uv = np.asarray(uv, np.float64).reshape(-1, 2)
  n = uv.shape[0]
  ts = [np.broadcast_to(np.asarray(t, np.float64), (n,)) for t in (t_src, t_tgt, t_cam)]
  return np.concatenate([uv, np.stack(ts, -1)], -1).astype(np.float32)


def _check_frames(num_frames: int, *frames) -> None:
  for f in frames:
    if not 0 <= int(f) < num_frames:
      raise ValueError(f"frame {f} does not exist in a clip of {num_frames} frames")


def depth_maps(answer: Answer, num_frames: int, hw: tuple[int, int]) -> dict:
  """``depth`` ``(T, h, w)`` (the query's ``z`` in its own camera) and ``confidence``."""
  h, w = hw
  grid = pixel_grid(h, w)
  q = np.concatenate([make_queries(grid, t, t, t) for t in range(num_frames)])
  a = answer(q)
  return {"depth": a["points"][:, 2].reshape(num_frames, h, w),
          "confidence": a["confidence"].reshape(num_frames, h, w)}


def point_cloud(answer: Answer, num_frames: int, hw: tuple[int, int], t_cam: int = 0) -> dict:
  """Every pixel of every frame at its own time in the camera of ``t_cam``: ``points``
  ``(T, h, w, 3)``, ``confidence`` ``(T, h, w)`` (and ``normal`` when answered)."""
  _check_frames(num_frames, t_cam)
  h, w = hw
  grid = pixel_grid(h, w)
  q = np.concatenate([make_queries(grid, t, t, t_cam) for t in range(num_frames)])
  a = answer(q)
  out = {"points": a["points"].reshape(num_frames, h, w, 3),
         "confidence": a["confidence"].reshape(num_frames, h, w)}
  if "normal" in a:
    out["normal"] = a["normal"].reshape(num_frames, h, w, 3)
  return out


def tracks(answer: Answer, num_frames: int, query_points: np.ndarray,
           t_cam: int | None = None) -> dict:
  """3D tracks of ``query_points`` ``(N, 3)`` ``(t_src, u, v)`` (``u, v`` normalised).

  ``t_cam=None``: at time ``t`` in camera ``t`` (TAPVid-3D's camera frame); an integer: every
  time in that one camera. Returns ``points`` ``(T, N, 3)``, ``visibility`` ``(T, N)``
  (probability), ``uv`` ``(T, N, 2)`` (2D track, normalised) and ``confidence`` ``(T, N)``."""
  qp = np.asarray(query_points, np.float64)
  if qp.ndim != 2 or qp.shape[1] != 3:
    raise ValueError(f"query_points must be (N, 3) (t_src, u, v); got {qp.shape}")
  if t_cam is not None:
    _check_frames(num_frames, t_cam)
  n = qp.shape[0]
  q = np.concatenate([make_queries(qp[:, 1:], qp[:, 0], t, t if t_cam is None else t_cam)
                      for t in range(num_frames)])
  a = answer(q)
  return {"points": a["points"].reshape(num_frames, n, 3),
          "visibility": a["visibility"].reshape(num_frames, n),
          "uv": a["uv"].reshape(num_frames, n, 2),
          "confidence": a["confidence"].reshape(num_frames, n)}


def _top(conf: np.ndarray, keep: float) -> np.ndarray:
  """Mask of the ``keep`` fraction of highest confidences (at least 3 entries)."""
  k = max(3, int(np.ceil(keep * conf.size)))
  if k >= conf.size:
    return np.ones(conf.shape, bool)
  thr = np.partition(conf.ravel(), conf.size - k)[conf.size - k]
  return conf >= thr


def _umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool):
  """``dst ~ s R src + t`` (float64 NumPy; Umeyama 1991, reflection fixed)."""
  mu_s, mu_d = src.mean(0), dst.mean(0)
  xs, xd = src - mu_s, dst - mu_d
  cov = xd.T @ xs / len(src)
  u, d, vt = np.linalg.svd(cov)
  sgn = np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0
  diag = np.array([1.0, 1.0, sgn])
  rot = (u * diag) @ vt
  s = float((d * diag).sum() / max((xs ** 2).sum() / len(src), 1e-300)) if with_scale else 1.0
  return s, rot, mu_d - s * rot @ mu_s


def extrinsics(answer: Answer, num_frames: int, grid: tuple[int, int] = (16, 16), ref: int = 0,
               keep: float = 1.0) -> np.ndarray:
  """World-to-camera ``(T, 4, 4)`` with the camera of frame ``ref`` as the world.

  For each frame ``i``: the grid's points in camera ``i`` (``(u, v, i, i, i)``) and in camera
  ``ref`` (``(u, v, i, i, ref)``) give camera ``i``'s camera-to-world by a rigid Umeyama fit on
  the ``keep`` fraction most confident points (their mean confidence)."""
  _check_frames(num_frames, ref)
  uv = pixel_grid(*grid)
  g = uv.shape[0]
  q = np.concatenate([np.concatenate([make_queries(uv, i, i, i), make_queries(uv, i, i, ref)])
                      for i in range(num_frames)])
  a = answer(q)
  pts = a["points"].astype(np.float64).reshape(num_frames, 2, g, 3)
  conf = a["confidence"].astype(np.float64).reshape(num_frames, 2, g).mean(1)
  out = np.tile(np.eye(4), (num_frames, 1, 1))
  for i in range(num_frames):
    m = _top(conf[i], keep) & np.isfinite(pts[i]).all((0, -1))
    _, rot, t = _umeyama(pts[i, 0, m], pts[i, 1, m], with_scale=False)
    c2w = np.eye(4)
    c2w[:3, :3], c2w[:3, 3] = rot, t
    out[i] = np.linalg.inv(c2w)
  return out


def intrinsics(answer: Answer, num_frames: int, hw: tuple[int, int],
               grid: tuple[int, int] = (16, 16), principal: tuple[float, float] = (0.5, 0.5),
               min_offset: float = 0.05) -> np.ndarray:
  """Pinhole intrinsics ``(T, 3, 3)`` in pixels of an ``hw`` image by the median rule.

  Queries ``(u, v, t, t, t)`` on the grid give ``p``; ``f_u = p_z (u - c_u) / p_x`` (normalised
  units; likewise ``f_v``), the median over grid points at least ``min_offset`` from the
  principal point ``(c_u, c_v)`` (normalised, the paper's ``(0.5, 0.5)`` by default), in front
  of the camera and giving a positive focal length. In pixels: ``fx = f_u W``,
  ``cx = c_u W - 0.5`` (pixel-centre convention), likewise for ``y``. A frame with no such point
  (an untrained network) gets ``f = max(H, W)`` (a 53 degree field of view)."""
  h, w = hw
  uv = pixel_grid(*grid)
  q = np.concatenate([make_queries(uv, t, t, t) for t in range(num_frames)])
  p = answer(q)["points"].astype(np.float64).reshape(num_frames, -1, 3)
  cu, cv = principal
  out = np.tile(np.eye(3), (num_frames, 1, 1))
  for t in range(num_frames):
    fs = []
    for axis, c, size in ((0, cu, w), (1, cv, h)):
      off = uv[:, axis] - c
      m = (np.abs(off) >= min_offset) & (np.abs(p[t, :, axis]) > 1e-12) & (p[t, :, 2] > 0)
      f = p[t, m, 2] * off[m] / p[t, m, axis]
      f = f[f > 0]
      fs.append(float(np.median(f)) * size if f.size else float(max(h, w)))
    out[t, 0, 0], out[t, 1, 1] = fs
    out[t, 0, 2], out[t, 1, 2] = cu * w - 0.5, cv * h - 0.5
  return out


def dense_tracks(answer: Answer, num_frames: int, hw: tuple[int, int], *, batch: int = 1024,
                 t_cam: int | None = None, threshold: float = 0.5) -> dict:
  """All-pixel dense tracking (the paper's Algorithm 1).

  An occupancy grid ``visited`` ``(T, h, w)`` starts empty. Frame by frame, the unvisited pixels
  of frame ``t`` (up to ``batch`` at a time, row-major) start full tracks
  ``(u, v, t, t', t' or t_cam)`` for every ``t'``; the start pixel, and every pixel a track
  crosses visibly (``visibility > threshold``, at its rounded 2D position ``uv`` in frame
  ``t'``), is marked visited. Pixels crossed by an earlier track start none, so every pixel is
  covered by some track while far fewer than ``T h w`` tracks are decoded when points stay in
  view.

  Returns ``starts`` ``(M, 3)`` ``(t, u, v)`` normalised, ``points`` ``(M, T, 3)`` and
  ``visibility`` ``(M, T)`` of the ``M`` tracks, ``visited`` ``(T, h, w)`` (all True) and
  ``num_queries`` (the decoded count, ``M T``)."""
  h, w = hw
  if t_cam is not None:
    _check_frames(num_frames, t_cam)
  visited = np.zeros((num_frames, h, w), bool)
  grid = pixel_grid(h, w)
  starts, pts, vis = [], [], []
  for t in range(num_frames):
    while True:
      todo = np.flatnonzero(~visited[t].ravel())[:batch]
      if todo.size == 0:
        break
      uv = grid[todo]
      n = todo.size
      q = np.concatenate([make_queries(uv, t, tt, tt if t_cam is None else t_cam)
                          for tt in range(num_frames)])
      a = answer(q)
      visited[t].ravel()[todo] = True
      seen = a["visibility"].reshape(num_frames, n) > threshold
      px = a["uv"].reshape(num_frames, n, 2)
      x = np.floor(px[..., 0] * w).astype(np.int64)
      y = np.floor(px[..., 1] * h).astype(np.int64)
      ok = seen & (x >= 0) & (x < w) & (y >= 0) & (y < h)
      tt = np.broadcast_to(np.arange(num_frames)[:, None], ok.shape)
      visited[tt[ok], y[ok], x[ok]] = True
      starts.append(np.concatenate([np.full((n, 1), t, np.float64), uv], -1))
      pts.append(a["points"].reshape(num_frames, n, 3).swapaxes(0, 1))
      vis.append(a["visibility"].reshape(num_frames, n).T)
  m = sum(len(s) for s in starts)
  return {"starts": np.concatenate(starts), "points": np.concatenate(pts),
          "visibility": np.concatenate(vis), "visited": visited, "num_queries": m * num_frames}


def reconstruct_long(answer_for: Callable[[int, int], Answer], num_frames: int, chunk: int,
                     overlap: int, hw: tuple[int, int], *, grid: tuple[int, int] = (16, 16),
                     keep: float = 0.85) -> dict:
  """A video longer than one clip, as overlapping chunks in one frame (App. B).

  ``answer_for(start, stop)`` answers queries about frames ``start..stop-1`` (local indices
  ``0..stop-start-1``; e.g. a :class:`ClipAnswers` of that chunk). Chunks start every
  ``chunk - overlap`` frames (the last one ends at the video's end). Each chunk's point maps
  (camera of its first frame) are aligned to the frames already placed by a Sim(3) Umeyama fit
  on the ``keep`` fraction most confident points of the shared frames (no loop closure); its
  cameras follow. Returns ``points`` ``(T, h, w, 3)`` and ``extrinsics`` ``(T, 4, 4)``
  world-to-camera in the first camera's frame and units, ``depth`` ``(T, h, w)`` in those units,
  ``confidence`` ``(T, h, w)`` and ``chunks`` (the ``(start, stop)`` list)."""
  if not 0 <= overlap < chunk:
    raise ValueError(f"overlap must be in [0, chunk); got overlap={overlap}, chunk={chunk}")
  if chunk > 1 and overlap < 1 and num_frames > chunk:
    raise ValueError("overlap must be >= 1 to align chunks")
  h, w = hw
  spans, s = [], 0
  while True:
    e = min(s + chunk, num_frames)
    spans.append((max(0, e - chunk), e))
    if e >= num_frames:
      break
    s = e - overlap
  pts = np.zeros((num_frames, h, w, 3))
  conf = np.zeros((num_frames, h, w))
  c2w = np.tile(np.eye(4), (num_frames, 1, 1))
  done = np.zeros(num_frames, bool)
  sim3 = []
  for s, e in spans:
    ans = answer_for(s, e)
    n = e - s
    pc = point_cloud(ans, n, hw, t_cam=0)
    p, c = pc["points"].astype(np.float64), pc["confidence"].astype(np.float64)
    local = np.linalg.inv(extrinsics(ans, n, grid, ref=0))
    shared = np.flatnonzero(done[s:e])
    if shared.size:
      src, dst = p[shared].reshape(-1, 3), pts[s + shared].reshape(-1, 3)
      cc = np.minimum(c[shared], conf[s + shared]).ravel()
      m = _top(cc, keep) & np.isfinite(src).all(-1) & np.isfinite(dst).all(-1)
      sc, rot, tr = _umeyama(src[m], dst[m], with_scale=True)
    else:
      sc, rot, tr = 1.0, np.eye(3), np.zeros(3)
    sim3.append((float(sc), np.asarray(rot, np.float64), np.asarray(tr, np.float64)))
    new = np.flatnonzero(~done[s:e])
    pts[s + new] = sc * p[new] @ rot.T + tr
    conf[s + new] = c[new]
    for i in new:
      c2w[s + i, :3, :3] = rot @ local[i, :3, :3]
      c2w[s + i, :3, 3] = sc * rot @ local[i, :3, 3] + tr
    done[s:e] = True
  w2c = np.linalg.inv(c2w)
  depth = np.einsum("tij,thwj->thwi", w2c[:, :3, :3], pts)[..., 2] + w2c[:, None, None, 2, 3]
  return {"points": pts, "extrinsics": w2c, "depth": depth, "confidence": conf, "chunks": spans,
          "sim3": sim3}


def long_tracks(answer_for: Callable[[int, int], Answer], num_frames: int, spans, sim3,
                query_points: np.ndarray) -> dict:
  """3D tracks over a video longer than one clip, chained across the chunks of
  :func:`reconstruct_long` (``spans`` and ``sim3``: its ``chunks`` and per-chunk Sim(3) from a
  chunk's first camera into the video's frame).

  ``query_points`` ``(N, 3)`` ``(t, u, v)``: ``t`` a frame of the whole video, ``u, v``
  normalised. A query is answered by the first chunk holding its frame (every time, in that
  chunk's first camera, then mapped by its Sim(3)). The track is then handed over to the next
  chunk (and, for queries beyond the first chunk, to the previous one): among the frames the
  two chunks share, the one where the track is most visible (visibility x confidence) gives
  its 2D position there (the decoder's ``uv``), which is the new chunk's query. Each frame is
  filled by the first chunk that reaches it moving away from the query's frame. Returns
  ``points`` ``(T, N, 3)`` in the video's frame, ``visibility`` and ``confidence`` ``(T, N)``;
  a track whose hand-over point is not finite stops there (NaN points, zero visibility)."""
  qp = np.asarray(query_points, np.float64)
  if qp.ndim != 2 or qp.shape[1] != 3:
    raise ValueError(f"query_points must be (N, 3) (t, u, v); got {qp.shape}")
  _check_frames(num_frames, *np.unique(qp[:, 0]).astype(int).tolist())
  n = len(qp)
  pts = np.full((num_frames, n, 3), np.nan)
  vis, conf = np.zeros((num_frames, n)), np.zeros((num_frames, n))
  filled = np.zeros((num_frames, n), bool)
  home = np.array([next(c for c, (s, e) in enumerate(spans) if s <= t < e) for t in qp[:, 0]],
                  np.int64)
  cache: dict[int, Answer] = {}

  def answer(c, ids, q):  # (t global, u, v) queries in chunk c: fill, return the chunk's track
    s, e = spans[c]
    if c not in cache:
      cache.clear()  # one encoded chunk at a time
      cache[c] = answer_for(s, e)
    loc = np.concatenate([q[:, :1] - s, q[:, 1:]], 1)
    tr = tracks(cache[c], e - s, loc, t_cam=0)
    sc, rot, t3 = sim3[c]
    p = sc * tr["points"].astype(np.float64) @ rot.T + t3
    for j, i in enumerate(ids):
      new = ~filled[s:e, i]
      pts[s:e, i][new], vis[s:e, i][new] = p[new, j], tr["visibility"][new, j]
      conf[s:e, i][new] = tr["confidence"][new, j]
      filled[s:e, i] |= True
    return tr

  def hand_over(c, c2, ids, tr):  # queries (t, u, v) of the same points for chunk c2
    s, e = spans[c]
    lo, hi = max(s, spans[c2][0]), min(e, spans[c2][1])
    score = (tr["visibility"] * tr["confidence"])[lo - s:hi - s]  # (shared, k)
    best = np.argmax(score, 0)
    uv = tr["uv"][lo - s + best, np.arange(len(ids))].astype(np.float64)
    ok = np.isfinite(uv).all(-1)
    q = np.concatenate([(lo + best)[:, None].astype(np.float64), np.clip(uv, 0.0, 1.0)], 1)
    return [i for i, g in zip(ids, ok) if g], q[ok]

  fwd: dict[int, tuple[list, np.ndarray]] = {}
  back: dict[int, tuple[list, np.ndarray]] = {}
  for c in range(len(spans)):  # forward, each query starting in its own chunk
    ids = np.flatnonzero(home == c).tolist()
    q = qp[ids]
    if c in fwd:
      ids, q = ids + fwd[c][0], np.concatenate([q, fwd[c][1]])
    if not ids:
      continue
    tr = answer(c, ids, q)
    if c + 1 < len(spans):
      fwd[c + 1] = hand_over(c, c + 1, ids, tr)
    mine = [j for j, i in enumerate(ids) if home[i] == c]
    if c > 0 and mine:
      sub = {k: v[:, mine] for k, v in tr.items()}
      back[c - 1] = hand_over(c, c - 1, [ids[j] for j in mine], sub)
  for c in range(len(spans) - 2, -1, -1):  # backward, for queries beyond the first chunk
    if c not in back or not back[c][0]:
      continue
    ids, q = back[c]
    tr = answer(c, ids, q)
    if c > 0:
      prev = back.get(c - 1, ([], np.zeros((0, 3))))
      more_ids, more_q = hand_over(c, c - 1, ids, tr)
      back[c - 1] = (prev[0] + more_ids, np.concatenate([prev[1], more_q]))
  return {"points": pts, "visibility": vis, "confidence": conf}


class ClipAnswers:
  """The answer function of a model on one clip: the clip is encoded once and queries are
  decoded in chunks of ``chunk`` (padded), so every call compiles once per chunk size.

  ``video`` ``(T, S, S, 3)`` float in [0, 1] at the model's square size; ``frames``: the clip at
  any resolution for the RGB patches (default ``video``); ``aspect``: the original ``W / H``.
  ``num_queries`` counts the queries answered so far."""

  def __init__(self, model, video, *, frames=None, aspect: float = 1.0, chunk: int = 4096):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from geojax.models import d4rt

    video = jnp.asarray(video, jnp.float32)[None]
    frames = video if frames is None else jnp.asarray(frames, jnp.float32)[None]
    d4rt.check_video(video, model.cfg)
    graphdef, state = nnx.split(model)
    self.num_frames = int(video.shape[1])
    self.chunk = int(chunk)
    self.num_queries = 0

    @jax.jit
    def encode(state, video):  # the clip's features -> every decoder layer's keys and values
      m = nnx.merge(graphdef, state)
      return m.decoder.context(m.encode(video, aspect))

    @jax.jit
    def decode(state, kv, q):
      return d4rt.readout(nnx.merge(graphdef, state).decoder(kv, q[None], frames))

    self._state, self._decode = state, decode
    self._kv = encode(state, video)

  def __call__(self, queries: np.ndarray) -> dict:
    from geojax.models import d4rt
    q = np.asarray(queries, np.float32).reshape(-1, 5)
    d4rt.check_queries(q[None], self.num_frames)
    n = q.shape[0]
    self.num_queries += n
    m = -(-n // self.chunk) * self.chunk
    qp = np.concatenate([q, np.broadcast_to(q[:1], (m - n, 5))]) if m > n else q
    parts = []
    for i in range(0, m, self.chunk):
      out = self._decode(self._state, self._kv, qp[i:i + self.chunk])
      parts.append({k: np.asarray(out[k][0]) for k in ("points", "uv", "visibility", "confidence",
                                                       "normal", "displacement")})
    return {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}
