"""``python -m bscale``: the command line of :mod:`bscale.cli`."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
