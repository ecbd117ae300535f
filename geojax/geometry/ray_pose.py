"""Camera pose and intrinsics from a per-pixel ray map (DA3 ``use_ray_pose``).

A ray map holds, per pixel, a world-frame direction ``d = R_c2w K^-1 [u, v, 1]`` (channels 0..2)
and the camera centre (channels 3..5). Directions divided by their z are a homography of the
canonical pixel grid, ``H ~ R K^-1``; it is fitted by confidence-weighted DLT inside RANSAC
(seeded), refitted on the inliers and split by a QL decomposition into rotation and intrinsics.
The read-out assumes a centred principal point, like the reference solver.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from geojax.geometry.camera import rigid_inverse

_HP = jax.lax.Precision.HIGHEST


def _dlt_rows(src, dst, w):
  x, y = src[..., 0], src[..., 1]
  u, v = dst[..., 0], dst[..., 1]
  sw = jnp.sqrt(w)
  z, one = jnp.zeros_like(x), jnp.ones_like(x)
  a1 = jnp.stack([-x, -y, -one, z, z, z, x * u, y * u, u], -1) * sw[..., None]
  a2 = jnp.stack([z, z, z, -x, -y, -one, x * v, y * v, v], -1) * sw[..., None]
  return jnp.concatenate([a1, a2], -2)  # (..., 2K, 9)


def weighted_homography(src, dst, w):
  """Weighted DLT homography ``dst ~ H src`` for ``(..., K, 2)`` points, normalised H[2,2]=1."""
  a = _dlt_rows(src, dst, w)
  if a.shape[-2] > 9:  # reduce tall systems to 9x9 first; same right singular vectors
    a = jnp.linalg.qr(a, mode="r")
  _, _, vh = jnp.linalg.svd(a, full_matrices=False)
  h = vh[..., -1, :].reshape(a.shape[:-2] + (3, 3))
  return h / h[..., 2:3, 2:3]


def ql_decomposition(a):
  """``A = Q L`` with Q orthogonal and L lower triangular with a positive diagonal."""
  p = jnp.array([[0.0, 0, 1], [0, 1, 0], [1, 0, 0]], a.dtype)
  q_t, r_t = jnp.linalg.qr(a @ p)
  q = q_t @ p
  l = p @ r_t @ p
  sgn = jnp.sign(jnp.diagonal(l, axis1=-2, axis2=-1))
  return q * sgn[..., None, :], l * sgn[..., :, None]


def pose_from_rays(ray: jax.Array, conf: jax.Array, image_hw: tuple[int, int], *, seed: int = 0,
                   n_iter: int = 100, sample_ratio: float = 0.3, n_points: int = 8,
                   reproj_threshold: float = 0.2, max_inliers: int = 8000,
                   z_threshold: float = 1e-4) -> tuple[jax.Array, jax.Array]:
  """Solve cameras from rays ``(B, S, h, w, 6)`` and confidences ``(B, S, h, w)``.

  Returns world-to-camera extrinsics ``(B, S, 3, 4)`` and intrinsics ``(B, S, 3, 3)`` in pixels
  of an ``image_hw`` image.
  """
  b, s, h, w, _ = ray.shape
  n = h * w
  with jax.default_matmul_precision("highest"):
    rays = ray.reshape(b * s, n, 6).astype(jnp.float32)
    wgt = conf.reshape(b * s, n).astype(jnp.float32)
    ys = -1 + (2 * jnp.arange(h, dtype=jnp.float32) + 1) / h
    xs = -1 + (2 * jnp.arange(w, dtype=jnp.float32) + 1) / w
    src = jnp.stack(jnp.meshgrid(xs, ys, indexing="xy"), -1).reshape(1, n, 2)
    src = jnp.broadcast_to(src, (b * s, n, 2))
    d = rays[..., :3]
    valid = jnp.abs(d[..., 2]) > z_threshold
    dst = jnp.where(valid[..., None], d[..., :2] / jnp.where(valid, d[..., 2], 1.0)[..., None],
                    d[..., :2])
    wgt = jnp.where(valid, wgt, 0.0)

    # RANSAC hypotheses from the most confident pixels (shared sampling pattern over views).
    n_sample = max(n_points, int(n * sample_ratio))
    key_h, key_r = jax.random.split(jax.random.key(seed))
    cand = jnp.argsort(-wgt, axis=1, stable=True)[:, :n_sample]
    picks = jax.vmap(lambda k: jax.random.permutation(k, n_sample)[:n_points])(
        jax.random.split(key_h, n_iter))  # (n_iter, n_points)
    idx = cand[:, picks]  # (M, n_iter, n_points)
    take = jax.vmap(lambda a, i: a[i])
    hyp = weighted_homography(take(src, idx), take(dst, idx), take(wgt, idx))
    src_h = jnp.concatenate([src, jnp.ones_like(src[..., :1])], -1)
    proj = jnp.einsum("mnk,mijk->minj", src_h, hyp)
    err = jnp.linalg.norm(proj[..., :2] / proj[..., 2:3] - dst[:, None], axis=-1)
    inl = err < reproj_threshold  # (M, n_iter, N)
    best = jnp.argmax(jnp.sum(inl * wgt[:, None], -1), axis=1)
    inl = jnp.take_along_axis(inl, best[:, None, None], axis=1)[:, 0]

    # Refit on the inliers; cap their number by a random draw from the top 95 % by confidence.
    count = inl.sum(-1, keepdims=True)
    rank = jnp.argsort(jnp.argsort(jnp.where(inl, -wgt, jnp.inf), axis=1, stable=True), axis=1)
    keep_len = jnp.maximum((count * 0.95).astype(jnp.int32), max_inliers)
    eligible = inl & (rank < keep_len)
    u = jnp.where(eligible, jax.random.uniform(key_r, eligible.shape), jnp.inf)
    urank = jnp.argsort(jnp.argsort(u, axis=1), axis=1)
    chosen = jnp.where(count > max_inliers, eligible & (urank < max_inliers), inl)
    hmat = weighted_homography(src, dst, jnp.where(chosen, wgt, 0.0))
    hmat = jnp.where(jnp.linalg.det(hmat)[:, None, None] < 0, -hmat, hmat)

    rot, low = ql_decomposition(hmat)
    low = low / low[:, 2:3, 2:3]
    focal = 1.0 / jnp.stack([low[:, 0, 0], low[:, 1, 1]], -1)
    pp = jnp.stack([low[:, 2, 0], low[:, 2, 1]], -1) + 1.0
    centre = jnp.sum(rays[..., 3:] * wgt[..., None], 1) / jnp.sum(wgt, -1, keepdims=True)
    c2w = jnp.concatenate([rot, centre[..., None]], -1)
    hh, ww = image_hw
    z = jnp.zeros_like(focal[:, 0])
    k = jnp.stack([focal[:, 0] / 2 * ww, z, pp[:, 0] * ww * 0.5,
                   z, focal[:, 1] / 2 * hh, pp[:, 1] * hh * 0.5, z, z, z + 1], -1)
    return (rigid_inverse(c2w).reshape(b, s, 3, 4), k.reshape(b, s, 3, 3))
