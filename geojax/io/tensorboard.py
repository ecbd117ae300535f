"""TensorBoard event files written (and read back) without TensorFlow or tensorboard installed.

TensorBoard reads *event files*: a sequence of TFRecord records, each holding one serialized
``Event`` protocol buffer. Writing them normally needs TensorFlow, ``tensorboard`` or
``tensorboardX`` (and with them ``protobuf``); this module needs only NumPy and Pillow, so the
trainer can always log, and the logs open in any TensorBoard elsewhere.

It encodes the few messages it needs by hand (field numbers from TensorBoard's
``compat/proto/event.proto``, ``summary.proto`` and ``tensor.proto``)::

  Event          wall_time=1 (double), step=2 (int64), file_version=3 (string), summary=5
  Summary        value=1 (repeated Summary.Value)
  Summary.Value  tag=1, simple_value=2 (float), image=4, tensor=8, metadata=9
  Summary.Image  height=1, width=2, colorspace=3 (1 grey, 3 RGB, 4 RGBA), encoded_image_string=4

and frames each record as TFRecord does: the payload length (uint64, little-endian), the masked
CRC32C of those 8 bytes (uint32), the payload, the masked CRC32C of the payload (uint32).

``SummaryWriter`` writes scalars, images (PNG) and text; ``read_events`` decodes a file back into
plain dicts, checking every CRC, for tests and for reading logs without TensorBoard.
"""

from __future__ import annotations

import io
import itertools
import math
import operator
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["SummaryWriter", "crc32c", "read_events"]

FILE_VERSION = "brain.Event:2"

# ------------------------------------------------------------------------------------------------
# CRC32C (Castagnoli), as TFRecord framing requires.

_CRC_POLY = 0x82F63B78  # Reflected form of the Castagnoli polynomial 0x1EDC6F41.


def _crc_tables() -> tuple[list[int], ...]:
  """Eight 256-entry tables: ``T[0]`` is the usual byte table, ``T[k]`` the same byte followed
  by ``k`` zero bytes (so eight bytes can be folded into the CRC at once)."""
  base = []
  for byte in range(256):
    c = byte
    for _ in range(8):
      c = (c >> 1) ^ _CRC_POLY if c & 1 else c >> 1
    base.append(c)
  tables = [base]
  for _ in range(7):
    prev = tables[-1]
    tables.append([(p >> 8) ^ base[p & 0xFF] for p in prev])
  return tuple(tables)


_CRC_TABLES = _crc_tables()


