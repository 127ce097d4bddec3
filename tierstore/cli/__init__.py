"""The ``tierstore`` command: a thin mirror of the library, one command one call.

Examples::

    tierstore demo                      # a Qwen3-VL streamed from a store, checked against the in-memory model
    tierstore ls STORE [PREFIX]         # keys with dtype, shape, sizes, tiers
    tierstore info STORE KEY            # everything the catalog knows of one block
    tierstore stats STORE               # counts, sizes, compression
    tierstore history STORE [KEY]       # the access log, newest first
    tierstore verify STORE [--fix]      # check every block and file; repair, naming what was lost
    tierstore gc STORE / compact STORE  # give back the space of replaced and deleted blocks
    tierstore plot STORE -o use.png     # tier use, hit rate and an access heat map over time
    tierstore probe [STORE] [--measure] # the hardware and the CacheConfig it calls for
    tierstore publish STORE [PREFIX] --name NAME   # upload blocks (and a manifest) to the shared tier
    tierstore pull STORE NAME           # fetch a published name from the shared tier
    tierstore shared ls|stats|verify STORE          # what the shared tier holds, its health, a check
    tierstore import-hf MODEL_DIR STORE # a Hugging Face model folder into a store
    tierstore import STORE FILE|DIR     # safetensors into a store
    tierstore export STORE OUT.safetensors [--prefix P]
    tierstore journal STORE             # tier moves in flight (left by a crash until the next open)
    tierstore successors STORE KEY      # blocks read after KEY; those a get of KEY prefetches

Every listing command takes ``--json``. Errors are printed as one line and a
non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import TierStoreError
from . import catalog, demo, maintenance, migrate, models, plot, probe, shared

__all__ = ["main"]

# Each module adds its own subcommands; one line here per module.
_COMMANDS = (demo, catalog, maintenance, probe, plot, models, shared, migrate)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tierstore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tierstore`` command."""
    args = _parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyError as exc:  # BlockNotFoundError and friends
        print(f"tierstore: {exc}", file=sys.stderr)
        return 1
    except TierStoreError as exc:
        print(f"tierstore: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
