"""The ``geojax`` console script: ``geojax <command> [args]``.

Commands: ``predict`` (see ``geojax predict --help``) and ``convert`` (official pickled
checkpoints -> safetensors, ``geojax convert --help``).
"""

from __future__ import annotations

import sys

COMMANDS = {"predict": "geojax.predict.cli", "convert": "geojax.convert.cli"}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] in ("-h", "--help"):
    print("usage: geojax <command> [args]\n\ncommands:\n  predict   depth, cameras and point "
          "clouds for images, videos and scenes (geojax predict --help)\n  convert   official "
          "pickled checkpoints -> safetensors, once (geojax convert --help)")
    return 0 if argv else 2
  if argv[0] not in COMMANDS:
    print(f"geojax: error: unknown command {argv[0]!r}; expected one of {sorted(COMMANDS)}",
          file=sys.stderr)
    return 2
  import importlib
  return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
  sys.exit(main())