def _crc32c_py(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
  """CRC32C of ``data`` in pure Python (slicing-by-8: eight table look-ups per 8 input bytes).

  ``crc`` is a previous result to continue from, so ``f(a + b) == f(b, f(a))``.
  """
  view = memoryview(data).cast("B")
  t0, t1, t2, t3, t4, t5, t6, t7 = _CRC_TABLES
  crc = (crc ^ 0xFFFFFFFF) & 0xFFFFFFFF
  head = len(view) & ~7
  for lo, hi in struct.iter_unpack("<II", view[:head]):
    lo ^= crc
    crc = (t7[lo & 0xFF] ^ t6[(lo >> 8) & 0xFF] ^ t5[(lo >> 16) & 0xFF] ^ t4[lo >> 24]
           ^ t3[hi & 0xFF] ^ t2[(hi >> 8) & 0xFF] ^ t1[(hi >> 16) & 0xFF] ^ t0[hi >> 24])
  for byte in view[head:]:
    crc = t0[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _native_crc32c() -> Callable[[bytes], int] | None:
  """A compiled CRC32C from ``google_crc32c`` or ``crc32c`` if one is installed and correct."""
  candidates: list[Callable[[bytes], int]] = []
  try:
    import google_crc32c  # type: ignore[import-not-found]
    if getattr(google_crc32c, "implementation", "c") == "c":
      candidates.append(lambda data: int(google_crc32c.value(bytes(data))))
  except Exception:  # noqa: BLE001 - any import problem just means "not available".
    pass
  try:
    import crc32c as crc32c_module  # type: ignore[import-not-found]
    candidates.append(lambda data: int(crc32c_module.crc32c(bytes(data))))
  except Exception:  # noqa: BLE001
    pass
  for fn in candidates:
    try:
      if fn(b"123456789") == 0xE3069283 and fn(b"") == 0:
        return fn
    except Exception:  # noqa: BLE001
      continue
  return None


#: CRC32C of a byte string: a compiled implementation when one is installed, else pure Python.
crc32c: Callable[[bytes], int] = _native_crc32c() or _crc32c_py


def _masked_crc(data: bytes | bytearray | memoryview) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _frame(payload: bytes) -> bytes:
  """One TFRecord: length, its masked CRC, the payload, the payload's masked CRC."""
  header = struct.pack("<Q", len(payload))
  return b"".join((header, struct.pack("<I", _masked_crc(header)), payload,
                   struct.pack("<I", _masked_crc(payload))))


# ------------------------------------------------------------------------------------------------
# Protocol buffer encoding (only the wire types used here).

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


def _varint(n: int) -> bytes:
  if n < 0:
    n += 1 << 64  # int32/int64 negatives are sent as their 64-bit two's complement.
  out = bytearray()
  while n > 0x7F:
    out.append((n & 0x7F) | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def _key(field: int, wire: int) -> bytes:
  return _varint((field << 3) | wire)


def _f_varint(field: int, n: int) -> bytes:
  return _key(field, _VARINT) + _varint(n)


def _f_double(field: int, x: float) -> bytes:
  return _key(field, _FIXED64) + struct.pack("<d", x)


def _f_float(field: int, x: float) -> bytes:
  try:
    packed = struct.pack("<f", x)
  except OverflowError:  # Finite but beyond float32: TensorBoard would see +-inf anyway.
    packed = struct.pack("<f", math.copysign(math.inf, x))
  return _key(field, _FIXED32) + packed


def _f_bytes(field: int, data: bytes) -> bytes:
  return _key(field, _BYTES) + _varint(len(data)) + data


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           summary: bytes | None = None) -> bytes:
  out = [_f_double(1, wall_time)]
  if step:
    out.append(_f_varint(2, step))
  if file_version is not None:
    out.append(_f_bytes(3, file_version.encode()))
  if summary is not None:
    out.append(_f_bytes(5, summary))
  return b"".join(out)


# ------------------------------------------------------------------------------------------------
# Argument checks: each names the argument and what was expected.

_INT64_MAX = (1 << 63) - 1


def _check_tag(tag: Any, what: str = "tag") -> str:
  if not isinstance(tag, str) or not tag.strip():
    raise ValueError(f"{what} must be a non-empty string, got {tag!r}")
  return tag


def _check_step(step: Any) -> int:
  if isinstance(step, bool):
    raise ValueError(f"step must be a non-negative integer, got {step!r}")
  try:
    value = operator.index(step)
  except TypeError:
    raise ValueError(
        f"step must be a non-negative integer, got {type(step).__name__} {step!r}") from None
  if not 0 <= value <= _INT64_MAX:
    raise ValueError(f"step must be a non-negative integer below 2**63, got {value}")
  return value


def _check_scalar(tag: str, value: Any) -> float:
  if isinstance(value, (str, bytes)):
    raise ValueError(f"value for {tag!r} must be a real number, got {type(value).__name__}")
  try:
    return float(value)
  except (TypeError, ValueError):
    raise ValueError(
        f"value for {tag!r} must be a real number, got {type(value).__name__}") from None


_COLORSPACE = {2: 1, 3: 3, 4: 4}  # Channels (2 means a plain H x W array) -> Summary.Image code.


def _image_value(tag: str, image: Any) -> bytes:
  """A Summary.Value with a PNG Summary.Image from ``(H, W[, 1|3|4])`` uint8 or [0, 1] floats."""
  arr = np.asarray(image)
  if arr.ndim == 3 and arr.shape[2] == 1:
    arr = arr[..., 0]
  if (arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4))
      or arr.shape[0] < 1 or arr.shape[1] < 1):
    raise ValueError(f"image for {tag!r} must have shape (H, W), (H, W, 1), (H, W, 3) or "
                     f"(H, W, 4) with H, W >= 1, got shape {arr.shape}")
  if arr.dtype == np.uint8:
    pass
  elif np.issubdtype(arr.dtype, np.floating):
    if not np.isfinite(arr).all():
      raise ValueError(f"image for {tag!r} must be finite; floats are read as [0, 1] intensities")
    arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
  else:
    raise ValueError(f"image for {tag!r} must have dtype uint8, or a float dtype with values in "
                     f"[0, 1], got dtype {arr.dtype}")
  height, width = arr.shape[:2]
  colorspace = _COLORSPACE[arr.shape[2] if arr.ndim == 3 else 2]
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(arr)).save(buffer, format="PNG")
  image_msg = b"".join((_f_varint(1, height), _f_varint(2, width), _f_varint(3, colorspace),
                        _f_bytes(4, buffer.getvalue())))
  return _f_bytes(1, tag.encode()) + _f_bytes(4, image_msg)


