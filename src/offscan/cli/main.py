"""The parser of every subcommand, assembled from this package's modules, and ``main``.

``main`` is also the last line of defence of "no traceback reaches a user": an error no
subcommand handled becomes one line on stderr and exit 2, a closed stdout (``| head``) ends
the command quietly, Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ._common import EXIT_ERROR

DESCRIPTION = (
    "offscan: agentless scan offload. One appliance per host scans for every VM's shim over "
    "a shared verdict cache (ClamAV-format signatures, signed pattern updates); scan files "
    "and images offline, clone VMs that inherit verdicts, run the agent baseline and the "
    "benchmark lab."
)
# Order of the subcommands in --help: the user's path from trying it to running it.
MODULES = ("scan", "images", "serve", "shim", "operator", "agent", "bench", "patterns", "demo")
# The module of this package that registers each subcommand. A command line that names one
# builds only that module's parser: the others import the appliance, the lab and the update
# code for their defaults, which is most of a short `offscan scan`'s start-up
# (tests/test_cli_scan.py checks this table against the full parser).
COMMANDS = {
    "scan": "scan",
    "scan-image": "images",
    "serve": "serve",
    "shim": "shim",
    "status": "operator",
    "vm": "operator",
    "policy": "operator",
    "quarantine": "operator",
    "reload": "operator",
    "agent": "agent",
    "bench": "bench",
    "patterns": "patterns",
    "demo": "demo",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with ``command`` (a key of COMMANDS) only that subcommand's."""
    parser = argparse.ArgumentParser(prog="offscan", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"offscan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names = (COMMANDS[command],) if command in COMMANDS else MODULES
    for name in names:
        importlib.import_module(f"{__package__}.{name}").register(sub)
    return parser


def _named_command(argv: Sequence[str]) -> str | None:
    """The subcommand a command line names, if its first word is one (options before it,
    such as --help or --version, need the whole parser)."""
    return argv[0] if argv and argv[0] in COMMANDS else None


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
    words = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_named_command(words)).parse_args(words)
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
