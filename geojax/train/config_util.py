"""Helpers for ``configs/*.py`` (big_vision-style ``get_config(arg)`` argument strings) and for
the absl mains that read them (``train.py``, ``evaluate.py``): a bad flag, config override or
config file is one line and exit status 2."""

from __future__ import annotations

import sys
from typing import Any, Callable

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


def _one_line(text: str) -> str:
  if "Traceback (most recent call last)" in text:  # a config file's own error: keep its line
    head = text.split("Traceback (most recent call last)")[0]
    last = [l for l in text.splitlines() if l.strip()][-1]
    text = f"{head} {last}"
  return " ".join(text.split())


def flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
  """An ``app.run(..., flags_parser=)`` that prints bad flags and ``--config.*`` overrides (a
  wrong type, a field the config does not have) as one line ``PROG: error: ...`` and exits 2."""
  from absl import flags

  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      print(f"{prog}: error: {_one_line(str(e))}", file=sys.stderr)
    except (AttributeError, KeyError) as e:  # ml_collections: an override of no config field
      print(f"{prog}: error: a --config override names no config field: {_one_line(str(e))}",
            file=sys.stderr)
    sys.exit(2)
  return parse


def load_config_flag(holder, prog: str) -> ml_collections.ConfigDict:
  """The ConfigDict of a ``config_flags.DEFINE_config_file`` holder, loading it now: a missing
  or failing config file is one line ``PROG: error: --config: ...`` and exit status 2."""
  config = holder.value
  try:
    config.get("model")  # config_flags loads the file lazily: fail here, not mid-run
  except (OSError, ValueError, TypeError, AttributeError, ImportError, SyntaxError) as e:
    print(f"{prog}: error: --config: {_one_line(str(e))}", file=sys.stderr)
    sys.exit(2)
  return config
