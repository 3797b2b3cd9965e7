"""``python -m hf_longattn.probe``: the ``hf-longattn probe`` subcommand."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hf_longattn.probe ...``: the probe subcommand on its own."""
    from ..cli import main as cli_main

    return cli_main(["probe", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
