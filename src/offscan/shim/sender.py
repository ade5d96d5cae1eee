"""Delivery: the shim's sender tasks take ready backlog entries and get their verdicts.

A :class:`Sender` is shared by a fixed pool of tasks (each runs :meth:`Sender.run`). For each
entry it checks the file (``lstat``; FIFOs, devices and symlinks are never opened), hands the
content to the appliance the configured way (the path, an open descriptor or the bytes, opened
confined to the VM root), and turns the answer, or the failure, into a counted verdict. A lost
connection puts the entry back for replay. It touches the VM files (read only), the appliance
client of the :class:`~offscan.shim.connection.Connection` and the backlog, nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, cast

from .backlog import Backlog, Prio, _Entry
from .connection import Connection, ShimClient
from .watch import _VM, Skips, _skip_reason

if TYPE_CHECKING:
    from ..protocol import BatchItem
    from ..protocol.messages import LocalVerdict, ShimVerdict, Verdict

log = logging.getLogger("offscan.shim")

DEFAULT_MAX_IN_FLIGHT = 32  # sender tasks; the appliance's credits may cap in-flight scans lower
SEND_BATCH = 64  # ready entries one sender task sends together in a scan-batch
MAX_REMOTE_RETRIES = 3  # unknown-vm answers tolerated per path (re-registering in between)
CONTENT_MODES = ("auto", "path", "fd", "stream")

# (vm, relpath, verdict): the appliance's Verdict, or the ShimVerdict a failed request became
VerdictCallback = Callable[[str, str, "LocalVerdict"], None]


class _BatchClient(Protocol):
    """What batching needs of a client beyond :class:`ShimClient` (an ``ApplianceClient``
    has it; :meth:`Sender._batching` checks ``batch_limit`` before anything is sent)."""

    batch_limit: int

    async def scan_batch(
        self, items: Sequence[BatchItem], *, timeout: float | None = ...
    ) -> list[Verdict | Exception]: ...


class _Skip(Exception):
    """The file is not scanned (vanished, symlink, special file); the message is the reason."""


class Sender:
    """Gets verdicts for ready entries over the shim's :class:`Connection`.

    ``ready`` is set whenever entries may be waiting to be taken (the scheduler promoted some,
    a connection came up); idle senders wait on it. ``content`` is one of
    :data:`CONTENT_MODES` (see :class:`~offscan.shim.shim.Shim`).
    """

    def __init__(
        self,
        *,
        backlog: Backlog,
        vms: Mapping[str, _VM],
        link: Connection,
        skips: Skips,
        ready: asyncio.Event,
        content: str,
        on_verdict: VerdictCallback | None,
    ) -> None:
        self._backlog = backlog
        self._vms = vms
        self._link = link
        self._skips = skips
        self._ready = ready
        self.content = content
        self.on_verdict = on_verdict
        self.counts = {
            "sent": 0,
            "verdicts": 0,
            "clean": 0,
            "infected": 0,
            "errors": 0,
            "replayed": 0,
            "batches": 0,  # scan-batch deliveries
            "batched": 0,  # entries sent in them
            "inherited": 0,  # clone files verdicted by the clone's register reply
        }

    async def run(self) -> None:
        """One of a fixed pool of tasks: takes ready entries and gets their verdicts."""
        backlog = self._backlog
        link = self._link
        while True:
            if not link.online:
                await link.online_evt.wait()
                continue
            entry = backlog.take()
            if entry is None:
                self._ready.clear()
                await self._ready.wait()
                continue
            batch = [entry]
            if self._batching():  # more than one ready: one frame for all of them
                while len(batch) < SEND_BATCH and (more := backlog.take()) is not None:
                    batch.append(more)
            if len(batch) == 1:
                await self._deliver(entry)
            else:
                await self._deliver_batch(batch)

    def _batching(self) -> bool:
        """Whether ready entries go out as ``scan-batch`` frames: the client can send them
        (the appliance's welcome offers batches) and the content goes by path or fd."""
        client = self._link.client
        limit = getattr(client, "batch_limit", 0)
        return isinstance(limit, int) and limit > 1 and self._content_mode() in ("path", "fd")

    def _prepare(self, entry: _Entry) -> _VM | None:
        """The entry's VM if its file is to be sent; else it is done here (skipped)."""
        vm = self._vms.get(entry.vm)
        if vm is None:
            self._backlog.done(entry)
            return None
        full = os.path.join(vm.root, entry.relpath)
        try:
            reason = _skip_reason(os.lstat(full).st_mode)
        except FileNotFoundError:
            reason = "vanished"
        except OSError as exc:
            reason = f"unreadable: {exc.strerror or exc}"
        if reason is not None:
            # Never opened, never sent: FIFOs would block a reader, devices are not file content.
            self._skips.note(vm.name, entry.relpath, reason)
            self._backlog.done(entry)
            return None
        if entry.replay:
            entry.replay = False
            self.counts["replayed"] += 1
        self.counts["sent"] += 1
        return vm

    async def _deliver_batch(self, batch: list[_Entry]) -> None:
        """Several ready entries in ``scan-batch`` frames; each gets its own verdict, as if
        delivered alone (:meth:`_deliver`)."""
        backlog, link = self._backlog, self._link
        client = link.client
        if client is None or not link.online:
            for entry in batch:
                backlog.requeue(entry)
            return
        by_fd = self._content_mode() == "fd"
        sending: list[tuple[_Entry, _VM, int | None]] = []
        for entry in batch:
            vm = self._prepare(entry)
            if vm is None:
                continue
            fd = None
            if by_fd:
                try:
                    fd = _open_for_fd(vm, entry.relpath)
                except _Skip as skip:
                    self._skips.note(vm.name, entry.relpath, str(skip))
                    backlog.done(entry)
                    continue
            sending.append((entry, vm, fd))
        if not sending:
            return
        self.counts["batches"] += 1
        self.counts["batched"] += len(sending)
        results: list[Verdict | Exception]
        try:
            results = await cast("_BatchClient", client).scan_batch(
                [(vm.name, e.relpath, e.prio, fd) for e, vm, fd in sending]
            )
        except asyncio.CancelledError:
            for entry, _, _ in sending:
                backlog.requeue(entry)
            raise
        except ConnectionError as exc:
            for entry, _, _ in sending:
                backlog.requeue(entry)
            link.lost(client, exc)
            return
        except Exception as exc:  # the whole batch failed: each entry's verdict says so
            results = [exc] * len(sending)
        finally:
            for _, _, fd in sending:
                if fd is not None:
                    os.close(fd)
        for (entry, vm, _), res in zip(sending, results, strict=True):
            verdict: LocalVerdict
            if isinstance(res, Exception):
                if await self._retry_unknown_vm(client, vm, entry, res):
                    continue
                verdict = _error_verdict(vm.name, entry.relpath, res)
            else:
                verdict = res
            backlog.done(entry)
            self._count_verdict(vm.name, entry.relpath, verdict)

    async def _deliver(self, entry: _Entry) -> None:
        backlog = self._backlog
        client = self._link.client
        if entry.vm in self._vms and (client is None or not self._link.online):
            backlog.requeue(entry)
            return
        vm = self._prepare(entry)
        if vm is None or client is None:
            return
        relpath = entry.relpath
        verdict: LocalVerdict
        try:
            verdict = await self._scan(client, vm, relpath, entry.prio)
        except asyncio.CancelledError:
            backlog.requeue(entry)
            raise
        except _Skip as skip:
            self._skips.note(vm.name, relpath, str(skip))
            backlog.done(entry)
            return
        except ConnectionError as exc:
            backlog.requeue(entry)
            self._link.lost(client, exc)
            return
        except Exception as exc:  # any failure of one request becomes its verdict
            if await self._retry_unknown_vm(client, vm, entry, exc):
                return
            verdict = _error_verdict(vm.name, relpath, exc)
        backlog.done(entry)
        self._count_verdict(vm.name, relpath, verdict)

    async def _retry_unknown_vm(
        self, client: ShimClient, vm: _VM, entry: _Entry, exc: Exception
    ) -> bool:
        """The appliance forgot the VM (its inventory was reset): register it again and put
        the entry back, up to :data:`MAX_REMOTE_RETRIES` times. False for any other failure."""
        if getattr(exc, "code", None) != "unknown-vm" or entry.retries >= MAX_REMOTE_RETRIES:
            return False
        entry.retries += 1
        log.warning("VM %s: appliance does not know it; registering it again", vm.name)
        self._link.registered.discard(vm.name)
        try:
            await self._link.register(client, vm)
        except ConnectionError as lost:
            self._link.lost(client, lost)
        self._backlog.requeue(entry)
        self._ready.set()
        return True

    async def _scan(self, client: ShimClient, vm: _VM, relpath: str, prio: Prio) -> Verdict:
        mode = self._content_mode()
        if mode == "path":
            return await client.scan_path(vm.name, relpath, prio=prio)
        fd = _open_for_fd(vm, relpath)
        if mode == "fd":
            try:
                return await client.scan_fd(vm.name, relpath, fd, prio=prio)
            finally:
                os.close(fd)
        with os.fdopen(fd, "rb") as f:
            return await client.scan_stream(vm.name, relpath, f, prio=prio)

    def _content_mode(self) -> str:
        if self.content != "auto":
            return self.content
        from ..protocol import parse_address

        kind, _ = parse_address(self._link.address)
        return "path" if kind == "unix" else "stream"

    def inherited(self, vm: str, relpaths: list[str]) -> None:
        """A clone's files the appliance verdicted when the clone was registered (its register
        reply listed them, unchanged since): counted and reported like any verdict."""
        counts = self.counts
        counts["inherited"] += len(relpaths)
        counts["verdicts"] += len(relpaths)
        counts["clean"] += len(relpaths)
        if self.on_verdict is None:
            return
        for relpath in relpaths:
            verdict: dict[str, object] = {
                "t": "verdict",
                "vm": vm,
                "path": relpath,
                "status": "clean",
                "matches": [],
                "reason": None,
                "action": "allow",
                "source": "clone",
            }
            self._notify(vm, relpath, cast("Verdict", verdict))

    def _count_verdict(self, vm: str, relpath: str, verdict: LocalVerdict) -> None:
        counts = self.counts
        counts["verdicts"] += 1
        status = verdict.get("status")
        if status == "clean":
            counts["clean"] += 1
        elif status == "infected":
            counts["infected"] += 1
            log.warning(
                "VM %s: %s: %s FOUND", vm, relpath, ", ".join(verdict.get("matches") or ["?"])
            )
        else:
            counts["errors"] += 1
            log.info("VM %s: %s: scan error: %s", vm, relpath, verdict.get("reason"))
        if self.on_verdict is not None:
            self._notify(vm, relpath, verdict)

    def _notify(self, vm: str, relpath: str, verdict: LocalVerdict) -> None:
        assert self.on_verdict is not None
        try:
            self.on_verdict(vm, relpath, verdict)
        except Exception:
            log.exception("on_verdict callback failed for %s:%s", vm, relpath)


def _open_for_fd(vm: _VM, relpath: str) -> int:
    """Open a VM file to pass (or stream) its content, confined to the root; _Skip if not."""
    from ..confine import ConfinementError, open_confined

    try:
        return open_confined(vm.root, relpath)
    except FileNotFoundError:
        raise _Skip("vanished") from None
    except ConfinementError as exc:
        raise _Skip(str(exc)) from None
    except OSError as exc:
        raise _Skip(f"unreadable: {exc.strerror or exc}") from None


def _error_verdict(vm: str, relpath: str, exc: Exception) -> ShimVerdict:
    """The verdict a failed request stands for: an error, the file allowed."""
    code = getattr(exc, "code", None)
    return {
        "t": "verdict",
        "vm": vm,
        "path": relpath,
        "status": "error",
        "matches": [],
        "reason": f"{code or type(exc).__name__}: {exc}",
        "action": "allow",
        "source": "shim",
        "digest": None,
    }
