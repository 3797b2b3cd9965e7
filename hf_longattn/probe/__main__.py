"""``python -m hf_longattn.probe``: the ``hf-longattn probe`` subcommand."""

from .command import main

raise SystemExit(main())
