"""The ``offscan`` command line: every argparse definition of the project lives in this package.

One module per group of subcommands; each has ``register(sub)`` that adds its parsers and binds
each to a ``run`` function taking the parsed arguments and returning the exit status. Domain
modules take typed arguments and never see ``argparse`` or ``sys.argv``.
"""

from __future__ import annotations

from ._common import DEFAULT_SOCKET, EXIT_CLEAN, EXIT_ERROR, EXIT_FOUND
from .main import build_parser, main

__all__ = ["DEFAULT_SOCKET", "EXIT_CLEAN", "EXIT_ERROR", "EXIT_FOUND", "build_parser", "main"]
