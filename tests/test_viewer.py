"""Tests for geojax.io.viewer: the embedded data in pure Python (subsampling, non-finite input,
float32 precision, empty clouds, no external references) and the page in a real browser.

The browser tests open pages from disk (``file://``) in headless Chromium with SwiftShader
WebGL. Every http/https request Chromium makes goes to a logging proxy on 127.0.0.1 that answers
502, so "the viewer makes no network request" is checked, and a negative control page with an
external image and script shows that the proxy does see requests. They need ``chromium`` (the
Makefile's ``browser`` step installs it); they fail when it is missing, unless
GEOJAX_SKIP_BROWSER=1 (then they are skipped).
"""

from __future__ import annotations

import base64
import html.parser
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading

import numpy as np
import pytest

from geojax.io.viewer import standalone_page, viewer_html

VIEWER_BG = (28, 28, 33)  # the viewer's clear colour


# -------------------------------------------------------------------------------------------------
# A synthetic scene: a floor (red), a back wall (green) and a left wall (blue) in front of three
# cameras that look along +z (OpenCV world: y down).
# -------------------------------------------------------------------------------------------------

def _scene(m: int = 1500, seed: int = 0):
  rng = np.random.default_rng(seed)
  u, v = rng.uniform(0, 1, (2, m))
  floor = np.stack([u * 4 - 2, np.full(m, 1.0), v * 6 + 1], 1)
  wall = np.stack([u * 4 - 2, v * 2.5 - 1.5, np.full(m, 7.0)], 1)
  side = np.stack([np.full(m, -2.0), v * 2.5 - 1.5, u * 6 + 1], 1)
  xyz = np.concatenate([floor, wall, side])
  base = np.repeat(np.array([[220, 50, 50], [50, 220, 50], [60, 90, 235]]), m, axis=0)
  rgb = (base * (0.7 + 0.3 * np.tile(u, 3))[:, None]).astype(np.uint8)
  ext = []
  for i, x in enumerate([-0.6, 0.0, 0.6]):
    a = np.radians(10.0 * (i - 1))
    c2w = np.eye(4)
    c2w[:3, :3] = [[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]
    c2w[:3, 3] = [x, 0.0, 0.0]
    ext.append(np.linalg.inv(c2w))
  k = np.array([[300.0, 0, 159.5], [0, 300, 119.5], [0, 0, 1]])
  return xyz, rgb, np.stack(ext), np.stack([k] * 3)


def _data(fragment: str) -> dict:
  """The JSON the fragment's script embeds, with its arrays decoded."""
  m = re.search(r"var D = (\{.*?\});\n", fragment)
  assert m, "embedded data not found"
  d = json.loads(m.group(1).replace("<\\/", "</"))
  d["pos"] = np.frombuffer(base64.b64decode(d["pos"]), "<f4").reshape(-1, 3)
  d["col"] = np.frombuffer(base64.b64decode(d["col"]), np.uint8).reshape(-1, 3)
  d["level"] = np.frombuffer(base64.b64decode(d["level"]), np.uint8)
  d["linePos"] = np.frombuffer(base64.b64decode(d["linePos"]), "<f4").reshape(-1, 3)
  return d


class _Tags(html.parser.HTMLParser):
  """Start/end tag balance and the attributes of every element that has an id."""

  def __init__(self):
    super().__init__()
    self.stack, self.errors, self.ids = [], [], {}

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    if "id" in a:
      self.ids[a["id"]] = a
    if tag not in ("input", "meta", "link", "br", "img"):
      self.stack.append(tag)

  def handle_endtag(self, tag):
    if not self.stack or self.stack[-1] != tag:
      self.errors.append(f"unexpected </{tag}> (open: {self.stack[-3:]})")
    else:
      self.stack.pop()


def _parse(page: str) -> _Tags:
  p = _Tags()
  p.feed(page)
  p.close()
  return p


# -------------------------------------------------------------------------------------------------
# Pure Python
# -------------------------------------------------------------------------------------------------

def test_subsampling_is_deterministic_and_bounded():
  xyz, rgb, ext, k = _scene()
  a = viewer_html(xyz, rgb, extrinsics=ext, intrinsics=k, image_hw=(240, 320), max_points=1000)
  b = viewer_html(xyz, rgb, extrinsics=ext, intrinsics=k, image_hw=(240, 320), max_points=1000)
  c = viewer_html(xyz, rgb, extrinsics=ext, intrinsics=k, image_hw=(240, 320), max_points=1000,
                  seed=1)
  assert a == b and a != c
  d = _data(a)
  assert d["n"] == 1000 and d["pos"].shape == (1000, 3) and d["col"].shape == (1000, 3)
  assert 'data-points="1000"' in a
  # Every embedded point (plus the centre) is one of the input points, with its own colour.
  world = d["pos"].astype(np.float64) + d["centre"]
  dist = np.linalg.norm(world[:, None] - xyz[None], axis=-1)
  nearest = dist.argmin(axis=1)
  assert dist.min(axis=1).max() < 1e-5 and len(np.unique(nearest)) == 1000
  np.testing.assert_array_equal(d["col"], rgb[nearest])
  assert d["cams"] == 3 and d["linePos"].shape == (3 * 16, 3)
  full = _data(viewer_html(xyz, rgb))
  assert full["n"] == len(xyz) and full["cams"] == 0


def test_precision_far_from_the_origin():
  xyz, rgb, _, _ = _scene(200)
  far = xyz * 1e-3 + [12345.0, -6789.0, 40000.0]  # a 7 mm scene 40 km away
  d = _data(viewer_html(far, rgb))
  np.testing.assert_allclose(d["pos"].astype(np.float64) + d["centre"], far, rtol=0, atol=1e-7)


def test_non_finite_points_depth_and_cameras_are_dropped():
  xyz, rgb, ext, k = _scene(100)
  xyz = xyz.copy()
  xyz[[0, 5]] = np.nan
  xyz[7, 2] = np.inf
  depth = np.linalg.norm(xyz, axis=1)
  depth[9] = np.nan
  xyz[8, 1] = -1e300
  ext = ext.copy()
  ext[1, 0, 3] = np.nan
  frag = viewer_html(xyz, rgb, extrinsics=ext, intrinsics=k, depth=depth)
  d = _data(frag)
  assert d["n"] == 300 - 5 and d["cams"] == 2
  assert np.isfinite(d["pos"]).all() and np.isfinite(d["linePos"]).all()
  assert d["depthLabel"] == "depth" and np.isfinite([d["depthLo"], d["depthHi"]]).all()
  assert "NaN" not in frag and "Infinity" not in frag


def test_default_depth_is_z_in_the_first_camera():
  xyz, rgb, ext, k = _scene(300)
  z = (xyz @ ext[0, :3, :3].T + ext[0, :3, 3])[:, 2]
  a = _data(viewer_html(xyz, rgb, extrinsics=ext, intrinsics=k))
  b = _data(viewer_html(xyz, rgb, extrinsics=ext, intrinsics=k, depth=z))
  np.testing.assert_array_equal(a["level"], b["level"])
  assert a["depthLabel"] == "z in camera 1"
  # Near is bright: the highest colour-map level goes to the nearest points.
  assert a["level"][z.argmin()] == 255 and a["level"][z.argmax()] == 0


def test_empty_cloud_and_cameras_only_are_valid_html():
  _, _, ext, k = _scene(10)
  for frag in (viewer_html(np.zeros((0, 3)), np.zeros((0, 3), np.uint8)),
               viewer_html([], None, extrinsics=ext, intrinsics=k),
               viewer_html(np.full((5, 3), np.nan), np.zeros((5, 3), np.uint8))):
    page = standalone_page(frag, "empty")
    p = _parse(page)
    assert not p.errors and p.stack == [], (p.errors, p.stack)
    assert p.ids["geojax-viewer"]["data-points"] == "0"
    assert _data(frag)["n"] == 0


def test_no_external_references():
  xyz, rgb, ext, k = _scene(100)
  page = standalone_page(viewer_html(xyz, rgb, extrinsics=ext, intrinsics=k), "a <b> & c")
  low = page.lower()
  assert "http:" not in low and "https:" not in low
  for pattern in (r"\bsrc\s*=", r"url\(", r"@import", r"\bfetch\(", r"xmlhttprequest",
                  r"websocket", r"eventsource", r"\bimport\(", r"sendbeacon"):
    assert not re.search(pattern, low), pattern
  # The only href is the inline favicon.
  assert re.findall(r'href="([^"]*)"', page) == ["data:,"]
  assert '<meta charset="utf-8">' in page and "<title>a &lt;b&gt; &amp; c</title>" in page


def test_bad_inputs():
  xyz, rgb, ext, k = _scene(10)
  with pytest.raises(ValueError, match="xyz"):
    viewer_html(xyz[:, :2], rgb)
  with pytest.raises(ValueError, match="rgb"):
    viewer_html(xyz, rgb[:5])
  with pytest.raises(ValueError, match="depth"):
    viewer_html(xyz, rgb, depth=np.zeros(3))
  with pytest.raises(ValueError, match="intrinsics"):
    viewer_html(xyz, rgb, extrinsics=ext)
  with pytest.raises(ValueError, match="element_id"):
    viewer_html(xyz, rgb, element_id='x" onload="alert(1)')
  with pytest.raises(ValueError, match="max_points"):
    viewer_html(xyz, rgb, max_points=-1)


# -------------------------------------------------------------------------------------------------
# In the browser
# -------------------------------------------------------------------------------------------------

def _find_chromium() -> str | None:
  for name in (os.environ.get("GEOJAX_CHROMIUM"), "chromium", "/usr/bin/chromium",
               "chromium-browser", "google-chrome"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


@pytest.fixture(scope="module")
def chromium() -> str:
  if os.environ.get("GEOJAX_SKIP_BROWSER") == "1":
    pytest.skip("GEOJAX_SKIP_BROWSER=1")
  exe = _find_chromium()
  if exe is None:
    pytest.fail("chromium is not installed: `make browser` installs it (apt-get install "
                "chromium), or set GEOJAX_SKIP_BROWSER=1 to skip the browser tests", False)
  return exe


class _LoggingProxy(http.server.BaseHTTPRequestHandler):
  """Records every request line it receives and answers 502 (nothing is forwarded)."""

  def _refuse(self):
    self.server.seen.append(self.requestline)
    self.send_response(502)
    self.send_header("Content-Length", "0")
    self.send_header("Connection", "close")
    self.end_headers()

  do_GET = do_POST = do_HEAD = do_PUT = do_OPTIONS = do_CONNECT = do_DELETE = do_PATCH = _refuse

  def log_message(self, *args):
    pass


@pytest.fixture
def proxy():
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LoggingProxy)
  server.seen = []
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield server
  finally:
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def workdir():
  with tempfile.TemporaryDirectory(prefix="geojax-viewer-", ignore_cleanup_errors=True) as d:
    yield d


def _browse(exe: str, page: str, workdir: str, proxy, *, screenshot: bool = False,
            extra: tuple[str, ...] = (), timeout: float = 60.0) -> tuple[str, str | None]:
  """Open ``page`` (HTML text, written to ``workdir``) from disk; return (dumped DOM, screenshot
  path or None). All http/https traffic goes to ``proxy``."""
  path = os.path.join(workdir, "page.html")
  with open(path, "w", encoding="utf-8") as f:
    f.write(page)
  profile = tempfile.mkdtemp(prefix="profile-", dir=workdir)
  shot = os.path.join(workdir, "shot.png")
  args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--use-angle=swiftshader",
          "--enable-unsafe-swiftshader", "--disable-dev-shm-usage",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--disable-default-apps", "--disable-extensions", "--disable-domain-reliability",
          "--disable-client-side-phishing-detection", "--no-first-run",
          "--no-default-browser-check", f"--user-data-dir={profile}",
          # Chromium's own background traffic (network time, component updates, the Google
          # account check) would reach the proxy too: switch it off, or point it at port 9,
          # which Chromium refuses to connect to, so that what the proxy sees is the page's.
          "--disable-features=NetworkTimeServiceQuerying",
          "--component-updater=url-source=http://127.0.0.1:9/", "--gaia-url=http://127.0.0.1:9/",
          f"--proxy-server=http://127.0.0.1:{proxy.server_address[1]}",
          "--proxy-bypass-list=<-loopback>", "--window-size=1000,800", "--hide-scrollbars",
          "--force-device-scale-factor=1", "--virtual-time-budget=5000", "--dump-dom"]
  if screenshot:
    args.append(f"--screenshot={shot}")
  args += extra
  env = dict(os.environ, HOME=workdir, XDG_CONFIG_HOME=workdir, XDG_CACHE_HOME=workdir)
  proc = subprocess.Popen(args + ["file://" + path], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=env, start_new_session=True)
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    pytest.fail(f"chromium did not finish within {timeout} s")
  finally:
    try:  # the renderer and GPU processes share the session; leave nothing behind
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  dom = out.decode("utf-8", "replace")
  assert proc.returncode == 0 and "<html" in dom, (
      f"chromium failed (rc {proc.returncode}): {err.decode('utf-8', 'replace')[-2000:]}")
  return dom, (shot if screenshot else None)


