"""Reliability battery (issue 17): inputs a user can get wrong end in exit status 2 and one line
naming the file and what was expected, with nothing half-written left behind."""

import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

from geojax.convert import cli as convert_cli
from geojax.predict import cli as predict_cli


def _safetensors_bytes() -> bytes:
  from safetensors.numpy import save
  return save({"w": np.arange(64, dtype=np.float32).reshape(8, 8)})


def _broken_json() -> bytes:
  header = b'{"w": {"dtype": "F32", "shape": [8, 8], "data_offsets": [0, 256]'  # no closing brace
  return struct.pack("<Q", len(header)) + header + bytes(256)


def _huge_prefix() -> bytes:
  return struct.pack("<Q", 1 << 40) + b"{}"


# name -> bytes of a file called model.safetensors that no reader can use
BAD_SAFETENSORS = {
    "broken-json": _broken_json,
    "truncated-data": lambda: _safetensors_bytes()[:-100],
    "zero-byte": lambda: b"",
    "huge-length-prefix": _huge_prefix,
    "a-pickle": lambda: b"\x80\x04\x95" + bytes(64),
}


def _one_error_line(err: str, *needles: str) -> str:
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1, f"expected one line, got:\n{err}"
  assert "Traceback" not in err
  for n in needles:
    assert n in lines[0], f"{n!r} not in {lines[0]!r}"
  return lines[0]


@pytest.fixture
def photo(tmp_path):
  p = tmp_path / "photo.png"
  Image.fromarray(np.full((28, 42, 3), 128, np.uint8)).save(p)
  return str(p)


@pytest.mark.parametrize("layout", ["file", "directory"])
@pytest.mark.parametrize("case", sorted(BAD_SAFETENSORS))
def test_predict_refuses_corrupt_safetensors(tmp_path, capsys, photo, case, layout):
  """A corrupt ``model.safetensors``, alone or in an official-style directory with a
  ``config.json``, is exit 2 and one line naming the file; no output folder is left."""
  d = tmp_path / "weights"
  d.mkdir()
  st = d / "model.safetensors"
  st.write_bytes(BAD_SAFETENSORS[case]())
  (d / "config.json").write_text(json.dumps({"model_name": "da3-small"}))
  weights = str(st if layout == "file" else d)
  out = tmp_path / "out"
  code = predict_cli.main(["--weights", weights, "--out", str(out), "--no-progress", photo])
  assert code == 2
  _one_error_line(capsys.readouterr().err, "geojax predict: error:", str(st),
                  "not a readable safetensors file")
  assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("case", sorted(BAD_SAFETENSORS))
def test_safetensors_readers_name_the_corrupt_file(tmp_path, case):
  """Every family's official-weights reader (``read_safetensors`` for a file or a directory,
  ``safetensors_keys``, ``load_file``) turns a corrupt file into a ValueError naming it."""
  from geojax.convert import torch_layout
  st = tmp_path / "model.safetensors"
  st.write_bytes(BAD_SAFETENSORS[case]())
  for read in (lambda: torch_layout.read_safetensors(str(st), "dage"),
               lambda: torch_layout.read_safetensors(str(tmp_path), "dage"),
               lambda: torch_layout.safetensors_keys(str(st)),
               lambda: torch_layout.load_file(str(st))):
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
      read()
  (tmp_path / "model.safetensors").write_bytes(_safetensors_bytes())
  (tmp_path / "config.json").write_text("{broken")
  with pytest.raises(ValueError, match="config.json: cannot parse JSON"):
    torch_layout.read_safetensors(str(tmp_path), "dage")


def test_convert_refuses_safetensors_source(tmp_path, capsys):
  """``geojax convert`` given a ``.safetensors`` (which needs no conversion): exit 2, one line
  naming the file; the destination is not created."""
  src = tmp_path / "model.safetensors"
  src.write_bytes(_safetensors_bytes())
  dst = tmp_path / "dst"
  assert convert_cli.main(["--family", "da3", str(src), str(dst)]) == 2
  _one_error_line(capsys.readouterr().err, str(src), "safetensors files need no conversion")
  assert not dst.exists()
