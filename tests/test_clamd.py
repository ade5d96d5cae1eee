"""The clamd-compatible front against real clients: Debian's ``clamdscan``, the PyPI ``clamd``
client, and raw sockets for the protocol's corners (prefixes, IDSESSION, INSTREAM limits,
FILDES, confinement, hostile input). Every test runs a real ``offscan serve``."""

from __future__ import annotations

import array
import hashlib
import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import clamd as clamd_client
import pytest
from helpers import EICAR, EICAR_NAME, ApplianceProc, run, wait_for

CLAMDSCAN = shutil.which("clamdscan")
TIMEOUT = 30.0  # seconds: a hang guard, never a speed assertion
STREAM_MAX = 3 << 20  # bytes, the test appliance's StreamMaxLength
ANYWHERE = b"offscan-clamd-anywhere-marker"  # matched at any offset (Test-Anywhere)
TAIL = b"offscan-tail-16b"  # 16 bytes, matched only as the last 16 (Test-Tail, EOF-16)
HASHED = b"a file known by its SHA-256 only"  # Test-Hash (.hsb)


def clamd_argv(sock: Path, root: Path, *extra: str) -> list[str]:
    return ["--clamd-socket", str(sock), "--clamd-root", str(root), *extra]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("clamd")
    root = work / "root"
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "eicar.com").write_bytes(EICAR)
    (root / "clean.txt").write_bytes(b"nothing to see here\n")
    (root / "sub" / "e2.bin").write_bytes(EICAR)
    (root / "sub" / "deep" / "ok").write_bytes(b"ok")
    (root / "cleandir").mkdir()
    (root / "cleandir" / "a").write_bytes(b"a clean file")
    (root / "link").symlink_to("/etc/passwd")
    (root / "dirlink").symlink_to("/etc")
    outside = work / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(EICAR)
    db = work / "db"
    db.mkdir()
    patterns = Path(__file__).resolve().parent.parent / "patterns"
    for f in ("offscan.ndb", "offscan.hdb"):
        shutil.copy(patterns / f, db / f)
    (db / "test.ndb").write_text(
        f"Test-Anywhere:0:*:{ANYWHERE.hex()}\nTest-Tail:0:EOF-16:{TAIL.hex()}\n"
    )
    (db / "test.hsb").write_text(f"{hashlib.sha256(HASHED).hexdigest()}:{len(HASHED)}:Test-Hash\n")
    return work


@pytest.fixture(scope="module")
def app(tree: Path) -> Iterator[ApplianceProc]:
    sock = tree / "clamd.sock"
    a = ApplianceProc(
        tree,
        *clamd_argv(sock, tree / "root", "--clamd-stream-max", str(STREAM_MAX)),
        "-d",
        str(tree / "db"),
        "--clamd-socket-mode",
        "666",
    )
    a.clamd = sock  # type: ignore[attr-defined]
    try:
        yield a
    finally:
        a.stop()


def csock(app: ApplianceProc) -> Path:
    return app.clamd  # type: ignore[attr-defined, no-any-return]