def _page_with_viewers() -> str:
  xyz, rgb, ext, k = _scene()
  z = xyz[:, 2]
  parts = [
      viewer_html(xyz, rgb, extrinsics=ext, intrinsics=k, image_hw=(240, 320), element_id="main"),
      viewer_html(np.zeros((0, 3)), None, element_id="empty"),
      viewer_html([], None, extrinsics=ext, intrinsics=k, element_id="camsonly"),
      viewer_html(xyz[::7], None, depth=z[::7], element_id="nocams"),
  ]
  return standalone_page("\n".join(parts), "geojax viewer test")


def test_browser_draws_offline(chromium, proxy, workdir):
  from PIL import Image

  dom, shot = _browse(chromium, _page_with_viewers(), workdir, proxy, screenshot=True)
  ids = _parse(dom).ids
  status = {k: ids[k].get("data-status") for k in ("main", "empty", "camsonly", "nocams")}
  assert all(v == "drawn" for v in status.values()), status
  main = ids["main"]
  assert main["data-points"] == "4500"
  assert int(main["data-lit-points"]) > 3000, main  # the points were drawn...
  assert int(main["data-lit"]) > int(main["data-lit-points"]), main  # ...then the frustums
  assert ids["empty"]["data-points"] == "0" and ids["empty"]["data-lit"] == "0"
  assert ids["camsonly"]["data-lit-points"] == "0" and int(ids["camsonly"]["data-lit"]) > 200
  assert int(ids["nocams"]["data-lit-points"]) > 300
  assert proxy.seen == [], f"the page made network requests: {proxy.seen}"

  # The screenshot: find the first viewer's stage (its background colour), then check that the
  # walls came out where they should (y down: the floor below the back wall; the side wall left).
  img = np.asarray(Image.open(shot).convert("RGB")).astype(np.int64)
  bg = (np.abs(img - VIEWER_BG).max(axis=-1) <= 2)
  rows, cols = np.flatnonzero(bg.any(axis=1)), np.flatnonzero(bg.any(axis=0))
  assert len(rows) > 300 and len(cols) > 600, "viewer canvas not found in the screenshot"
  stage = img[rows[0]:rows[0] + 500, cols[0]:cols[-1] + 1]  # the first viewer's 520-pixel stage
  lit = np.abs(stage - VIEWER_BG).max(axis=-1) > 10
  assert lit.sum() > 5000, f"only {lit.sum()} non-background pixels in the canvas"
  r, g, b = stage[..., 0], stage[..., 1], stage[..., 2]
  where = {}
  for name, m in (("floor", (r > 120) & (r > 2 * g) & (r > 2 * b)),
                  ("back", (g > 120) & (g > 2 * r) & (g > 1.5 * b)),
                  ("side", (b > 120) & (b > 1.5 * r) & (b > 1.5 * g))):
    assert m.sum() > 300, f"{name} wall: only {m.sum()} pixels of its colour"
    yy, xx = np.nonzero(m)
    where[name] = (yy.mean(), xx.mean())
  assert where["floor"][0] > where["back"][0] + 30, where
  assert where["side"][1] < where["back"][1] - 50, where


