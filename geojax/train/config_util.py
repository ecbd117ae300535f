"""Helpers for ``configs/*.py``: big_vision-style ``get_config(arg)`` argument strings."""

from __future__ import annotations

from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """``"preset=small,data=synthetic,runlocal"`` -> ConfigDict over ``defaults``.

  ``key=value`` pairs take the type of the default (bool accepts true/false/1/0); a bare
  ``key`` sets a boolean default to True. Unknown keys raise ``ValueError`` listing the known
  ones.
  """
  out = dict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config argument {key!r} is not one of {sorted(defaults)}")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r}: expected true or false")
      out[key] = value.lower() in ("true", "1")
    else:
      try:
        out[key] = type(default)(value)
      except ValueError as e:
        raise ValueError(f"config argument {key}={value!r}: expected {type(default).__name__}") from e
  return ml_collections.ConfigDict(out)
