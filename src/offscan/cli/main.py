"""The parser of every subcommand, assembled from this package's modules, and ``main``.

``main`` is also the last line of defence of "no traceback reaches a user": an error no
subcommand handled becomes one line on stderr and exit 2, a closed stdout (``| head``) ends
the command quietly, Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence

from .. import __version__
from . import agent, bench, demo, images, operator, patterns, scan, serve, shim
from ._common import EXIT_ERROR

DESCRIPTION = (
    "offscan: agentless scan offload. One appliance per host scans for every VM's shim over "
    "a shared verdict cache (ClamAV-format signatures, signed pattern updates); scan files "
    "and images offline, clone VMs that inherit verdicts, run the agent baseline and the "
    "benchmark lab."
)
# Order of the subcommands in --help: the user's path from trying it to running it.
MODULES = (scan, images, serve, shim, operator, agent, bench, patterns, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offscan", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"offscan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in MODULES:
        module.register(sub)
    return parser


def _quiet_stdout() -> None:
    """stdout's reader went away: point it at /dev/null so the interpreter's final flush
    does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def describe_error(exc: BaseException) -> str:
    """One line for an error no subcommand handled."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_ERROR
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            _quiet_stdout()
            return EXIT_ERROR
        print(f"offscan {args.command}: {describe_error(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # the last resort: one line, never a traceback
        if os.environ.get("OFFSCAN_DEBUG"):
            raise
        print(f"offscan {args.command}: {describe_error(exc)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
