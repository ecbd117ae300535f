"""Tests for geojax.io.tensorboard: CRC32C, TFRecord framing, round trips and input checks."""

from __future__ import annotations

import io
import math
import os
import re
import socket
import struct
import time

import numpy as np
import pytest
from PIL import Image as PILImage

from geojax.io import tensorboard as tb
from geojax.io.tensorboard import SummaryWriter, read_events


@pytest.fixture(autouse=True)
def _pure_python_crc(monkeypatch):
  """Always exercise the pure Python CRC32C, even where a compiled one is installed."""
  monkeypatch.setattr(tb, "crc32c", tb._crc32c_py)


def _bitwise_crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _png_pixels(png: bytes) -> np.ndarray:
  with PILImage.open(io.BytesIO(png)) as im:
    assert im.format == "PNG"
    return np.asarray(im)


# ------------------------------------------------------------------------------------------------
# CRC32C and framing.

@pytest.mark.parametrize("data,expected", [
    (b"", 0),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),            # RFC 3720, B.4
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
])
def test_crc32c_known_vectors(data, expected):
  assert tb._crc32c_py(data) == expected
  assert tb.crc32c(data) == expected


def test_crc32c_matches_bitwise_reference_and_continues():
  rng = np.random.default_rng(0)
  for n in [*range(0, 41), 1000, 4099]:
    data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    assert tb._crc32c_py(data) == _bitwise_crc32c(data), n
  data = rng.integers(0, 256, 1003, dtype=np.uint8).tobytes()
  assert tb._crc32c_py(data[500:], tb._crc32c_py(data[:500])) == tb._crc32c_py(data)
  assert tb._crc32c_py(memoryview(data)) == tb._crc32c_py(bytearray(data))


def test_record_framing(tmp_path):
  """First record parsed by hand: u64 length, masked CRC of it, data, masked CRC of the data."""
  def masked(crc):
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32

  with SummaryWriter(tmp_path) as w:
    path = w.path
  raw = open(path, "rb").read()
  (length,) = struct.unpack("<Q", raw[:8])
  assert struct.unpack("<I", raw[8:12])[0] == masked(_bitwise_crc32c(raw[:8]))
  payload = raw[12:12 + length]
  assert struct.unpack("<I", raw[12 + length:16 + length])[0] == masked(_bitwise_crc32c(payload))
  assert len(raw) == 16 + length
  # Event{wall_time (field 1, fixed64), file_version (field 3, string)}; step 0 is omitted.
  assert payload[0] == 0x09 and payload[9] == 0x1A
  assert payload[11:] == b"brain.Event:2"


# ------------------------------------------------------------------------------------------------
# Writer and reader.

def test_file_name_and_header(tmp_path):
  logdir = tmp_path / "a" / "b"
  t0 = int(time.time())
  with SummaryWriter(str(logdir), filename_suffix=".v2") as w1, SummaryWriter(logdir) as w2:
    pass
  assert w1.path != w2.path and os.path.dirname(w1.path) == str(logdir)
  pattern = r"events\.out\.tfevents\.(\d+)\.(.+)\.(\d+)\.(\d+)\.v2"
  m = re.fullmatch(pattern, os.path.basename(w1.path))
  assert m, w1.path
  assert t0 <= int(m.group(1)) <= time.time() + 1
  assert m.group(2) == socket.gethostname()
  assert int(m.group(3)) == os.getpid()
  assert re.fullmatch(r"events\.out\.tfevents\.\d+\..+\.\d+\.\d+", os.path.basename(w2.path))
  events = read_events(w1.path)
  assert len(events) == 1
  assert events[0]["file_version"] == "brain.Event:2" and events[0]["values"] == []
  assert t0 - 1 <= events[0]["wall_time"] <= time.time() + 1


