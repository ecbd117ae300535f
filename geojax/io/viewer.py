"""An interactive, offline WebGL viewer of a point cloud and its cameras, as an HTML fragment.

:func:`viewer_html` returns one ``<div>`` (inline CSS, a ``<canvas>``, controls and an inline
``<script>``) that draws the points with WebGL 1 (``gl.POINTS``) and the camera frustums with
``gl.LINES``. Everything it needs is inside the fragment: the points are embedded as base64 of
little-endian ``Float32`` positions and ``Uint8`` colours, and the script uses no library, so the
page works when opened straight from disk (``file://``) and makes no network request at all. The
page around it should not either: give it an inline favicon (``<link rel="icon" href="data:,">``
in ``<head>``), or browsers ask the server (or disk) for ``/favicon.ico``.
:func:`standalone_page` wraps a fragment in such a minimal page.

Conventions are those of :mod:`geojax.io.render`: OpenCV world and camera axes (x right, y down,
z forward), world-to-camera ``extrinsics`` ``(S, 4, 4)`` or ``(S, 3, 4)``, ``intrinsics`` in pixels
with pixel centres at integer coordinates, ``image_hw`` ``(H, W)`` or ``(S, 2)`` (inferred from the
principal point when omitted).

Controls: left drag orbits around the target (about the first camera's "up" axis), right drag or
shift + left drag pans, the wheel zooms; a slider sets the point size, a menu switches between
the points' RGB colours and a depth colour map (the colour map of
:func:`geojax.io.visualize.colorize_depth`: near is bright, 2nd-98th percentile range), a
checkbox shows or hides the frustums and a button resets the view. The first view looks at the
centre of the cloud from behind and above the first camera, far enough back for the whole scene
(the 2nd-98th percentile box of the points and every frustum) to fit.

Precision: positions are stored as float32 offsets from the cloud centre (computed in float64 and
recorded in the page), so float32 does not lose detail far from the world origin.

For tests, the container ``<div>`` carries ``data-status``: ``loading``, then ``drawn`` after the
first frame, ``no-webgl`` when the browser has no WebGL (a text message replaces the canvas) or
``error: <message>``; after the first frame also ``data-points`` (points drawn), ``data-lit``
(canvas pixels that differ from the background, counted once with ``gl.readPixels``),
``data-lit-points`` (the same count for the points alone, before the frustums are drawn) and
``data-frames`` (frames drawn so far).

Size: about 22 bytes of HTML per point (200,000 points make a page of about 4.4 MB).
"""

from __future__ import annotations

import base64
import html
import json
import re
from typing import Any

import numpy as np

from geojax.io.render import camera_arrays, camera_colors
from geojax.io.visualize import colormap

_STATS_SAMPLE = 65_536  # points sampled for the centre, the scale and the depth range
_CAMERA_SIZE = 0.1  # frustum depth as a fraction of the scene scale (as geojax.io.render)
_HUGE = 1e30  # coordinates beyond this are dropped like non-finite ones (float32 tops at 3e38)
_ID = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")