def test_browser_without_webgl_shows_a_message(chromium, proxy, workdir):
  dom, _ = _browse(chromium, _page_with_viewers(), workdir, proxy, extra=("--disable-3d-apis",))
  ids = _parse(dom).ids
  for name in ("main", "empty", "camsonly", "nocams"):
    assert ids[name].get("data-status") == "no-webgl", ids[name]
  shown = re.findall(r'<div class="gv-msg" style="display: block;">([^<]*)</div>', dom)
  assert len(shown) == 4 and all("WebGL is not available" in m for m in shown), shown
  assert proxy.seen == [], proxy.seen


_INTERACT = """<script>
(function () {
  // Drive the first viewer's controls with synthetic events; after each action wait for the
  // viewer's next frame (data-frames), then record a hash of the WebGL canvas.
  var root = document.getElementById("main"), canvas = root.querySelector("canvas");
  var errors = [], hashes = {};
  window.addEventListener("error", function (e) { errors.push(String(e.message)); });
  function frames() { return parseInt(root.getAttribute("data-frames") || "0", 10); }
  function sig() {  // getContext returns the viewer's own context
    var gl = canvas.getContext("webgl"), w = canvas.width, h = canvas.height;
    var d = new Uint8Array(4 * w * h), s = 0;
    gl.readPixels(0, 0, w, h, gl.RGBA, gl.UNSIGNED_BYTE, d);
    for (var i = 0; i < d.length; i++) { s = (s * 31 + d[i]) | 0; }
    return s;
  }
  function ptr(type, x, y, button, shift) {
    var r = canvas.getBoundingClientRect();
    canvas.dispatchEvent(new PointerEvent(type, {bubbles: true, cancelable: true, pointerId: 1,
      isPrimary: true, pointerType: "mouse", button: button, buttons: button === 2 ? 2 : 1,
      shiftKey: !!shift, clientX: r.left + x, clientY: r.top + y}));
  }
  function drag(button, shift) {
    return function () {
      ptr("pointerdown", 300, 200, button, shift); ptr("pointermove", 360, 230, button, shift);
      ptr("pointermove", 420, 250, button, shift); ptr("pointerup", 420, 250, button, shift);
    };
  }
  function set(sel, prop, value, ev) {
    return function () {
      var el = root.querySelector(sel); el[prop] = value; el.dispatchEvent(new Event(ev));
    };
  }
  function reset() { root.querySelector(".gv-reset").click(); }
  function wheel() {
    canvas.dispatchEvent(new WheelEvent("wheel", {bubbles: true, cancelable: true, deltaY: -400,
                                                   clientX: 300, clientY: 200}));
  }
  var actions = [
    ["depth", set(".gv-mode", "value", "depth", "change")],
    ["rgb", set(".gv-mode", "value", "rgb", "change")],
    ["hideCams", set(".gv-cams", "checked", false, "change")],
    ["showCams", set(".gv-cams", "checked", true, "change")],
    ["orbit", drag(0, false)], ["reset", reset],
    ["pan", drag(2, false)], ["reset2", reset],
    ["shiftPan", drag(0, true)], ["reset3", reset],
    ["zoom", wheel], ["reset4", reset],
    ["size", set(".gv-size", "value", "6", "input")]
  ];
  function finish() {
    root.setAttribute("data-hashes", JSON.stringify(hashes));
    root.setAttribute("data-errors", JSON.stringify(errors));
  }
  function step(i) {
    if (i === actions.length) { finish(); return; }
    var before = frames(), tries = 0;
    try { actions[i][1](); } catch (e) { errors.push(actions[i][0] + ": " + e.message); }
    (function poll() {
      if (frames() > before) { hashes[actions[i][0]] = sig(); step(i + 1); }
      else if (++tries > 100) { hashes[actions[i][0]] = "no frame"; step(i + 1); }
      else { setTimeout(poll, 20); }
    })();
  }
  setTimeout(function () { hashes.initial = sig(); step(0); }, 50);
})();
</script>
"""


