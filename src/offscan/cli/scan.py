"""``offscan scan``: clamscan-like scanning of files and directories in this process.

Follows clamscan 1.4 where it is not clearly worse (docs/clamav-compat.md lists the rest):
exit 1 when anything is infected (even with errors), 2 on errors only, 0 clean; a directory
without ``-r`` has its top-level files scanned; symlinks inside directories are reported as
``PATH: Symbolic link``; a missing path is reported on stderr as clamscan words it.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
from collections.abc import Iterator

from .. import __version__
from ..engine import (
    DEFAULT_MAX_FILE_SIZE,
    DEFAULT_SCAN_TIMEOUT,
    DEFAULT_WINDOW_SIZE,
    Matcher,
    ScanResult,
    parse_size,
)
from ..signatures import SignatureError, load_database
from ._common import EXIT_CLEAN, EXIT_ERROR, EXIT_FOUND


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("scan", help="scan files and directories (clamscan-like)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files and directories to scan")
    p.add_argument(
        "-d",
        "--database",
        action="append",
        default=[],
        metavar="DB",
        help="signature file or directory (repeatable; default: shipped patterns/)",
    )
    p.add_argument("-r", "--recursive", action="store_true", help="scan directories recursively")
    p.add_argument("-z", "--allmatch", action="store_true", help="report every matching signature")
    p.add_argument("-i", "--infected", action="store_true", help="print infected files only")
    p.add_argument("--json", action="store_true", help="one JSON object per file")
    p.add_argument("--no-summary", action="store_true", help="do not print the summary")
    p.add_argument(
        "--impl",
        choices=["auto", "c", "py"],
        default="auto",
        help="matcher core (default: native when built)",
    )
    p.add_argument(
        "--max-filesize",
        type=parse_size,
        default=DEFAULT_MAX_FILE_SIZE,
        metavar="SIZE",
        help="larger files are an error, unread (default 100m)",
    )
    p.add_argument(
        "--max-scantime",
        type=float,
        default=DEFAULT_SCAN_TIMEOUT,
        metavar="SECONDS",
        help="time limit per file",
    )
    p.add_argument(
        "--window-size",
        type=parse_size,
        default=DEFAULT_WINDOW_SIZE,
        metavar="SIZE",
        help=argparse.SUPPRESS,
    )
    p.set_defaults(run=run)


Entry = tuple[str, bool]  # (path, is a symlink met inside a directory: reported, not followed)


def _walk(path: str, recursive: bool, errors: list[ScanResult]) -> Iterator[Entry]:
    """What to report under ``path``, as clamscan does: a file named on the command line
    (symlinks followed); a directory's regular files and symlinks (not followed, reported as
    ``Symbolic link``, which also rules out loops), its subdirectories only with ``-r``.
    Special files inside directories are skipped."""
    if not os.path.isdir(path):
        yield path, False
        return

    def onerror(exc: OSError) -> None:
        errors.append(ScanResult(exc.filename, "error", reason=exc.strerror or str(exc)))

    for root, dirs, files in os.walk(path, onerror=onerror):
        dirs.sort()
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        for name in sorted([*files, *links]):
            full = os.path.join(root, name)
            try:
                st = os.lstat(full)
            except OSError:
                continue  # vanished while walking
            if stat.S_ISLNK(st.st_mode):
                yield full, True
            elif stat.S_ISREG(st.st_mode):  # FIFOs, devices, sockets are skipped
                yield full, False
        if not recursive:
            return


def _clamscan_warning(r: ScanResult) -> str | None:
    """clamscan's stderr lines for a path named on the command line that cannot be scanned
    at all (missing, or not a regular file); None for errors reported as ``PATH: ... ERROR``."""
    if r.reason and r.reason.startswith("no such file"):
        return f"{r.path}: No such file or directory\nWARNING: {r.path}: Can't access file"
    if r.reason and r.reason.startswith("not a regular file"):
        return f"WARNING: {r.path}: Not supported file type"
    return None


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    try:
        db = load_database(*args.database)
        matcher = Matcher(
            db,
            impl=args.impl,
            window_size=args.window_size,
            max_file_size=args.max_filesize,
            max_scan_time=args.max_scantime,
        )
    except (SignatureError, RuntimeError, ValueError) as exc:  # bad database, --impl c unbuilt
        print(f"offscan: {exc}", file=sys.stderr)
        return EXIT_ERROR
    out = sys.stdout
    scanned = infected = errors_n = 0
    data = 0
    errors: list[ScanResult] = []

    def report(r: ScanResult, named: bool = False) -> None:
        nonlocal scanned, infected, errors_n, data
        if r.status == "error":
            errors_n += 1
        else:
            scanned += 1
            data += r.bytes_scanned
        if r.infected:
            infected += 1
        warning = _clamscan_warning(r) if named and r.status == "error" else None
        if args.json:
            out.write(json.dumps(r.to_json()) + "\n")
        elif warning:
            out.flush()
            print(warning, file=sys.stderr)
        elif r.status == "error":
            print(f"{r.path}: {r.reason} ERROR", file=out)
        elif r.infected:  # one write per file: with --allmatch a file can have thousands
            out.write("".join(f"{r.path}: {name} FOUND\n" for name in r.matches))
        elif not args.infected:
            out.write(f"{r.path}: OK\n")

    for path in args.paths:
        for f, link in _walk(path, args.recursive, errors):
            if link:
                if not args.infected and not args.json:
                    out.write(f"{f}: Symbolic link\n")
                continue
            report(matcher.scan_path(f, allmatch=args.allmatch), named=f == path)
        while errors:
            report(errors.pop(0))
        out.flush()
    if not args.no_summary and not args.json:
        elapsed = time.monotonic() - t0
        print(
            "\n----------- SCAN SUMMARY -----------\n"
            f"Known viruses: {db.signature_count}\n"
            + "".join(f"Database: {c.describe()}\n" for c in db.containers)
            + f"Engine version: offscan {__version__} ({'native' if matcher.native else 'python'})\n"
            f"Scanned files: {scanned}\n"
            f"Infected files: {infected}\n"
            + (f"Total errors: {errors_n}\n" if errors_n else "")
            + f"Data scanned: {data / 1e6:.2f} MB\n"
            f"Time: {elapsed:.3f} sec",
            file=out,
        )
    if infected:  # an infection wins over errors, as in clamscan
        return EXIT_FOUND
    return EXIT_ERROR if errors_n else EXIT_CLEAN
