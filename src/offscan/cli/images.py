"""``offscan scan-image``: scan a directory tree, tar or OCI image layout.

The arguments are still defined by ``offscan.images``; they move here (domain modules take typed
arguments, argparse lives in ``offscan.cli``).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ..images import add_scan_image_arguments

    p = sub.add_parser("scan-image", help="scan a directory tree, tar or OCI image layout")
    add_scan_image_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..images import cmd_scan_image

    return cmd_scan_image(args)
