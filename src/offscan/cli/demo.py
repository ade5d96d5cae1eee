"""``offscan demo``: one appliance protects a master image and 50 clones, end to end."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="50 clones protected by one appliance, end to end")
    p.add_argument("--clones", type=int, default=50, help="clones of the master (default 50)")
    p.add_argument("--files", type=int, default=300, help="files in the master image")
    p.add_argument(
        "--keep", metavar="DIR", help="build in DIR and keep it (default: temp, removed)"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(clones=args.clones, files=args.files, keep=args.keep)