def talk(path: Path, data: bytes, *, fds: list[int] | None = None, shut: bool = False) -> bytes:
    """Send ``data`` (with ``fds`` as SCM_RIGHTS on a 1-byte packet after it) and read the
    whole reply until the server closes."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(TIMEOUT)
    s.connect(str(path))
    try:
        s.sendall(data)
        if fds is not None:
            s.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        if shut:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out
    finally:
        s.close()


def chunks(data: bytes, size: int) -> bytes:
    out = b"".join(
        struct.pack(">I", len(data[i : i + size])) + data[i : i + size]
        for i in range(0, len(data), size)
    )
    return out + struct.pack(">I", 0)


def assert_alive(app: ApplianceProc) -> None:
    assert app.p.poll() is None, app.output()
    assert talk(csock(app), b"zPING\0") == b"PONG\0"


# -- Debian's clamdscan ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def clamdscan_conf(app: ApplianceProc, tree: Path) -> Path:
    if CLAMDSCAN is None:
        pytest.skip("clamdscan is not installed")
    conf = tree / "clamd.conf"
    conf.write_text(f"LocalSocket {csock(app)}\n")
    return conf


def clamdscan(conf: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    assert CLAMDSCAN is not None
    return subprocess.run(
        [CLAMDSCAN, f"--config-file={conf}", "--no-summary", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("mode", ["--fdpass", "--stream", "--multiscan", None])
def test_clamdscan_finds_eicar_and_passes_clean(
    clamdscan_conf: Path, tree: Path, mode: str | None
) -> None:
    root = tree / "root"
    args = [mode] if mode else []
    out = clamdscan(clamdscan_conf, *args, root / "eicar.com", root / "clean.txt")
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"{root / 'eicar.com'}: {EICAR_NAME} FOUND" in out.stdout
    assert f"{root / 'clean.txt'}: OK" in out.stdout
    whole = clamdscan(clamdscan_conf, *args, root)
    assert whole.returncode == 1, whole.stdout + whole.stderr
    assert f"{root / 'sub' / 'e2.bin'}: {EICAR_NAME} FOUND" in whole.stdout
    clean = clamdscan(clamdscan_conf, *args, root / "cleandir")
    assert clean.returncode == 0, clean.stdout + clean.stderr


def test_clamdscan_ping_version_reload(clamdscan_conf: Path, app: ApplianceProc) -> None:
    ping = clamdscan(clamdscan_conf, "--ping", "1")
    assert ping.returncode == 0 and "PONG" in ping.stdout
    ver = clamdscan(clamdscan_conf, "--version")
    assert ver.returncode == 0 and ver.stdout.startswith("ClamAV offscan-")
    reload = clamdscan(clamdscan_conf, "--reload")
    assert reload.returncode == 0, reload.stdout + reload.stderr
    assert_alive(app)


def test_clamdscan_outside_the_roots_is_an_error(clamdscan_conf: Path, tree: Path) -> None:
    out = clamdscan(clamdscan_conf, tree / "outside" / "secret")
    assert out.returncode == 2
    assert "FOUND" not in out.stdout
    assert "outside the scan roots" in out.stdout + out.stderr


# -- the PyPI clamd client ------------------------------------------------------------------


def test_pypi_clamd_client(app: ApplianceProc, tree: Path) -> None:
    root = tree / "root"
    c = clamd_client.ClamdUnixSocket(str(csock(app)), timeout=TIMEOUT)
    assert c.ping() == "PONG"
    assert c.version().startswith("ClamAV offscan-")
    assert c.scan(str(root / "eicar.com")) == {str(root / "eicar.com"): ("FOUND", EICAR_NAME)}
    assert c.scan(str(root / "clean.txt")) == {str(root / "clean.txt"): ("OK", None)}
    found = c.contscan(str(root))
    assert found == {
        str(root / "eicar.com"): ("FOUND", EICAR_NAME),
        str(root / "sub" / "e2.bin"): ("FOUND", EICAR_NAME),
    }
    assert c.multiscan(str(root)) == found
    assert c.instream(io.BytesIO(EICAR)) == {"stream": ("FOUND", EICAR_NAME)}
    assert c.instream(io.BytesIO(b"clean" * 1000)) == {"stream": ("OK", None)}
    assert "END" in c.stats()
    with pytest.raises(clamd_client.BufferTooLongError):
        c.instream(io.BytesIO(b"x" * (STREAM_MAX + 1)))
    assert_alive(app)


# -- the protocol, byte by byte -------------------------------------------------------------


def test_prefixes_and_delimiters(app: ApplianceProc) -> None:
    s = csock(app)
    assert talk(s, b"zPING\0") == b"PONG\0"
    assert talk(s, b"nPING\n") == b"PONG\n"
    assert talk(s, b"PING\n") == b"PONG\n"
    assert talk(s, b"PING", shut=True) == b"PONG\n"  # plain command ended by the close
    assert talk(s, b"PING") == b"PONG\n"  # a bare word alone in its packet, as clamd takes it
    assert talk(s, b"zFOO\0") == b"UNKNOWN COMMAND\0"
    assert talk(s, b"zSCAN\0") == b"UNKNOWN COMMAND\0"  # SCAN needs a path
    assert talk(s, b"INSTREAM\n") == b"UNKNOWN COMMAND\n"  # INSTREAM needs a prefix
    assert talk(s, b"ALLMATCHSCAN /x\n") == b"UNKNOWN COMMAND\n"
    vc = talk(s, b"nVERSIONCOMMANDS\n").decode()
    for cmd in ("SCAN", "INSTREAM", "FILDES", "IDSESSION", "ALLMATCHSCAN", "STATS"):
        assert f" {cmd}" in vc


def test_scan_family_replies(app: ApplianceProc, tree: Path) -> None:
    s, root = csock(app), tree / "root"
    eicar, e2 = root / "eicar.com", root / "sub" / "e2.bin"
    assert talk(s, f"zSCAN {eicar}\0".encode()) == f"{eicar}: {EICAR_NAME} FOUND\0".encode()
    assert talk(s, f"nSCAN {root / 'clean.txt'}\n".encode()) == f"{root}/clean.txt: OK\n".encode()
    # SCAN stops at the first detection in a directory, CONTSCAN and MULTISCAN go on
    assert talk(s, f"zSCAN {root}\0".encode()) == f"{eicar}: {EICAR_NAME} FOUND\0".encode()
    both = f"{eicar}: {EICAR_NAME} FOUND\0{e2}: {EICAR_NAME} FOUND\0".encode()
    assert talk(s, f"zCONTSCAN {root}\0".encode()) == both
    assert talk(s, f"zMULTISCAN {root}\0".encode()) == both
    assert talk(s, f"zALLMATCHSCAN {eicar}\0".encode()) == f"{eicar}: {EICAR_NAME} FOUND\0".encode()
    assert talk(s, f"zCONTSCAN {root}/cleandir\0".encode()) == f"{root}/cleandir: OK\0".encode()
    missing = talk(s, f"zSCAN {root}/nope\0".encode()).decode()
    assert missing == f"{root}/nope: File path check failure: No such file or directory. ERROR\0"


@pytest.mark.parametrize(
    "path, reason",
    [
        ("{outside}/secret", "outside the scan roots"),
        ("{root}/../outside/secret", "outside the scan roots"),
        ("{root}/sub/../../outside/secret", "outside the scan roots"),
        ("relative/path", "a full path is required"),
        ("{root}/link", "Symbolic link not followed"),
        ("{root}/dirlink/passwd", "Symbolic link not followed"),
        ("/etc/passwd", "outside the scan roots"),
    ],
)
def test_paths_are_confined_to_the_roots(
    app: ApplianceProc, tree: Path, path: str, reason: str
) -> None:
    p = path.format(root=tree / "root", outside=tree / "outside")
    for cmd in ("SCAN", "CONTSCAN", "MULTISCAN", "ALLMATCHSCAN"):
        out = talk(csock(app), f"z{cmd} {p}\0".encode()).decode()
        assert out.endswith(". ERROR\0") and reason in out, out
        assert "FOUND" not in out


def test_idsession(app: ApplianceProc, tree: Path) -> None:
    eicar = tree / "root" / "eicar.com"
    fd = os.open(eicar, os.O_RDONLY)
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(TIMEOUT)
        s.connect(str(csock(app)))
        s.sendall(b"zIDSESSION\0zPING\0nVERSION\n" + f"zSCAN {eicar}\0".encode())
        s.sendall(b"zINSTREAM\0" + chunks(EICAR, 7) + b"zFILDES\0")
        s.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        s.sendall(b"zEND\0")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        s.close()
    finally:
        os.close(fd)
    lines = out.replace(b"\n", b"\0").decode().split("\0")[:-1]
    assert lines[0] == "1: PONG"
    assert lines[1].startswith("2: ClamAV offscan-")
    assert lines[2] == f"3: {eicar}: {EICAR_NAME} FOUND"
    assert lines[3] == f"4: stream: {EICAR_NAME} FOUND"
    assert lines[4].startswith("5: fd[") and lines[4].endswith(f"]: {EICAR_NAME} FOUND")
    assert len(lines) == 5
    bad = talk(csock(app), f"zIDSESSION\0zPING\0zCONTSCAN {eicar}\0zPING\0".encode())
    assert bad == b"1: PONG\x002: Command invalid inside IDSESSION. ERROR\0"


def test_instream_limits_and_splits(app: ApplianceProc) -> None:
    s = csock(app)

    def stream(data: bytes, size: int) -> bytes:
        return talk(s, b"zINSTREAM\0" + chunks(data, size))

    for size in (1, 2, 33, 64, 65536):
        assert stream(EICAR, size) == f"stream: {EICAR_NAME} FOUND\0".encode(), size
        assert stream(b"pad" + ANYWHERE + b"pad", size) == b"stream: Test-Anywhere FOUND\0"
        assert stream(b"pad" + TAIL, size) == b"stream: Test-Tail FOUND\0"
        assert stream(TAIL + b"x", size) == b"stream: OK\0"  # not at the end
        assert stream(HASHED, size) == b"stream: Test-Hash FOUND\0"
        assert stream(HASHED + b"x", size) == b"stream: OK\0"
    assert stream(b"", 1) == b"stream: OK\0"
    assert stream(b"x" + EICAR, 7) == b"stream: OK\0"  # EICAR's signature is at offset 0
    # a marker across the 1 MiB window boundary of a 2.5 MiB stream, sent in odd chunks, and
    # the tail signature at its very end
    big = b"\x00" * ((1 << 20) - 10) + ANYWHERE + b"\x01" * (3 << 19)
    assert stream(big, 100_003) == b"stream: Test-Anywhere FOUND\0"
    assert stream(big[:-16] + TAIL, 65536) == b"stream: Test-Anywhere FOUND\0"
    allmatch = talk(s, b"zIDSESSION\0zINSTREAM\0" + chunks(big[:-16] + TAIL, 65536) + b"zEND\0")
    assert allmatch == b"1: stream: Test-Anywhere FOUND\0"
    over = b"zINSTREAM\0" + struct.pack(">I", STREAM_MAX + 1)
    assert talk(s, over) == b"INSTREAM size limit exceeded. ERROR\0"
    piecewise = b"zINSTREAM\0" + chunks(b"y" * (STREAM_MAX + 10), 1 << 20)
    try:
        out = talk(s, piecewise)
    except (BrokenPipeError, ConnectionResetError):
        out = b"INSTREAM size limit exceeded. ERROR\0"  # closed on us while we were sending
    assert out == b"INSTREAM size limit exceeded. ERROR\0"
    assert_alive(app)


def test_stream_verdicts_reach_the_event_log(app: ApplianceProc) -> None:
    talk(csock(app), b"zINSTREAM\0" + chunks(b"event log check " + EICAR, 5))
    wait_for(
        lambda: any(
            e.get("vm") == "clamd" and e.get("path") == "stream" and e.get("status") == "infected"
            for e in app.events()
        ),
        TIMEOUT,
        "clamd stream verdict in events.jsonl",
    )


def test_fildes_corner_cases(app: ApplianceProc, tree: Path) -> None:
    s = csock(app)
    assert talk(s, b"zFILDES\0", shut=True) == b"No file descriptor received. ERROR\0"
    r, w = os.pipe()
    try:
        os.write(w, EICAR)
        out = talk(s, b"zFILDES\0", fds=[r])
        assert out.endswith(b"Not supported file type. ERROR\0"), out
    finally:
        os.close(r)
        os.close(w)
    fd = os.open(tree / "root" / "clean.txt", os.O_RDONLY)
    try:
        assert talk(s, b"nFILDES\n", fds=[fd]).endswith(b": OK\n")
    finally:
        os.close(fd)
    wfd = os.open(tree / "root" / "eicar.com", os.O_WRONLY)
    try:
        out = talk(s, b"zFILDES\0", fds=[wfd])
        assert out.endswith(b"Descriptor not open for reading. ERROR\0"), out
    finally:
        os.close(wfd)


def test_allmatchscan_reports_every_signature(app: ApplianceProc, tree: Path) -> None:
    both = tree / "root" / "sub" / "deep" / "both"
    both.write_bytes(b"x" + ANYWHERE + b"y" + TAIL)
    try:
        out = talk(csock(app), f"zALLMATCHSCAN {both}\0".encode())
        assert out == f"{both}: Test-Anywhere FOUND\0{both}: Test-Tail FOUND\0".encode()
        assert talk(csock(app), f"zSCAN {both}\0".encode()) == (
            f"{both}: Test-Anywhere FOUND\0".encode()
        )
    finally:
        both.unlink()


def test_hostile_input_never_crashes(app: ApplianceProc) -> None:
    s = csock(app)
    too_long = talk(s, b"zSCAN /" + b"a" * 20000 + b"\0")
    assert b"ERROR" in too_long
    assert talk(s, os.urandom(64).replace(b"\0", b"x").replace(b"\n", b"x") + b"\n") in (
        b"UNKNOWN COMMAND\n",
        b"",
    )
    # early closes: mid-command, mid-chunk-header, mid-chunk, after a chunk
    for data in (b"zSCA", b"zINSTREAM\0\x00\x00", b"zINSTREAM\0\x00\x00\x10\x00abc",
                 b"zINSTREAM\0" + struct.pack(">I", 3) + b"abc"):  # fmt: skip
        assert talk(s, data, shut=True) == b""
    # a stream abandoned without closing, then the connection reset
    c = socket.socket(socket.AF_UNIX)
    c.connect(str(s))
    c.sendall(b"zINSTREAM\0" + struct.pack(">I", 1000) + b"x" * 10)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    assert_alive(app)
    assert "Traceback" not in app.output()


# -- operator commands and connection limits (an appliance of their own) ---------------------


def _as_nobody(path: Path, data: bytes) -> bytes:
    """``talk`` from a child process running as uid 65534 (nobody)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            os.write(w, talk(path, data))
        finally:
            os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return out


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another uid")
def test_shutdown_is_for_operators_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    public = Path(tempfile.mkdtemp(prefix="offscan-clamd-"))  # reachable by uid nobody
    public.chmod(0o755)
    sock = public / "c.sock"
    a = ApplianceProc(
        tmp_path,
        *clamd_argv(sock, root, "--clamd-listen", "127.0.0.1:0", "--clamd-socket-mode", "666"),
    )
    try:
        refused = _as_nobody(sock, b"zSHUTDOWN\0")
        assert refused == b"SHUTDOWN: operator only, refused for uid 65534. ERROR\0"
        assert _as_nobody(sock, b"zRELOAD\0").startswith(b"RELOAD: operator only")
        assert _as_nobody(sock, b"zPING\0") == b"PONG\0"
        assert a.p.poll() is None
        assert talk(sock, b"zSHUTDOWN\0") == b""
        wait_for(lambda: a.p.poll() is not None, TIMEOUT, "appliance exit after SHUTDOWN")
        assert a.p.returncode == 0, a.output()
    finally:
        a.stop()
        shutil.rmtree(public, ignore_errors=True)