def test_browser_controls(chromium, proxy, workdir):
  xyz, rgb, ext, k = _scene(800)
  frag = viewer_html(xyz, rgb, extrinsics=ext, intrinsics=k, image_hw=(240, 320),
                     element_id="main")
  # Headless Chromium issues animation frames in real time, not in the virtual time that
  # --virtual-time-budget runs the page's timers in: make the viewer's frames timers too.
  shim = ("<script>window.requestAnimationFrame = function (f) { return setTimeout(f, 0); };"
          "</script>")
  page = standalone_page(shim + frag + _INTERACT, "controls")
  dom, _ = _browse(chromium, page, workdir, proxy)
  main = _parse(dom).ids["main"]
  assert main.get("data-status") == "drawn", main.get("data-status")
  assert json.loads(main.get("data-errors", '["no result"]')) == []
  h = json.loads(main.get("data-hashes", "{}"))
  assert "no frame" not in h.values() and len(h) == 14, h
  h0 = h["initial"]
  # Each control changes the picture; undoing it (or "reset view") restores it exactly.
  for changed in ("depth", "hideCams", "orbit", "pan", "shiftPan", "zoom", "size"):
    assert h[changed] != h0, (changed, h)
  for same in ("rgb", "showCams", "reset", "reset2", "reset3", "reset4"):
    assert h[same] == h0, (same, h)
  assert h["pan"] == h["shiftPan"] != h["orbit"], h  # right drag = shift + left drag = pan
  assert proxy.seen == [], proxy.seen


def test_browser_proxy_sees_external_requests(chromium, proxy, workdir):
  """Negative control: a page that does load external resources must show up at the proxy."""
  port = proxy.server_address[1]
  page = standalone_page('<img src="http://example.invalid/x.png">'
                         '<script src="https://cdn.example/lib.js"></script>'
                         f'<img src="http://127.0.0.1:{port}/loopback.png"><p>external</p>',
                         "negative control")
  _browse(chromium, page, workdir, proxy)
  seen = " ".join(proxy.seen)
  for host in ("example.invalid", "cdn.example", "loopback.png"):
    assert host in seen, (host, proxy.seen)
