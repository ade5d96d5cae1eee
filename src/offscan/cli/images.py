"""``offscan scan-image``: scan a directory tree, tar or OCI image layout, or a disk image.

The arguments are defined here and handed, typed, to :func:`offscan.images.run_scan_image`,
which scans and prints the report (domain modules take typed arguments, argparse lives in
``offscan.cli``).
"""

from __future__ import annotations

import argparse

from ..engine import DEFAULT_MAX_FILE_SIZE, DEFAULT_SCAN_TIMEOUT, parse_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "scan-image",
        help="scan a directory tree, tar or OCI image layout, or a disk image "
        "(raw, QCOW2, VMDK, VHD, VHDX, VDI) without mounting it",
    )
    add_scan_image_arguments(p)
    p.set_defaults(run=run)


def add_scan_image_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``offscan scan-image`` (the CLI registers the subcommand)."""
    parser.add_argument(
        "path",
        metavar="PATH",
        help="directory tree, tar archive (plain, gz, bz2, xz), OCI layout, or disk image "
        "(raw/QCOW2/VMDK/VHD/VHDX/VDI; MBR/GPT/LVM; ext2/3/4, XFS, NTFS, FAT, exFAT), "
        "told apart by magic bytes",
    )
    parser.add_argument(
        "-d",
        "--database",
        action="append",
        default=[],
        metavar="DB",
        help="signature file or directory (repeatable; default: shipped patterns/)",
    )
    parser.add_argument(
        "--state",
        metavar="DIR",
        help="keep layer and filesystem verdicts in DIR so later runs do not rescan shared "
        "layers, and clones of a disk inherit its base's verdicts",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument(
        "--layer",
        metavar="DIGEST",
        help="scan this layer alone (its own files; whiteouts listed, not applied)",
    )
    parser.add_argument(
        "--ref", metavar="NAME", help="OCI layout: the manifest whose ref.name annotation is NAME"
    )
    parser.add_argument("-i", "--infected", action="store_true", help="print infected files only")
    parser.add_argument(
        "--impl",
        choices=["auto", "c", "py"],
        default="auto",
        help="matcher core (default: native when built)",
    )
    parser.add_argument(
        "--max-filesize",
        type=parse_size,
        default=DEFAULT_MAX_FILE_SIZE,
        metavar="SIZE",
        help="larger files are an error, unread (default 100m)",
    )
    parser.add_argument(
        "--max-scantime",
        type=float,
        default=DEFAULT_SCAN_TIMEOUT,
        metavar="SECONDS",
        help="time limit per file",
    )


def run(args: argparse.Namespace) -> int:
    """``offscan scan-image``: clamscan-like lines ``IMAGE:/path: Sig FOUND`` and a summary.

    Exit status 0 clean, 1 infected, 2 on any error (as clamscan).
    """
    from ..images.command import run_scan_image  # on use: `offscan --help` stays light

    return run_scan_image(
        args.path,
        databases=args.database,
        state_dir=args.state,
        ref=args.ref,
        layer=args.layer,
        as_json=args.json,
        infected_only=args.infected,
        impl=args.impl,
        max_file_size=args.max_filesize,
        max_scan_time=args.max_scantime,
    )