def _b64(a: np.ndarray) -> str:
  return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _cameras(extrinsics: Any, intrinsics: Any, image_hw: Any,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(c2w (S, 4, 4), K (S, 3, 3), hw (S, 2))`` float64 of the usable cameras (finite, invertible
  matrices and positive image sizes); shapes are checked."""
  e, k = camera_arrays(extrinsics, intrinsics, "viewer_html")
  s = e.shape[0]
  if image_hw is None:
    hw = np.stack([2 * k[:, 1, 2] + 1, 2 * k[:, 0, 2] + 1], axis=-1)
  else:
    hw = np.asarray(image_hw, np.float64)
    if hw.shape == (2,):
      hw = np.broadcast_to(hw, (s, 2))
    if hw.shape != (s, 2):
      raise ValueError(f"{who}: image_hw must be (H, W) or ({s}, 2), got {np.shape(image_hw)}")
  ok = np.isfinite(e).all(axis=(1, 2)) & np.isfinite(k).all(axis=(1, 2))
  ok &= np.isfinite(hw).all(axis=1) & (hw > 0).all(axis=1)
  with np.errstate(all="ignore"):
    ok &= np.abs(np.linalg.det(np.where(ok[:, None, None], k, np.eye(3)))) > 1e-12
    ok &= np.abs(np.linalg.det(np.where(ok[:, None, None], e[:, :3, :3], np.eye(3)))) > 1e-12
  e, k, hw = e[ok], k[ok], hw[ok]
  return np.linalg.inv(e) if len(e) else e, k, hw


def _frustums(c2w: np.ndarray, k: np.ndarray, hw: np.ndarray, depth: float) -> np.ndarray:
  """``(S, 16, 3)`` line-segment vertices: centre to the 4 image corners at camera depth
  ``depth``, then the image rectangle (as :func:`geojax.io.render.frustum_lines`)."""
  s = len(c2w)
  h, w = hw[:, 0], hw[:, 1]
  lo, one = np.full(s, -0.5), np.ones(s)
  pix = np.stack([np.stack([lo, lo, one], -1), np.stack([w - 0.5, lo, one], -1),
                  np.stack([w - 0.5, h - 0.5, one], -1), np.stack([lo, h - 0.5, one], -1)], 1)
  rays = np.einsum("sij,snj->sni", np.linalg.inv(k), pix)
  z = rays[..., 2:3]
  rays = rays / np.where(np.abs(z) < 1e-12, 1.0, z) * depth
  corners = np.einsum("sij,snj->sni", c2w[:, :3, :3], rays) + c2w[:, None, :3, 3]
  centre = np.broadcast_to(c2w[:, None, :3, 3], (s, 4, 3))
  spokes = np.stack([centre, corners], axis=2)
  rim = np.stack([corners, np.roll(corners, -1, axis=1)], axis=2)
  return np.concatenate([spokes, rim], axis=1).reshape(s, 16, 3)


def _unit(v: np.ndarray, fallback: np.ndarray) -> np.ndarray:
  n = float(np.linalg.norm(v))
  return v / n if n > 1e-9 else fallback


def viewer_html(xyz: Any, rgb: Any, *, extrinsics: Any = None, intrinsics: Any = None,
                image_hw: Any = None, depth: Any = None, max_points: int = 200_000, seed: int = 0,
                element_id: str = "geojax-viewer") -> str:
  """A self-contained HTML fragment with an interactive WebGL view of points and cameras.

  Args:
    xyz: ``(N, 3)`` world points (OpenCV axes). Points with a non-finite (or absurd, beyond
      1e30) coordinate or a non-finite ``depth`` are dropped.
    rgb: ``uint8 (N, 3)`` colours (floats are read as [0, 1] when none exceeds 1, else as
      [0, 255]), or None (grey).
    extrinsics, intrinsics, image_hw: optional cameras drawn as frustums (see the module
      docstring); cameras with non-finite or singular matrices are skipped. The first usable
      camera sets the initial view and the orbit's up axis.
    depth: optional ``(N,)`` values for the "depth" colour mode; by default the z of each point
      in the first camera's frame (the world z without cameras).
    max_points: embed a uniform random subset (``seed``, deterministic) of at most this many
      points.
    element_id: the ``id`` of the container ``<div>``; give every viewer on a page its own.

  Returns:
    The fragment (a string); see the module docstring for what the page around it needs.
  """
  who = "viewer_html"
  if not isinstance(element_id, str) or not _ID.match(element_id):
    raise ValueError(f"{who}: element_id must match [A-Za-z][A-Za-z0-9_-]*, got {element_id!r}")
  if int(max_points) != max_points or max_points < 0:
    raise ValueError(f"{who}: max_points must be a non-negative integer, got {max_points}")
  pts = np.asarray(xyz)
  if pts.size == 0 and pts.ndim < 2:
    pts = pts.reshape(0, 3)
  if pts.ndim != 2 or pts.shape[1] != 3:
    raise ValueError(f"{who}: xyz must have shape (N, 3), got {pts.shape}")
  if not (np.issubdtype(pts.dtype, np.floating) or np.issubdtype(pts.dtype, np.integer)):
    raise ValueError(f"{who}: xyz must hold real numbers, got dtype {pts.dtype}")
  n_in = len(pts)
  if rgb is None:
    col = np.full((n_in, 3), 160, np.uint8)
  else:
    col = np.asarray(rgb)
    if col.size == 0 and n_in == 0:
      col = col.reshape(0, 3)
    if col.shape != (n_in, 3):
      raise ValueError(f"{who}: rgb must have shape {(n_in, 3)} like xyz, got {col.shape}")
    if np.issubdtype(col.dtype, np.floating):
      col = np.nan_to_num(col.astype(np.float64), posinf=0.0, neginf=0.0)
      col = np.rint(col * 255 if col.size == 0 or col.max() <= 1.0 else col)
    col = np.clip(col, 0, 255).astype(np.uint8)
  if depth is not None:
    dep = np.asarray(depth, np.float64).reshape(-1)
    if dep.shape != (n_in,):
      raise ValueError(f"{who}: depth must have shape ({n_in},), got {np.shape(depth)}")
  if extrinsics is None and (intrinsics is not None or image_hw is not None):
    raise ValueError(f"{who}: intrinsics/image_hw were given without extrinsics")

  with np.errstate(invalid="ignore"):
    keep = (np.abs(pts) < _HUGE).all(axis=1)  # also drops NaN and +-inf
  if depth is not None:
    keep &= np.isfinite(dep)
  idx = np.flatnonzero(keep)
  if idx.size > max_points:
    idx = np.sort(np.random.default_rng(seed).choice(idx, size=int(max_points), replace=False))
  pts, col = pts[idx].astype(np.float64), col[idx]
  dep = dep[idx] if depth is not None else None
  n = len(pts)

  if extrinsics is not None:
    c2w, k, hw = _cameras(extrinsics, intrinsics, image_hw)
  else:
    c2w, k, hw = np.zeros((0, 4, 4)), np.zeros((0, 3, 3)), np.zeros((0, 2))
  s = len(c2w)

  # Centre and scale from a sample, with percentiles so that stray points do not matter.
  rng = np.random.default_rng(seed)
  sample = pts[rng.integers(0, n, _STATS_SAMPLE)] if n > _STATS_SAMPLE else pts
  centres = c2w[:, :3, 3]
  if n:
    q2, q5, q95, q98 = np.percentile(sample, [2, 5, 95, 98], axis=0)
    centre = (q2 + q98) / 2
    scale = float(np.linalg.norm(q95 - q5))
    radius = 0.5 * float(np.linalg.norm(q98 - q2))
    corners = np.stack(np.meshgrid(*np.stack([q2, q98], 1), indexing="ij"), -1).reshape(8, 3)
    box = corners - centre
  else:
    centre = centres.mean(axis=0) if s else np.zeros(3)
    scale = radius = 0.0
    box = np.zeros((0, 3))
  spread = float(np.linalg.norm(np.ptp(centres, axis=0))) if s else 0.0
  scale = scale if scale > 1e-9 * max(1.0, float(np.abs(centre).max())) else (spread or 1.0)
  lines = (_frustums(c2w, k, hw, _CAMERA_SIZE * scale) - centre).reshape(-1, 3)
  rel = pts - centre
  far_radius = float(np.sqrt((rel ** 2).sum(axis=1).max())) if n else 0.0
  if len(lines):
    cam_radius = float(np.sqrt((lines ** 2).sum(axis=1).max()))
    radius, far_radius = max(radius, cam_radius), max(far_radius, cam_radius)
  radius = radius if radius > 0 else max(scale, 1.0) * 0.5
  far_radius = max(far_radius, radius)

  # Orbit frame: the first camera's axes (world axes without cameras).
  down, fwd = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0])
  if s:
    rot = c2w[0, :3, :3]
    down = _unit(rot[:, 1], down)
    fwd = _unit(rot[:, 2] - np.dot(rot[:, 2], down) * down, _unit(np.cross(
        down, np.eye(3)[np.argmin(np.abs(down))]), fwd))
  right = np.cross(down, fwd)

  # Depth colours: 256 levels of the colorize_depth map (near is bright, 2nd-98th percentiles).
  if dep is None:
    w2c0 = np.linalg.inv(c2w[0]) if s else np.eye(4)
    dep = pts @ w2c0[2, :3] + w2c0[2, 3]
    dep_label = "z in camera 1" if s else "world z"
  else:
    dep_label = "depth"
  if n:
    dlo, dhi = (float(v) for v in np.percentile(dep if n <= _STATS_SAMPLE else
                                                dep[rng.integers(0, n, _STATS_SAMPLE)], [2, 98]))
    dhi = max(dhi, dlo + 1e-6 * max(1.0, abs(dlo)))
    level = np.rint(np.clip(1.0 - (dep - dlo) / (dhi - dlo), 0, 1) * 255).astype(np.uint8)
  else:
    dlo, dhi, level = 0.0, 1.0, np.zeros(0, np.uint8)
  lut = colormap(np.arange(256) / 255.0)

  meta = {
      "n": n, "cams": s, "centre": centre.tolist(), "radius": radius, "farRadius": far_radius,
      "box": box.ravel().tolist(), "down": down.tolist(), "fwd": fwd.tolist(),
      "right": right.tolist(),
      "depthLo": dlo, "depthHi": dhi, "depthLabel": dep_label,
      "pos": _b64(rel.astype("<f4")), "col": _b64(col), "level": _b64(level), "lut": _b64(lut),
      "linePos": _b64(lines.astype("<f4")),
      "lineCol": _b64(np.repeat(camera_colors(s), 16, axis=0)),
  }
  data = json.dumps(meta, separators=(",", ":")).replace("</", "<\\/")
  ident = json.dumps(element_id)
  script = _SCRIPT.replace("__ID__", ident).replace("__DATA__", data)
  css = _CSS.replace("#ID", "#" + element_id)
  cams = "" if s else " disabled"
  return (
      f'<div id="{element_id}" class="geojax-viewer" data-status="loading" data-points="{n}">\n'
      f"<style>{css}</style>\n"
      '<div class="gv-bar">'
      '<label>point size <input class="gv-size" type="range" min="1" max="10" step="0.5" '
      'value="2"></label> '
      '<label>colour <select class="gv-mode"><option value="rgb">RGB</option>'
      '<option value="depth">depth</option></select></label> '
      f'<label><input class="gv-cams" type="checkbox" checked{cams}> cameras ({s})</label> '
      '<button class="gv-reset" type="button">reset view</button> '
      f'<span class="gv-info">{n} points</span></div>\n'
      '<div class="gv-stage"><canvas class="gv-canvas"></canvas>'
      '<div class="gv-msg"></div></div>\n'
      '<div class="gv-help">left drag: orbit &middot; right or shift drag: pan &middot; '
      'wheel: zoom</div>\n'
      f"<script>{script}</script>\n</div>\n")


def standalone_page(fragment: str, title: str) -> str:
  """A minimal full HTML page (UTF-8, inline favicon, no external resources) around
  ``fragment``."""
  return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
          '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
          '<link rel="icon" href="data:,">\n'
          f"<title>{html.escape(title)}</title>\n"
          "<style>body { font-family: sans-serif; margin: 1em; color: #222; }</style>\n"
          f"</head><body>\n{fragment}</body></html>\n")


_CSS = """
#ID { max-width: 1200px; font: 13px sans-serif; }
#ID .gv-bar { padding: 4px 0; display: flex; flex-wrap: wrap; gap: 12px; align-items: center; }
#ID .gv-stage { position: relative; height: 520px; background: #1c1c21; }
#ID .gv-canvas { display: block; width: 100%; height: 100%; touch-action: none;
  cursor: grab; outline: none; }