def test_round_trip_scalars_images_text(tmp_path):
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
  rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
  grey = rng.integers(0, 256, (6, 9), dtype=np.uint8)
  floats = rng.random((4, 3, 3)).astype(np.float32)
  t0 = time.time()
  with SummaryWriter(tmp_path) as w:
    w.scalar("loss", 0.25, step=0)
    w.scalar("loss", np.float32(0.125), step=np.int64(10))
    w.scalars({"lr": 1e-3, "acc": 2}, step=10, prefix="train")
    w.scalars({"x": 1.5}, step=11, prefix="val/")
    w.scalars({}, step=12)
    w.scalar("big", 1e300, step=3)
    w.image("img/rgb", rgb, step=5)
    w.image("img/rgba", rgba, step=5)
    w.image("img/grey", grey[..., None], step=6)
    w.image("img/grey2d", grey, step=6)
    w.image("img/float", floats, step=2**40)
    w.text("config", "lr: **0.001**", step=0)
    w.flush()
  events = read_events(w.path)
  assert events[0]["file_version"] == "brain.Event:2"
  assert all(t0 - 1 <= e["wall_time"] <= time.time() + 1 for e in events)
  flat = [(e["step"], v) for e in events[1:] for v in e["values"]]
  assert [(s, v["tag"]) for s, v in flat] == [
      (0, "loss"), (10, "loss"), (10, "train/lr"), (10, "train/acc"), (11, "val/x"), (3, "big"),
      (5, "img/rgb"), (5, "img/rgba"), (6, "img/grey"), (6, "img/grey2d"), (2**40, "img/float"),
      (0, "config")]
  assert len(events) == 1 + 11  # One event per call (the empty scalars() writes none).
  by_tag = {v["tag"]: v for _, v in flat if v["tag"] != "loss"}
  assert [v["simple_value"] for _, v in flat[:2]] == [0.25, 0.125]
  assert by_tag["train/lr"]["simple_value"] == np.float32(1e-3)
  assert by_tag["train/acc"]["simple_value"] == 2.0
  assert by_tag["big"]["simple_value"] == math.inf
  for tag, pixels, colorspace in [("img/rgb", rgb, 3), ("img/rgba", rgba, 4),
                                  ("img/grey", grey, 1), ("img/grey2d", grey, 1)]:
    image = by_tag[tag]["image"]
    assert (image["height"], image["width"], image["colorspace"]) == (
        pixels.shape[0], pixels.shape[1], colorspace)
    np.testing.assert_array_equal(_png_pixels(image["png"]), pixels)
  np.testing.assert_array_equal(_png_pixels(by_tag["img/float"]["image"]["png"]),
                                np.round(floats * 255).astype(np.uint8))
  assert by_tag["config"]["text"] == "lr: **0.001**" and by_tag["config"]["plugin"] == "text"


def test_non_finite_scalars_are_written(tmp_path):
  with SummaryWriter(tmp_path) as w:
    w.scalars({"nan": float("nan"), "inf": float("inf"), "ninf": -np.inf}, step=1)
  values = {v["tag"]: v["simple_value"] for v in read_events(w.path)[1]["values"]}
  assert math.isnan(values["nan"]) and values["inf"] == math.inf and values["ninf"] == -math.inf


def test_float_images_are_clipped(tmp_path):
  with SummaryWriter(tmp_path) as w:
    w.image("clip", np.array([[-0.5, 0.0, 0.5, 1.0, 7.0]], np.float64), step=0)
  png = read_events(w.path)[1]["values"][0]["image"]["png"]
  np.testing.assert_array_equal(_png_pixels(png), [[0, 0, 128, 255, 255]])


# ------------------------------------------------------------------------------------------------
# Corruption and bad input.

def _written(tmp_path) -> str:
  with SummaryWriter(tmp_path) as w:
    w.scalar("a", 1.0, step=1)
    w.image("b", np.zeros((4, 4, 3), np.uint8), step=1)
  return w.path


@pytest.mark.parametrize("where", ["length", "length_crc", "data", "data_crc", "last"])
def test_corrupted_byte_raises(tmp_path, where):
  path = _written(tmp_path)
  raw = bytearray(open(path, "rb").read())
  first_len = struct.unpack("<Q", raw[:8])[0]
  second = 16 + first_len  # Offset of the second record (the scalar).
  offset = {"length": second + 1, "length_crc": second + 9, "data": second + 14,
            "data_crc": second + 12 + struct.unpack("<Q", raw[second:second + 8])[0] + 1,
            "last": len(raw) - 1}[where]
  raw[offset] ^= 0x40
  open(path, "wb").write(bytes(raw))
  with pytest.raises(ValueError, match=re.escape(path)):
    read_events(path)


