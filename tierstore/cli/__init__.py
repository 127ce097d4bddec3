"""The tierstore command: a thin mirror of the library, one command one call.

Examples:

    tierstore demo                      # a Qwen3-VL streamed from a store, checked against the in-memory model
    tierstore ls STORE [PREFIX]         # keys with dtype, shape, sizes, tiers
    tierstore info STORE KEY            # everything the catalog knows of one block
    tierstore stats STORE               # counts, sizes, compression
    tierstore history STORE [KEY]       # the access log, newest first
    tierstore verify STORE [--fix]      # check every block and file; repair, naming what was lost
    tierstore gc STORE / compact STORE  # give back the space of replaced and deleted blocks
    tierstore plot STORE -o use.png     # tier use, hit rate and an access heat map over time
    tierstore probe [STORE] [--measure] # the hardware and the CacheConfig it calls for
    tierstore plan STORE [--memory 3GiB] [--hardware probe|seed-laptop|FILE]  # placement + predictions
    tierstore publish STORE [PREFIX] --name NAME   # upload blocks (and a manifest) to the shared tier
    tierstore pull STORE NAME           # fetch a published name from the shared tier
    tierstore shared ls|stats|verify STORE          # what the shared tier holds, its health, a check
    tierstore import-hf MODEL_DIR STORE # a Hugging Face model folder into a store
    tierstore import STORE FILE|DIR     # safetensors into a store
    tierstore export STORE OUT.safetensors [--prefix P]
    tierstore journal STORE             # tier moves in flight (left by a crash until the next open)
    tierstore successors STORE KEY      # blocks read after KEY; those a get of KEY prefetches

Every listing command takes --json. Errors are printed as one line and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

from .._version import __version__
from ..errors import TierStoreError
from . import catalog, demo, maintenance, migrate, models, plan, plot, probe, shared

__all__ = ["main", "ERROR_EXIT"]

ERROR_EXIT = 2
"""Exit status of a command that failed with a (one-line) error."""

# Each module adds its own subcommands; one line here per module.
_COMMANDS = (demo, catalog, maintenance, probe, plan, plot, models, shared, migrate)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tierstore", description=__doc__,  # plain text: argparse shows it as is
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tierstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _COMMANDS:
        module.register(sub)
    return parser


class _OneLine(logging.Formatter):
    """``tierstore: warning: message`` on one line; tracebacks stay out of the command's output."""

    def format(self, record: logging.LogRecord) -> str:
        return f"tierstore: {record.levelname.lower()}: {' '.join(record.getMessage().split())}"


class _Stderr(logging.StreamHandler[TextIO]):
    """A handler on whatever ``sys.stderr`` is when a record comes (StreamHandler keeps the one it started with)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # not setStream(): that flushes the old stream, which may be closed
        super().emit(record)


@contextmanager
def _log_to_stderr() -> Iterator[None]:
    """While a command runs, show the library's warnings (the library adds no handler; the command is an app)."""
    handler = _Stderr()
    handler.setFormatter(_OneLine())
    handler.setLevel(logging.WARNING)
    logger = logging.getLogger("tierstore")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _fail(message: str) -> int:
    print(f"tierstore: {' '.join(message.split())}", file=sys.stderr)  # one line, whatever the message holds
    return ERROR_EXIT


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tierstore`` command: the one place errors become a line and an exit status."""
    args = _parser().parse_args(argv)
    try:
        with _log_to_stderr():
            code: int = args.func(args)
        sys.stdout.flush()  # a reader that went away (``| head``) shows here, not at interpreter exit
    except BrokenPipeError:
        # The reader stopped reading: not an error of ours. Point stdout at /dev/null so the
        # interpreter's last flush does not fail again, as the Python docs advise for SIGPIPE.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # what a shell reports for a process killed by SIGPIPE
    except TierStoreError as exc:  # KeyError subclasses too: str() is the message, not its repr
        return _fail(str(exc))
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        return _fail(f"{exc.strerror or exc}{where}")
    except ImportError as exc:
        return _fail(f"{exc}; the command needs an optional dependency: pip install 'tierstore[qwen]'")
    except KeyboardInterrupt:
        return _fail("interrupted")
    return code


if __name__ == "__main__":
    sys.exit(main())