def test_tcp_front_refuses_operator_commands(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "e").write_bytes(EICAR)
    port = _free_port()
    a = ApplianceProc(tmp_path, "--clamd-listen", f"127.0.0.1:{port}", "--clamd-root", str(root))
    try:
        c = clamd_client.ClamdNetworkSocket("127.0.0.1", port, timeout=TIMEOUT)
        assert c.ping() == "PONG"
        assert c.instream(io.BytesIO(EICAR)) == {"stream": ("FOUND", EICAR_NAME)}
        assert c.scan(str(root / "e")) == {str(root / "e"): ("FOUND", EICAR_NAME)}
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
            s.sendall(b"zSHUTDOWN\0")
            assert s.recv(200) == b"SHUTDOWN: operator only, refused for a TCP client. ERROR\0"
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
            s.sendall(b"zFILDES\0")
            assert s.recv(200).endswith(b"only supported on a unix socket. ERROR\0")
        assert a.p.poll() is None
    finally:
        a.stop()


def test_connection_limit_queues_instead_of_failing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    sock = tmp_path / "c.sock"
    a = ApplianceProc(tmp_path, *clamd_argv(sock, root, "--clamd-max-connections", "2"))
    held = []
    try:
        for _ in range(2):  # two idle IDSESSIONs hold both slots
            h = socket.socket(socket.AF_UNIX)
            h.connect(str(sock))
            h.sendall(b"zIDSESSION\0zPING\0")
            h.settimeout(TIMEOUT)
            assert h.recv(100) == b"1: PONG\0"
            held.append(h)
        waiting = socket.socket(socket.AF_UNIX)
        waiting.settimeout(0.5)
        waiting.connect(str(sock))  # accepted by the kernel's backlog, not served yet
        waiting.sendall(b"zPING\0")
        with pytest.raises(TimeoutError):
            waiting.recv(100)
        held.pop().close()
        waiting.settimeout(TIMEOUT)
        assert waiting.recv(100) == b"PONG\0"
        waiting.close()
    finally:
        for h in held:
            h.close()
        a.stop(signal.SIGTERM)