_DT_STRING = 7
# SummaryMetadata{plugin_data: PluginData{plugin_name: "text"}}: routes the value to the Text tab.
_TEXT_METADATA = _f_bytes(9, _f_bytes(1, _f_bytes(1, b"text")))


def _text_value(tag: str, text: str) -> bytes:
  # TensorProto{dtype: DT_STRING, tensor_shape: {} (a scalar), string_val: [text]}.
  tensor = _f_varint(1, _DT_STRING) + _f_bytes(2, b"") + _f_bytes(8, text.encode())
  return _f_bytes(1, tag.encode()) + _TEXT_METADATA + _f_bytes(8, tensor)


# ------------------------------------------------------------------------------------------------
# Writer.

_file_counter = itertools.count()  # Distinguishes writers opened by one process in one second.


class SummaryWriter:
  """Appends scalars, images and text to a new TensorBoard event file in ``logdir``.

  The file is ``events.out.tfevents.<time>.<host>.<pid>.<n><filename_suffix>``, the naming
  TensorBoard looks for. Records are buffered by the Python file object: call ``flush()`` to make
  them visible to a running TensorBoard, and ``close()`` (or use ``with``) at the end. Methods may
  be called from several threads; each record is written whole.

  Example::

    with SummaryWriter("runs/exp1") as tb:
      tb.scalars({"loss": 0.3, "lr": 1e-4}, step=100, prefix="train")
      tb.image("val/depth", colormap(depth01), step=100)
  """

  def __init__(self, logdir: str | os.PathLike[str], *, filename_suffix: str = "") -> None:
    logdir = os.fspath(logdir)
    if not isinstance(logdir, str) or not logdir:
      raise ValueError(f"logdir must be a non-empty path, got {logdir!r}")
    if not isinstance(filename_suffix, str) or "/" in filename_suffix or os.sep in filename_suffix:
      raise ValueError(f"filename_suffix must be a string without path separators, "
                       f"got {filename_suffix!r}")
    os.makedirs(logdir, exist_ok=True)
    host = socket.gethostname().replace("/", "_") or "localhost"
    while True:
      name = (f"events.out.tfevents.{int(time.time())}.{host}.{os.getpid()}."
              f"{next(_file_counter)}{filename_suffix}")
      path = os.path.join(logdir, name)
      try:
        self._file = open(path, "xb")  # noqa: SIM115 - closed by close().
        break
      except FileExistsError:
        continue
    self.logdir: str = logdir
    self.path: str = path
    self._lock = threading.Lock()
    self._write(_event(time.time(), 0, file_version=FILE_VERSION))

  # -- values ------------------------------------------------------------------------------------

  def scalar(self, tag: str, value: float, step: int) -> None:
    """Log one scalar. Non-finite values are written as they are (TensorBoard shows NaN / inf)."""
    tag = _check_tag(tag)
    step = _check_step(step)
    value = _check_scalar(tag, value)
    self._summary([_f_bytes(1, tag.encode()) + _f_float(2, value)], step)

  def scalars(self, values: Mapping[str, float], step: int, prefix: str = "") -> None:
    """Log several scalars in one event; ``prefix="train"`` gives tags ``train/<key>``.

    A prefix not ending in ``/`` gets one. An empty ``values`` writes nothing.
    """
    if not isinstance(values, Mapping):
      raise ValueError(f"values must be a mapping of tag -> number, got {type(values).__name__}")
    if not isinstance(prefix, str):
      raise ValueError(f"prefix must be a string, got {prefix!r}")
    step = _check_step(step)
    if prefix and not prefix.endswith("/"):
      prefix += "/"
    encoded = []
    for key, value in values.items():
      tag = prefix + _check_tag(key, "each key of values")
      encoded.append(_f_bytes(1, tag.encode()) + _f_float(2, _check_scalar(tag, value)))
    if encoded:
      self._summary(encoded, step)

  def image(self, tag: str, image: np.ndarray, step: int) -> None:
    """Log one image, stored as PNG: ``(H, W)`` grey, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA.

    uint8 is taken as is; float arrays are clipped to [0, 1] and scaled to 0..255 (they must be
    finite). ``(H, W, 1)`` is treated as grey.
    """
    tag = _check_tag(tag)
    step = _check_step(step)
    self._summary([_image_value(tag, image)], step)

  def text(self, tag: str, text: str, step: int) -> None:
    """Log a string (shown, as Markdown, in TensorBoard's Text tab)."""
    tag = _check_tag(tag)
    step = _check_step(step)
    if not isinstance(text, str):
      raise ValueError(f"text for {tag!r} must be a string, got {type(text).__name__}")
    self._summary([_text_value(tag, text)], step)

  # -- file --------------------------------------------------------------------------------------

  @property
  def closed(self) -> bool:
    return self._file.closed

  def flush(self) -> None:
    """Hand buffered records to the operating system (TensorBoard then sees them)."""
    with self._lock:
      if not self._file.closed:
        self._file.flush()

  def close(self) -> None:
    """Flush and close the file; later calls do nothing, later writes raise ValueError."""
    with self._lock:
      if not self._file.closed:
        self._file.close()

  def __enter__(self) -> SummaryWriter:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()

  def __repr__(self) -> str:
    state = "closed" if self.closed else "open"
    return f"SummaryWriter({self.path!r}, {state})"

  def _summary(self, values: list[bytes], step: int) -> None:
    summary = b"".join(_f_bytes(1, value) for value in values)
    self._write(_event(time.time(), step, summary=summary))

  def _write(self, event: bytes) -> None:
    record = _frame(event)
    with self._lock:
      if self._file.closed:
        raise ValueError(f"SummaryWriter for {self.path} is closed")
      self._file.write(record)