#ID .gv-msg { display: none; position: absolute; left: 0; top: 0; right: 0; padding: 1em;
  color: #eee; }
#ID .gv-help { color: #666; font-size: 12px; padding-top: 2px; }
"""

# The viewer script: plain WebGL 1, no library. __ID__ and __DATA__ are filled in by viewer_html.
_SCRIPT = r"""
(function () {
  "use strict";
  var root = document.getElementById(__ID__);
  if (!root) { return; }
  var D = __DATA__;
  var canvas = root.querySelector(".gv-canvas");
  var msg = root.querySelector(".gv-msg");
  var info = root.querySelector(".gv-info");
  var BG = [28, 28, 33];

  function fail(status, text) {
    root.setAttribute("data-status", status);
    msg.textContent = text;
    msg.style.display = "block";
  }

  function bytes(s) {
    var bin = atob(s), n = bin.length, u = new Uint8Array(n);
    for (var i = 0; i < n; i++) { u[i] = bin.charCodeAt(i); }
    return u;
  }

  function floats(s) {
    var u = bytes(s), m = u.length >> 2;
    if (new Uint8Array(new Uint16Array([1]).buffer)[0] === 1) {
      return new Float32Array(u.buffer, 0, m);
    }
    var dv = new DataView(u.buffer), out = new Float32Array(m);
    for (var i = 0; i < m; i++) { out[i] = dv.getFloat32(4 * i, true); }
    return out;
  }

  function shader(gl, type, src) {
    var sh = gl.createShader(type);
    gl.shaderSource(sh, src);
    gl.compileShader(sh);
    if (!gl.getShaderParameter(sh, gl.COMPILE_STATUS)) {
      throw new Error("shader: " + gl.getShaderInfoLog(sh));
    }
    return sh;
  }

  function buffer(gl, data) {
    var b = gl.createBuffer();
    gl.bindBuffer(gl.ARRAY_BUFFER, b);
    gl.bufferData(gl.ARRAY_BUFFER, data, gl.STATIC_DRAW);
    return b;
  }

  function mul(a, b) {  // column-major 4x4 product a * b
    var o = new Float32Array(16);
    for (var c = 0; c < 4; c++) {
      for (var r = 0; r < 4; r++) {
        var v = 0;
        for (var k = 0; k < 4; k++) { v += a[k * 4 + r] * b[c * 4 + k]; }
        o[c * 4 + r] = v;
      }
    }
    return o;
  }

  function main() {
    var opts = {preserveDrawingBuffer: true, antialias: false, alpha: false};
    var gl = null;
    try {
      gl = canvas.getContext("webgl", opts) || canvas.getContext("experimental-webgl", opts);
    } catch (e) { gl = null; }
    if (!gl) {
      canvas.style.display = "none";
      fail("no-webgl", "This browser cannot show the 3D viewer: WebGL is not available.");
      return;
    }
    canvas.addEventListener("webglcontextlost", function (e) {
      e.preventDefault();
      fail("error: WebGL context lost", "The 3D viewer lost its WebGL context; reload the page.");
    });

    var prog = gl.createProgram();
    gl.attachShader(prog, shader(gl, gl.VERTEX_SHADER,
      "attribute vec3 a_pos; attribute vec3 a_col; uniform mat4 u_mvp; uniform float u_size;" +
      "varying vec3 v_col; void main() { gl_Position = u_mvp * vec4(a_pos, 1.0);" +
      " gl_PointSize = u_size; v_col = a_col; }"));
    gl.attachShader(prog, shader(gl, gl.FRAGMENT_SHADER,
      "precision mediump float; varying vec3 v_col; uniform float u_round;" +
      "void main() { if (u_round > 0.5) { vec2 d = gl_PointCoord - vec2(0.5);" +
      " if (dot(d, d) > 0.25) discard; } gl_FragColor = vec4(v_col, 1.0); }"));
    gl.linkProgram(prog);
    if (!gl.getProgramParameter(prog, gl.LINK_STATUS)) {
      throw new Error("link: " + gl.getProgramInfoLog(prog));
    }
    var aPos = gl.getAttribLocation(prog, "a_pos");
    var aCol = gl.getAttribLocation(prog, "a_col");
    var uMvp = gl.getUniformLocation(prog, "u_mvp");
    var uSize = gl.getUniformLocation(prog, "u_size");
    var uRound = gl.getUniformLocation(prog, "u_round");

    var pos = floats(D.pos), col = bytes(D.col), level = bytes(D.level), lut = bytes(D.lut);
    var n = Math.floor(pos.length / 3);
    if (n !== D.n || col.length !== 3 * n || level.length !== n) {
      throw new Error("corrupt point data");
    }
    var dcol = new Uint8Array(3 * n);
    for (var i = 0; i < n; i++) {
      var l = 3 * level[i];
      dcol[3 * i] = lut[l]; dcol[3 * i + 1] = lut[l + 1]; dcol[3 * i + 2] = lut[l + 2];
    }
    var linePos = floats(D.linePos), lineCol = bytes(D.lineCol);
    var nLine = Math.floor(linePos.length / 3);
    var bPos = buffer(gl, pos), bRgb = buffer(gl, col), bDepth = buffer(gl, dcol);
    var bLinePos = buffer(gl, linePos), bLineCol = buffer(gl, lineCol);
    var sizeRange = gl.getParameter(gl.ALIASED_POINT_SIZE_RANGE) || [1, 64];

    var ui = {
      size: root.querySelector(".gv-size"), mode: root.querySelector(".gv-mode"),
      cams: root.querySelector(".gv-cams"), reset: root.querySelector(".gv-reset")
    };
    var FOVY = 50 * Math.PI / 180;
    var view = {};
    function reset() {  // fit the percentile box of the points and every frustum vertex
      var w = canvas.clientWidth || 640, h = canvas.clientHeight || 480;
      var ty = 0.92 * Math.tan(FOVY / 2), tx = ty * w / h;
      view.target = [0, 0, 0];
      view.yaw = 0;
      view.pitch = 0.35;
      var a = axes(), dist = 0.1 * D.radius;
      function fit(p, m) {
        for (var i = 0; i + 2 < m; i += 3) {
          var c = [0, 0, 0];
          for (var j = 0; j < 3; j++) {
            for (var k = 0; k < 3; k++) { c[j] += a[j][k] * p[i + k]; }
          }
          dist = Math.max(dist, Math.max(Math.abs(c[0]) / tx, Math.abs(c[1]) / ty) - c[2]);
        }
      }
      fit(D.box, D.box.length);
      fit(linePos, linePos.length);
      view.dist = dist;
    }
    reset();

    function axes() {  // right, down, forward of the virtual camera (OpenCV axes)
      var cy = Math.cos(view.yaw), sy = Math.sin(view.yaw);
      var cp = Math.cos(view.pitch), sp = Math.sin(view.pitch);
      var f = [], r = [];
      for (var k = 0; k < 3; k++) {
        f[k] = cp * (cy * D.fwd[k] + sy * D.right[k]) + sp * D.down[k];
        r[k] = cy * D.right[k] - sy * D.fwd[k];
      }
      var d = [f[1] * r[2] - f[2] * r[1], f[2] * r[0] - f[0] * r[2], f[0] * r[1] - f[1] * r[0]];
      return [r, d, f];
    }

    function mvp(w, h) {
      var a = axes(), r = a[0], d = a[1], f = a[2], eye = [];
      for (var k = 0; k < 3; k++) { eye[k] = view.target[k] - view.dist * f[k]; }
      function dot(u, v) { return u[0] * v[0] + u[1] * v[1] + u[2] * v[2]; }
      // World to GL eye space: OpenCV camera axes with y and z flipped.
      var V = new Float32Array([
        r[0], -d[0], -f[0], 0, r[1], -d[1], -f[1], 0, r[2], -d[2], -f[2], 0,
        -dot(r, eye), dot(d, eye), dot(f, eye), 1]);
      var off = Math.sqrt(dot(view.target, view.target));
      var far = view.dist + off + 1.5 * D.farRadius;
      var near = Math.max(view.dist * 0.01, far * 1e-6);
      var t = 1 / Math.tan(FOVY / 2);
      var P = new Float32Array([
        t * h / w, 0, 0, 0, 0, t, 0, 0, 0, 0, (far + near) / (near - far), -1,
        0, 0, 2 * far * near / (near - far), 0]);
      return mul(P, V);
    }

    function attrib(loc, buf, size, type, norm) {
      gl.bindBuffer(gl.ARRAY_BUFFER, buf);
      gl.enableVertexAttribArray(loc);
      gl.vertexAttribPointer(loc, size, type, norm, 0, 0);
    }

    function draw(withCameras) {
      var dpr = window.devicePixelRatio || 1;
      var w = Math.max(1, Math.round((canvas.clientWidth || 640) * dpr));
      var h = Math.max(1, Math.round((canvas.clientHeight || 480) * dpr));
      if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
      gl.viewport(0, 0, w, h);
      gl.clearColor(BG[0] / 255, BG[1] / 255, BG[2] / 255, 1);
      gl.enable(gl.DEPTH_TEST);
      gl.clear(gl.COLOR_BUFFER_BIT | gl.DEPTH_BUFFER_BIT);
      gl.useProgram(prog);
      gl.uniformMatrix4fv(uMvp, false, mvp(w, h));
      if (n > 0) {
        var size = Math.min(Math.max(parseFloat(ui.size.value) * dpr, sizeRange[0]),
                            sizeRange[1]);
        gl.uniform1f(uSize, size);
        gl.uniform1f(uRound, size >= 3 ? 1 : 0);
        attrib(aPos, bPos, 3, gl.FLOAT, false);
        attrib(aCol, ui.mode.value === "depth" ? bDepth : bRgb, 3, gl.UNSIGNED_BYTE, true);
        gl.drawArrays(gl.POINTS, 0, n);
      }
      if (withCameras && nLine > 0 && ui.cams.checked) {
        gl.uniform1f(uSize, 1);
        gl.uniform1f(uRound, 0);
        attrib(aPos, bLinePos, 3, gl.FLOAT, false);
        attrib(aCol, bLineCol, 3, gl.UNSIGNED_BYTE, true);
        gl.drawArrays(gl.LINES, 0, nLine);
      }
    }

    function lit() {
      var w = canvas.width, h = canvas.height, px = new Uint8Array(4 * w * h), c = 0;
      gl.readPixels(0, 0, w, h, gl.RGBA, gl.UNSIGNED_BYTE, px);
      for (var i = 0; i < px.length; i += 4) {
        if (Math.abs(px[i] - BG[0]) > 2 || Math.abs(px[i + 1] - BG[1]) > 2 ||
            Math.abs(px[i + 2] - BG[2]) > 2) { c++; }
      }
      return c;
    }

    var pending = false, frames = 1;
    function redraw() {
      if (pending) { return; }
      pending = true;
      var go = function () {
        pending = false;
        draw(true);
        root.setAttribute("data-frames", String(++frames));
      };
      if (window.requestAnimationFrame) {
        window.requestAnimationFrame(go);
      } else {
        setTimeout(go, 16);
      }
    }

    function legend() {
      if (ui.mode.value === "depth" && n > 0) {
        info.textContent = n + " points; " + D.depthLabel + ": bright " +
          D.depthLo.toPrecision(3) + " to dark " + D.depthHi.toPrecision(3);
      } else {
        info.textContent = n + " points";
      }
    }

    // Mouse, pen and touch: left drag orbits, right (or shift) drag pans, the wheel zooms.
    var drag = null;
    canvas.addEventListener("contextmenu", function (e) { e.preventDefault(); });
    canvas.addEventListener("pointerdown", function (e) {
      drag = {x: e.clientX, y: e.clientY, pan: e.button === 2 || e.button === 1 || e.shiftKey};
      try { canvas.setPointerCapture(e.pointerId); } catch (err) { /* no capture: still fine */ }
      e.preventDefault();
    });
    canvas.addEventListener("pointermove", function (e) {
      if (!drag) { return; }
      var dx = e.clientX - drag.x, dy = e.clientY - drag.y;
      drag.x = e.clientX; drag.y = e.clientY;
      if (drag.pan) {
        var a = axes(), s = 2 * view.dist * Math.tan(FOVY / 2) / (canvas.clientHeight || 480);
        for (var k = 0; k < 3; k++) { view.target[k] -= s * (dx * a[0][k] + dy * a[1][k]); }
      } else {
        view.yaw += dx * 0.008;
        view.pitch = Math.max(-1.55, Math.min(1.55, view.pitch + dy * 0.008));
      }
      redraw();
    });
    function end() { drag = null; }
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);
    canvas.addEventListener("wheel", function (e) {
      e.preventDefault();
      var dy = e.deltaY * (e.deltaMode === 1 ? 33 : e.deltaMode === 2 ? 400 : 1);
      view.dist *= Math.exp(Math.max(-1, Math.min(1, dy * 0.0015)));
      view.dist = Math.max(D.radius * 1e-4, Math.min(view.dist, D.farRadius * 1e3 + D.radius));
      redraw();
    }, {passive: false});
    ui.size.addEventListener("input", redraw);
    ui.mode.addEventListener("change", function () { legend(); redraw(); });
    ui.cams.addEventListener("change", redraw);
    ui.reset.addEventListener("click", function () { reset(); redraw(); });
    window.addEventListener("resize", redraw);

    // First frame, drawn now: count the lit pixels of the points alone, then with the cameras.
    draw(false);
    var litPoints = lit();
    draw(true);
    root.setAttribute("data-points", String(n));
    root.setAttribute("data-lit-points", String(litPoints));
    root.setAttribute("data-lit", String(lit()));
    if (n === 0 && nLine === 0) {  // not an error: there is just nothing to draw
      msg.textContent = "Nothing to show: the point cloud is empty.";
      msg.style.display = "block";
    }
    root.setAttribute("data-frames", "1");
    root.setAttribute("data-status", "drawn");
    legend();
  }

  try {
    main();
  } catch (e) {
    var m = (e && e.message) ? e.message : String(e);
    fail("error: " + m, "The 3D viewer failed: " + m);
  }
})();
"""