def test_version_names_the_loaded_container(tmp_path: Path) -> None:
    from clamd_support import BUILD_TIME, build_container

    patterns = Path(__file__).resolve().parent.parent / "patterns"
    db = build_container(
        tmp_path / "daily.cud", {"x.ndb": (patterns / "offscan.ndb").read_bytes()}, version=4242
    )
    sock = tmp_path / "c.sock"
    root = tmp_path / "root"
    root.mkdir()
    a = ApplianceProc(tmp_path, *clamd_argv(sock, root), "-d", str(db))
    try:
        built = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(BUILD_TIME))
        assert talk(sock, b"zVERSION\0").decode().endswith(f"/4242/{built}\0")
        c = clamd_client.ClamdUnixSocket(str(sock), timeout=TIMEOUT)
        assert c.instream(io.BytesIO(EICAR)) == {"stream": ("FOUND", EICAR_NAME)}
    finally:
        a.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--clamd-listen", "127.0.0.1:99999"], "--clamd-listen wants HOST:PORT (port 0..65535)"),
        (["--clamd-socket", "/nonexistent-dir/c.sock"], "cannot listen: /nonexistent-dir/c.sock"),
        (["--clamd-socket", "x.sock", "--clamd-stream-max", "lots"], "--clamd-stream-max"),
        (["--clamd-root", "/tmp"], "serve needs --socket"),
    ],
)
def test_serve_option_errors_are_one_line(args: list[str], message: str) -> None:
    out = run("serve", *args, timeout=TIMEOUT)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_clamd_verdicts_share_the_appliance_cache(app: ApplianceProc, tree: Path) -> None:
    """A content judged once, by any clamd command, is served from the verdict cache after:
    a stream's verdict answers a later SCAN of a file with the same bytes, unread."""
    content = b"shared cache check " + ANYWHERE + os.urandom(8).hex().encode()
    f = tree / "root" / "sub" / "shared"
    f.write_bytes(content)
    try:
        out = talk(csock(app), b"zINSTREAM\0" + chunks(content, 9))
        assert out == b"stream: Test-Anywhere FOUND\0"
        assert talk(csock(app), f"zSCAN {f}\0".encode()) == f"{f}: Test-Anywhere FOUND\0".encode()
        assert talk(csock(app), f"zSCAN {f}\0".encode()) == f"{f}: Test-Anywhere FOUND\0".encode()

        def sources() -> list[str]:
            return [
                e["source"]
                for e in app.events()
                if e.get("event") == "verdict" and e.get("path") == "sub/shared"
            ]

        wait_for(lambda: len(sources()) == 2, TIMEOUT, "two verdict events for sub/shared")
        assert sources() == ["digest", "identity"]  # cache by digest, then the identity memo
    finally:
        f.unlink()