def test_truncated_file_raises(tmp_path):
  path = _written(tmp_path)
  raw = open(path, "rb").read()
  for cut in (len(raw) - 1, len(raw) - 20, 5):
    open(path, "wb").write(raw[:cut])
    with pytest.raises(ValueError, match="truncated"):
      read_events(path)


@pytest.mark.parametrize("call,match", [
    (lambda w: w.scalar("", 1.0, 0), "tag must be a non-empty string"),
    (lambda w: w.scalar("  ", 1.0, 0), "tag must be a non-empty string"),
    (lambda w: w.scalar(None, 1.0, 0), "tag must be a non-empty string"),
    (lambda w: w.scalar("a", 1.0, -1), "step must be a non-negative integer"),
    (lambda w: w.scalar("a", 1.0, 1.5), "step must be a non-negative integer"),
    (lambda w: w.scalar("a", 1.0, True), "step must be a non-negative integer"),
    (lambda w: w.scalar("a", 1.0, 2**63), "step must be a non-negative integer"),
    (lambda w: w.scalar("a", "1.0", 0), "value for 'a' must be a real number"),
    (lambda w: w.scalar("a", [1.0, 2.0], 0), "value for 'a' must be a real number"),
    (lambda w: w.scalar("a", 1j, 0), "value for 'a' must be a real number"),
    (lambda w: w.scalars([("a", 1.0)], 0), "values must be a mapping"),
    (lambda w: w.scalars({"": 1.0}, 0), "each key of values must be a non-empty string"),
    (lambda w: w.scalars({"a": None}, 0, prefix="p"), "value for 'p/a' must be a real number"),
    (lambda w: w.scalars({"a": 1.0}, -3), "step must be a non-negative integer"),
    (lambda w: w.image("im", np.zeros((4, 4, 2), np.uint8), 0), r"image for 'im' must have shape"),
    (lambda w: w.image("im", np.zeros((3, 8, 8), np.uint8), 0), r"got shape \(3, 8, 8\)"),
    (lambda w: w.image("im", np.zeros(8, np.uint8), 0), r"image for 'im' must have shape"),
    (lambda w: w.image("im", np.zeros((0, 8), np.uint8), 0), r"H, W >= 1"),
    (lambda w: w.image("im", np.zeros((1, 2, 2, 3), np.uint8), 0), r"must have shape"),
    (lambda w: w.image("im", np.zeros((4, 4), np.int64), 0), "must have dtype uint8.*int64"),
    (lambda w: w.image("im", np.zeros((4, 4), bool), 0), "must have dtype uint8.*bool"),
    (lambda w: w.image("im", np.full((4, 4), np.nan, np.float32), 0), "must be finite"),
    (lambda w: w.image("", np.zeros((4, 4), np.uint8), 0), "tag must be a non-empty string"),
    (lambda w: w.image("im", np.zeros((4, 4), np.uint8), -1), "step must be"),
    (lambda w: w.text("t", b"bytes", 0), "text for 't' must be a string"),
])
def test_bad_input_raises_and_writes_nothing(tmp_path, call, match):
  with SummaryWriter(tmp_path) as w:
    with pytest.raises(ValueError, match=match):
      call(w)
  assert len(read_events(w.path)) == 1


def test_bad_constructor_arguments_and_closed_writer(tmp_path):
  with pytest.raises(ValueError, match="filename_suffix"):
    SummaryWriter(tmp_path, filename_suffix="a/b")
  with pytest.raises(ValueError, match="logdir"):
    SummaryWriter("")
  w = SummaryWriter(tmp_path)
  w.close()
  w.close()
  w.flush()
  assert w.closed
  with pytest.raises(ValueError, match="closed"):
    w.scalar("a", 1.0, 0)
