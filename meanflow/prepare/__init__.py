"""`python -m meanflow.prepare COMMAND ...`: one-off dataset preparation.

Commands:
  latents   an image folder to SD-VAE latent shards with a manifest (meanflow/prepare/latents.py,
            docs/prepared-latents.md); `--data.root` on its output trains on them.
"""

from __future__ import annotations

import sys

COMMANDS = {"latents": "meanflow.prepare.latents"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"meanflow.prepare: error: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
