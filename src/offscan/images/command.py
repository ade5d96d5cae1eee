"""``offscan scan-image`` without the argument parsing: scan one image and print the report.

:func:`run_scan_image` loads the patterns, scans the image and prints clamscan-like lines
(``IMAGE:/path: Sig FOUND``) and a summary, or one JSON object; it returns the exit status.
The arguments are parsed by :mod:`offscan.cli.images`. Writes to stdout and stderr, and through
the layer cache to the state directory when one is given.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TextIO

from .. import __version__
from ..engine import DEFAULT_MAX_FILE_SIZE, DEFAULT_SCAN_TIMEOUT, Matcher
from ..signatures import SignatureError, load_database
from .errors import ImageError
from .helpers import printable
from .merge import scan_image
from .results import EXIT_ERROR, ImageReport

_KINDS = {"directory": "directory tree", "tar": "tar archive", "oci": "OCI image layout"}


def run_scan_image(
    path: str,
    *,
    databases: Sequence[str] = (),
    state_dir: str | None = None,
    ref: str | None = None,
    layer: str | None = None,
    as_json: bool = False,
    infected_only: bool = False,
    impl: str = "auto",
    max_file_size: int = DEFAULT_MAX_FILE_SIZE,
    max_scan_time: float = DEFAULT_SCAN_TIMEOUT,
) -> int:
    """Scan the image at ``path`` and print its report; exit status 0 clean, 1 infected, 2 on
    any error (as clamscan).

    ``databases`` are signature files or directories (none: the shipped patterns);
    ``state_dir`` keeps layer verdicts for later runs; ``ref`` and ``layer`` are passed to
    :func:`scan_image`; ``infected_only`` leaves out the ``OK`` lines.
    """
    out = sys.stdout
    try:
        db = load_database(*databases)
        matcher = Matcher(db, impl=impl, max_file_size=max_file_size, max_scan_time=max_scan_time)
        report = scan_image(path, matcher, state_dir=state_dir, ref=ref, layer=layer)
    except (SignatureError, ImageError, RuntimeError, OSError) as exc:
        print(f"offscan: {printable(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    if as_json:
        out.write(json.dumps(report.to_json()) + "\n")
        return report.exit_code
    for w in report.warnings:
        print(f"offscan: warning: {printable(w)}", file=sys.stderr)
    image = printable(path)
    _print_files(out, image, report, infected_only=infected_only)
    _print_summary(out, image, report, signatures=db.signature_count, native=matcher.native)
    out.flush()
    return report.exit_code


def _print_files(out: TextIO, image: str, report: ImageReport, *, infected_only: bool) -> None:
    """One line per file (``OK``, ``FOUND`` per signature, ``ERROR``), then listed whiteouts."""
    for f in report.files:
        where = f"{image}:{printable(f.path)}"
        if f.status == "error":
            out.write(f"{where}: {printable(f.reason or 'error')} ERROR\n")
        elif f.infected:
            for name in f.matches:
                out.write(f"{where}: {name} FOUND\n")
        elif not infected_only:
            out.write(f"{where}: OK\n")
    if report.layer is not None:
        for w in report.whiteouts:
            out.write(f"{image}:{printable(w)}: whiteout (not applied)\n")


def _print_summary(
    out: TextIO, image: str, report: ImageReport, *, signatures: int, native: bool
) -> None:
    title = _KINDS.get(report.kind, report.kind)
    if report.ref:
        title += f", ref {report.ref}"
    if report.manifest:
        title += f", manifest {report.manifest}"
    if report.layer:
        title += f"; layer {report.layer} alone, whiteouts not applied"
    out.write(
        "\n----------- IMAGE SCAN SUMMARY -----------\n"
        f"Image: {image} ({title})\n"
        f"Known viruses: {signatures}\n"
        f"Engine version: offscan {__version__} ({'native' if native else 'python'})\n"
        + _layers_line(report)
        + f"Scanned files: {len(report.files) - len(report.errors)}\n"
        f"Infected files: {len(report.infected)}\n"
        + (f"Skipped (not regular files): {len(report.skipped)}\n" if report.skipped else "")
        + (f"Total errors: {len(report.errors)}\n" if report.errors else "")
        + f"Data read: {report.bytes_read / 1e6:.2f} MB ({report.bytes_read} bytes)\n"
        f"Data scanned: {report.bytes_scanned / 1e6:.2f} MB ({report.bytes_scanned} bytes)\n"
        f"Time: {report.elapsed:.3f} sec\n"
    )


def _layers_line(report: ImageReport) -> str:
    if "disk image" not in report.kind:
        return (
            f"Layers: {len(report.layers)} ({report.layers_scanned} scanned, "
            f"{report.layers_cached} from cache)\n"
        )
    hows = [how for _, how in report.layers]
    return (
        f"Filesystems: {len(hows)} ({hows.count('scanned')} scanned, "
        f"{hows.count('delta')} as a delta over the base, {hows.count('cached')} from cache)\n"
        f"Files read: {report.files_read}; inherited from the base unread: "
        f"{report.files_inherited}\n"
    )