# ------------------------------------------------------------------------------------------------
# Reader.

def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
  """``(field, wire type, value)`` of a message: ints for varints, bytes for the other types."""
  out = []
  pos, end = 0, len(buf)

  def varint() -> int:
    nonlocal pos
    result = shift = 0
    while True:
      if pos >= end:
        raise ValueError("message ends inside a varint")
      byte = buf[pos]
      pos += 1
      result |= (byte & 0x7F) << shift
      if not byte & 0x80:
        return result
      shift += 7
      if shift >= 70:
        raise ValueError("varint longer than 10 bytes")

  while pos < end:
    key = varint()
    field, wire = key >> 3, key & 7
    if wire == _VARINT:
      value: Any = varint()
    elif wire in (_FIXED64, _FIXED32, _BYTES):
      size = {_FIXED64: 8, _FIXED32: 4}.get(wire) or varint()
      if pos + size > end:
        raise ValueError(f"field {field} runs past the end of its message")
      value = buf[pos:pos + size]
      pos += size
    else:
      raise ValueError(f"unsupported wire type {wire} for field {field}")
    if field == 0:
      raise ValueError("field number 0")
    out.append((field, wire, value))
  return out


def _want(field: int, wire: int, expected: int, message: str) -> None:
  if wire != expected:
    raise ValueError(f"{message} field {field} has wire type {wire}, expected {expected}")


def _signed64(n: int) -> int:
  return n - (1 << 64) if n >= 1 << 63 else n


