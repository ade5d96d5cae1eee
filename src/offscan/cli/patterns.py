"""``offscan patterns``: signed pattern bundles: build, diff, keygen, sign, verify, apply, fetch,
status, serve.

The parser of every ``offscan patterns ACTION`` and the glue from parsed arguments to the typed
functions of :mod:`offscan.updates.commands`, which do the work, print the result and give the
exit status (0 on success, 1 if a bundle is rejected, 2 on errors).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..updates import commands
from ..updates.server import DEFAULT_PORT

HELP = "signed pattern bundles: build, diff, keygen, sign, verify, serve"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("patterns", help=HELP)
    add_patterns_arguments(p)
    p.set_defaults(run=run)


def add_patterns_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``offscan patterns`` subcommands (``register`` adds the command itself)."""
    sub = parser.add_subparsers(dest="patterns_command", required=True, metavar="ACTION")

    p = sub.add_parser("build", help="build a full bundle from a directory of signature files")
    p.add_argument(
        "directory", metavar="DIR", help="directory of signature files (build) or bundles (serve)"
    )
    p.add_argument(
        "--version",
        type=int,
        required=True,
        metavar="N",
        help="pattern version (integer, increasing)",
    )
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE", help="bundle to write")
    p.add_argument("--key", metavar="KEY", help="sign with this private key")

    p = sub.add_parser(
        "diff", help="build a delta bundle from OLD to NEW (full bundles or directories)"
    )
    p.add_argument("old", metavar="OLD", help="old full bundle or signature directory")
    p.add_argument("new", metavar="NEW", help="new full bundle or signature directory")
    p.add_argument("-o", "--output", required=True, metavar="DELTA", help="delta bundle to write")
    p.add_argument(
        "--version", type=int, metavar="N", help="NEW's version (required if NEW is a directory)"
    )
    p.add_argument(
        "--parent", type=int, metavar="N", help="OLD's version (required if OLD is a directory)"
    )
    p.add_argument("--key", metavar="KEY", help="sign with this private key")
    p.add_argument(
        "--trust", action="append", metavar="PUB", help="verify OLD/NEW bundles with this key"
    )

    p = sub.add_parser(
        "keygen", help="create an Ed25519 signing key pair PREFIX.key and PREFIX.pub"
    )
    p.add_argument(
        "-o", "--output", required=True, metavar="PREFIX", help="writes PREFIX.key and PREFIX.pub"
    )
    p.add_argument("--force", action="store_true", help="replace existing files")

    p = sub.add_parser("sign", help="sign a bundle in place (or to -o)")
    p.add_argument("bundle", metavar="BUNDLE", help="the bundle file")
    p.add_argument("--key", required=True, metavar="KEY", help="the private key")
    p.add_argument("-o", "--output", metavar="OUT", help="write here (default: in place)")

    _add_store_arguments(sub)

    p = sub.add_parser("serve", help="serve a directory of bundles over HTTP")
    p.add_argument(
        "directory", metavar="DIR", help="directory of signature files (build) or bundles (serve)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")


def _add_store_arguments(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The actions that check bundles against trusted keys: verify, apply, fetch, status."""
    p = sub.add_parser("verify", help="check a bundle's signature and digests")
    p.add_argument("bundle", metavar="BUNDLE", help="the bundle file")
    _trust(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("apply", help="apply a bundle to a pattern store")
    p.add_argument("bundle", metavar="BUNDLE", help="the bundle file")
    _store(p)
    _trust(p)

    p = sub.add_parser("fetch", help="update a pattern store from an update server, once")
    p.add_argument("url", metavar="URL", help="the update server")
    _store(p)
    _trust(p)

    p = sub.add_parser("status", help="show a pattern store's version and origin")
    _store(p)
    _trust(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def _trust(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust",
        action="append",
        required=True,
        metavar="PUB",
        help="trusted public key (repeatable)",
    )


def _store(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, metavar="DIR", help="the pattern store directory")


def run(args: argparse.Namespace) -> int:
    """Run ``offscan patterns ACTION``: 0 on success, 1 if a bundle is rejected, 2 on errors."""
    action: str = args.patterns_command
    actions: dict[str, Callable[[], int]] = {
        "build": lambda: commands.build(
            args.directory, version=args.version, output=args.output, key=args.key
        ),
        "diff": lambda: commands.diff(
            args.old,
            args.new,
            output=args.output,
            version=args.version,
            parent=args.parent,
            key=args.key,
            trust=args.trust,
        ),
        "keygen": lambda: commands.keygen(args.output, force=args.force),
        "sign": lambda: commands.sign(args.bundle, key=args.key, output=args.output),
        "verify": lambda: commands.verify(args.bundle, trust=args.trust, as_json=args.json),
        "apply": lambda: commands.apply(args.bundle, store=args.store, trust=args.trust),
        "fetch": lambda: commands.fetch(args.url, store=args.store, trust=args.trust),
        "status": lambda: commands.status(store=args.store, trust=args.trust, as_json=args.json),
        "serve": lambda: commands.serve(args.directory, host=args.host, port=args.port),
    }
    return commands.run_action(action, actions[action])