def _decode_value(buf: bytes) -> dict[str, Any]:
  value: dict[str, Any] = {"tag": ""}
  plugin = None
  strings: list[str] | None = None
  for field, wire, data in _fields(buf):
    if field == 1:
      _want(field, wire, _BYTES, "Summary.Value")
      value["tag"] = data.decode()
    elif field == 2:
      _want(field, wire, _FIXED32, "Summary.Value")
      value["simple_value"] = struct.unpack("<f", data)[0]
    elif field == 4:
      _want(field, wire, _BYTES, "Summary.Value")
      image = {"height": 0, "width": 0, "colorspace": 0, "png": b""}
      names = {1: "height", 2: "width", 3: "colorspace"}
      for f, w, d in _fields(data):
        if f in names:
          _want(f, w, _VARINT, "Summary.Image")
          image[names[f]] = _signed64(d)
        elif f == 4:
          _want(f, w, _BYTES, "Summary.Image")
          image["png"] = bytes(d)
      value["image"] = image
    elif field == 9:
      _want(field, wire, _BYTES, "Summary.Value")
      for f, w, d in _fields(data):
        if f == 1 and w == _BYTES:
          for f2, w2, d2 in _fields(d):
            if f2 == 1 and w2 == _BYTES:
              plugin = d2.decode()
    elif field == 8:
      _want(field, wire, _BYTES, "Summary.Value")
      dtype, strings = 0, []
      for f, w, d in _fields(data):
        if f == 1 and w == _VARINT:
          dtype = d
        elif f == 8 and w == _BYTES:
          strings.append(d.decode())
      if dtype != _DT_STRING:
        strings = None
  if plugin is not None:
    value["plugin"] = plugin
  if strings is not None and len(strings) == 1:
    value["text"] = strings[0]
  return value


def _decode_event(buf: bytes) -> dict[str, Any]:
  event: dict[str, Any] = {"wall_time": 0.0, "step": 0, "file_version": None, "values": []}
  for field, wire, data in _fields(buf):
    if field == 1:
      _want(field, wire, _FIXED64, "Event")
      event["wall_time"] = struct.unpack("<d", data)[0]
    elif field == 2:
      _want(field, wire, _VARINT, "Event")
      event["step"] = _signed64(data)
    elif field == 3:
      _want(field, wire, _BYTES, "Event")
      event["file_version"] = data.decode()
    elif field == 5:
      _want(field, wire, _BYTES, "Event")
      for f, w, d in _fields(data):
        if f == 1:
          _want(f, w, _BYTES, "Summary")
          event["values"].append(_decode_value(d))
  return event


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """Every Event in an event file, in order, as plain dicts; both CRCs of each record are checked.

  Each dict has ``wall_time`` (float), ``step`` (int), ``file_version`` (str or None) and
  ``values``: one dict per Summary.Value with ``tag`` and, depending on its kind,
  ``simple_value`` (float), ``image`` (``{"height", "width", "colorspace", "png"}``, ``png``
  being the encoded bytes), or ``text`` (str) with ``plugin`` (``"text"``). Kinds this module
  does not write (histograms, other tensors) appear with just their tag. A bad CRC, a truncated
  record or an undecodable Event raises ValueError naming the file and the record's offset.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    data = f.read()
  events = []
  pos, size = 0, len(data)
  while pos < size:
    if size - pos < 12:
      raise ValueError(f"{path}: truncated record header at byte {pos}")
    header = data[pos:pos + 8]
    if struct.unpack("<I", data[pos + 8:pos + 12])[0] != _masked_crc(header):
      raise ValueError(f"{path}: corrupted record at byte {pos} (length CRC mismatch)")
    start = pos + 12
    end = start + struct.unpack("<Q", header)[0]
    if end + 4 > size:
      raise ValueError(f"{path}: truncated record at byte {pos} (file ends inside it)")
    payload = data[start:end]
    if struct.unpack("<I", data[end:end + 4])[0] != _masked_crc(payload):
      raise ValueError(f"{path}: corrupted record at byte {pos} (data CRC mismatch)")
    try:
      events.append(_decode_event(payload))
    except ValueError as e:  # Includes UnicodeDecodeError.
      raise ValueError(f"{path}: record at byte {pos} is not a valid Event: {e}") from None
    pos = end + 4
  return events
