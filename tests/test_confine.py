"""The security boundary: ``offscan.confine`` opens client paths strictly inside a VM root.

Every test runs against real files in ``tmp_path``. Where a refusal is tested, the same path
leads (if followed) to a readable file *outside* the root holding ``SECRET``, so a confinement
that followed the link or the ``..`` would return that file and fail the test.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import no_hang, open_fds

from offscan.confine import ConfinementError, check_relpath, open_confined

INSIDE = b"inside the VM root\n"
SECRET = b"SECRET: outside the VM root\n"
COMPONENTS = ("a", "b", "c", "file.txt")
DEEP = "/".join(COMPONENTS)
NAME_MAX = 255  # bytes per component on ext4, xfs, btrfs, tmpfs
PATH_MAX = 4096  # bytes the kernel's own path walk accepts


@pytest.fixture
def vm(tmp_path: Path) -> Path:
    """``tmp_path/root`` (the VM root) and, beside it, ``tmp_path/outside`` with the same tree
    holding SECRET, so that any escape that worked would read SECRET."""
    for base, data in ((tmp_path / "root", INSIDE), (tmp_path / "outside", SECRET)):
        (base / "a" / "b" / "c").mkdir(parents=True)
        (base / DEEP).write_bytes(data)
        (base / "top.txt").write_bytes(data)
    return tmp_path / "root"


def read_fd(fd: int) -> bytes:
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_confined(root: Path | str, relpath: str) -> bytes:
    return read_fd(open_confined(str(root), relpath))


def refused(root: Path, relpath: str, match: str) -> ConfinementError:
    """open_confined refuses ``relpath`` with a ConfinementError matching ``match``, and
    leaves no descriptor open."""
    before = open_fds()
    with no_hang(), pytest.raises(ConfinementError, match=match) as info:
        fd = open_confined(str(root), relpath)
        os.close(fd)  # only reached when the boundary failed
    assert open_fds() == before
    return info.value


# -- the happy path ----------------------------------------------------------------------------


def test_opens_the_regular_file_inside_the_root_read_only(vm: Path) -> None:
    fd = open_confined(str(vm), DEEP)
    try:
        assert os.fstat(fd).st_ino == os.stat(vm / DEEP).st_ino
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC  # never inherited by hooks
        with pytest.raises(OSError) as info:
            os.write(fd, b"x")
        assert info.value.errno == errno.EBADF  # opened read-only
    finally:
        os.close(fd)
    assert read_confined(vm, DEEP) == INSIDE
    assert read_confined(vm, "top.txt") == INSIDE
    assert (vm / DEEP).read_bytes() == INSIDE  # reading changed nothing


def test_confinement_error_is_a_permission_error() -> None:
    assert issubclass(ConfinementError, PermissionError)  # callers that catch OSError see it


@pytest.mark.parametrize(
    ("relpath", "parts"),
    [
        ("top.txt", ["top.txt"]),
        ("a/b/c/file.txt", ["a", "b", "c", "file.txt"]),
        ("./a//b/./c/", ["a", "b", "c"]),
        ("...", ["..."]),  # three dots is a name, not a parent
        ("..a/b..", ["..a", "b.."]),
        ("a\\..\\b", ["a\\..\\b"]),  # a backslash is an ordinary byte on Linux
        ("name with spaces/ü", ["name with spaces", "ü"]),
    ],
)
def test_check_relpath_splits_and_drops_empty_and_dot_components(
    relpath: str, parts: list[str]
) -> None:
    assert check_relpath(relpath) == parts


def test_names_that_look_like_parents_are_ordinary_files(vm: Path) -> None:
    for name in ("...", "..a", "b..", "a\\..\\b"):
        (vm / name).write_bytes(name.encode())
        assert read_confined(vm, name) == name.encode()
    assert read_confined(vm, "./a//b/./c/file.txt") == INSIDE


# -- escapes by name ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "relpath",
    [
        "..",
        "../outside/top.txt",
        "a/../../outside/top.txt",
        "a/..",
        "./../outside/top.txt",
        "a//..//..//outside/top.txt",
        "a/b/../b/c/file.txt",
        "a/b/c/../../../top.txt",
    ],
)
def test_dotdot_is_refused_anywhere_even_when_it_stays_inside(vm: Path, relpath: str) -> None:
    with pytest.raises(ConfinementError, match=r"'\.\.'"):
        check_relpath(relpath)
    refused(vm, relpath, r"'\.\.'")


def test_absolute_paths_are_refused_even_when_they_point_inside(vm: Path) -> None:
    for relpath in (
        "/etc/passwd",
        "//etc/passwd",
        str(vm / "top.txt"),
        str(vm.parent / "outside" / "top.txt"),
    ):
        with pytest.raises(ConfinementError, match="absolute"):
            check_relpath(relpath)
        refused(vm, relpath, "absolute")


@pytest.mark.parametrize("relpath", ["", ".", "./", "./.", ".//."])
def test_empty_path_or_the_root_itself_is_refused(vm: Path, relpath: str) -> None:
    with pytest.raises(ConfinementError):
        check_relpath(relpath)
    refused(vm, relpath, "empty|root itself")


@pytest.mark.parametrize("relpath", [b"top.txt", None, 7, ["top.txt"]])
def test_a_path_that_is_not_a_string_is_refused(vm: Path, relpath: Any) -> None:
    with pytest.raises(ConfinementError):
        check_relpath(relpath)
    refused(vm, relpath, "empty")


def test_nul_byte_is_refused_not_truncated(vm: Path) -> None:
    # A C-level open would stop at the NUL and open top.txt; the check refuses the whole path.
    refused(vm, "top.txt\0.jpg", "NUL")


# -- symlinks ----------------------------------------------------------------------------------


def _link_component(vm: Path, index: int, target: str) -> str:
    """Replace component ``index`` of DEEP inside ``vm`` by a symlink to ``target``."""
    path = vm.joinpath(*COMPONENTS[: index + 1])
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    os.symlink(target, path)
    return path.name


@pytest.mark.parametrize("index", range(len(COMPONENTS)), ids=COMPONENTS)
@pytest.mark.parametrize("kind", ["absolute-outside", "relative-outside", "inside"])
def test_a_symlink_at_any_component_is_refused(vm: Path, index: int, kind: str) -> None:
    outside = vm.parent / "outside"
    here = vm.joinpath(*COMPONENTS[:index])  # directory that will hold the link
    if kind == "absolute-outside":
        target = str(outside.joinpath(*COMPONENTS[: index + 1]))
    elif kind == "relative-outside":
        target = os.path.relpath(outside.joinpath(*COMPONENTS[: index + 1]), here)
    else:  # a link that stays inside the root is refused all the same
        mirror = vm / "mirror"
        shutil.copytree(vm / "a", mirror / "a")
        target = os.path.relpath(mirror.joinpath(*COMPONENTS[: index + 1]), here)
    name = _link_component(vm, index, target)
    # the kernel's own walk follows the link: the refusal below is the module's doing
    assert (vm / DEEP).read_bytes() == (INSIDE if kind == "inside" else SECRET)
    err = refused(vm, DEEP, "symlink")
    if index < len(COMPONENTS) - 1:
        assert repr(name) in str(err)  # names the offending component


def test_symlink_to_a_file_used_as_a_directory_is_refused(vm: Path) -> None:
    os.symlink(str(vm.parent / "outside" / "a"), vm / "dirlink")
    os.symlink("../top.txt", vm / "a" / "filelink")
    refused(vm, "dirlink/b/c/file.txt", "symlink")
    refused(vm, "a/filelink/x", "symlink")


def test_a_symlink_to_a_directory_as_the_last_component_is_refused(vm: Path) -> None:
    os.symlink("b", vm / "a" / "blink")
    refused(vm, "a/blink", "symlink")


def test_dangling_symlinks_are_refused_not_reported_missing(vm: Path) -> None:
    os.symlink("/nonexistent/offscan-test", vm / "dangling")
    os.symlink("missing", vm / "a" / "dangling-dir")
    refused(vm, "dangling", "symlink")
    refused(vm, "a/dangling-dir/x", "symlink")


def test_symlink_loops_are_refused(vm: Path) -> None:
    os.symlink("self", vm / "self")
    os.symlink("pong", vm / "ping")
    os.symlink("ping", vm / "pong")
    os.symlink(".", vm / "a" / "dot")  # a loop back into the same directory
    for relpath in ("self", "self/x", "ping", "ping/x/y", "a/dot/b/c/file.txt", "a/dot"):
        refused(vm, relpath, "symlink")


def test_a_root_that_is_a_symlink_is_resolved_once_and_confines_below_it(vm: Path) -> None:
    # The root comes from the operator (trusted); the client's path below it does not.
    link = vm.parent / "root-link"
    os.symlink(vm, link)
    assert read_confined(link, DEEP) == INSIDE
    refused(link, "../outside/top.txt", r"'\.\.'")
    os.symlink("../../outside/top.txt", vm / "a" / "escape")
    refused(link, "a/escape", "symlink")


def test_a_bad_root_is_an_os_error_and_leaks_nothing(vm: Path) -> None:
    before = open_fds()
    with pytest.raises(FileNotFoundError):
        open_confined(str(vm.parent / "no-such-root"), "top.txt")
    with pytest.raises(NotADirectoryError):
        open_confined(str(vm / "top.txt"), "x")
    assert open_fds() == before


# -- what is not a regular file ----------------------------------------------------------------


def test_a_fifo_is_refused_without_blocking(vm: Path) -> None:
    os.mkfifo(vm / "a" / "fifo")
    refused(vm, "a/fifo", "not a regular file")  # no_hang: opening it for read would block


def test_directories_sockets_and_devices_are_not_regular_files(vm: Path) -> None:
    refused(vm, "a/b", "not a regular file")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(vm / "sock"))
        refused(vm, "sock", "not a regular file")
    finally:
        s.close()
    try:
        os.mknod(vm / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("no CAP_MKNOD: cannot make a device node")
    refused(vm, "null", "not a regular file")


def test_a_non_directory_in_the_middle_is_an_os_error(vm: Path) -> None:
    os.mkfifo(vm / "fifo")
    before = open_fds()
    for relpath in ("top.txt/x", "fifo/x"):
        with no_hang(), pytest.raises(NotADirectoryError):
            open_confined(str(vm), relpath)
    assert open_fds() == before


def test_missing_files_and_directories_are_file_not_found(vm: Path) -> None:
    before = open_fds()
    for relpath in ("nope.txt", "a/nope/file.txt", "a/b/c/nope"):
        with pytest.raises(FileNotFoundError):
            open_confined(str(vm), relpath)
    assert open_fds() == before


# -- a path changed while it is being opened ---------------------------------------------------


def _on_call(
    monkeypatch: pytest.MonkeyPatch, name: str, component: str, action: Callable[[], None]
) -> list[int]:
    """Run ``action`` once, just before ``os.<name>`` is applied to ``component`` relative
    to a directory fd: the moment between the module's checks and its use of the path."""
    real = getattr(os, name)
    fired: list[int] = []

    def wrapper(path: Any, *args: Any, **kwargs: Any) -> Any:
        if path == component and kwargs.get("dir_fd") is not None and not fired:
            fired.append(1)
            if name == "stat":  # swap after the check has looked
                result = real(path, *args, **kwargs)
                action()
                return result
            action()
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, name, wrapper)  # the module calls os.<name>
    return fired


def test_last_component_swapped_for_a_symlink_after_the_check(
    vm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = vm / DEEP
    tmp_link = vm / "a" / "b" / "c" / ".link"
    os.symlink(str(vm.parent / "outside" / DEEP), tmp_link)
    fired = _on_call(monkeypatch, "stat", "file.txt", lambda: os.rename(tmp_link, final))
    before = open_fds()
    with pytest.raises(OSError) as info:  # O_NOFOLLOW: ELOOP instead of the outside file
        os.close(open_confined(str(vm), DEEP))
    monkeypatch.undo()
    assert fired, "the swap did not happen: the test no longer exercises the race"
    assert isinstance(info.value, ConfinementError) or info.value.errno == errno.ELOOP
    assert open_fds() == before
    assert os.path.islink(final)


def test_last_component_swapped_for_a_fifo_after_the_check(
    vm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = vm / DEEP
    fifo = vm / "a" / "b" / "c" / ".fifo"
    os.mkfifo(fifo)
    fired = _on_call(monkeypatch, "stat", "file.txt", lambda: os.rename(fifo, final))
    with no_hang():
        err = refused(vm, DEEP, "not a regular file")
    monkeypatch.undo()
    assert fired and stat.S_ISFIFO(os.lstat(final).st_mode)
    assert "regular file" in str(err)


def test_a_directory_swapped_for_a_symlink_during_the_walk(
    vm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = vm / "a" / "b"

    def swap() -> None:
        os.rename(b, vm / "a" / "b-moved")
        os.symlink(str(vm.parent / "outside" / "a" / "b"), b)

    fired = _on_call(monkeypatch, "open", "b", swap)
    refused(vm, DEEP, "symlink")
    monkeypatch.undo()
    assert fired and os.path.islink(b)


def test_a_path_renamed_away_during_the_open_is_file_not_found(
    vm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fired = _on_call(
        monkeypatch, "stat", "file.txt", lambda: os.rename(vm / DEEP, vm / "top-moved.txt")
    )
    with pytest.raises(FileNotFoundError):
        open_confined(str(vm), DEEP)
    fired2 = _on_call(
        monkeypatch, "open", "c", lambda: os.rename(vm / "a" / "b" / "c", vm / "c-moved")
    )
    with pytest.raises(FileNotFoundError):
        open_confined(str(vm), DEEP)
    monkeypatch.undo()
    assert fired and fired2


# -- names: non-UTF-8, long, deep --------------------------------------------------------------


def test_non_utf8_names_open_through_surrogateescape(vm: Path) -> None:
    root = os.fsencode(vm)
    os.makedirs(root + b"/d\xff\xfe", exist_ok=True)
    with open(root + b"/d\xff\xfe/caf\xe9 \x80.bin", "wb") as f:
        f.write(b"latin-1 name")
    relpath = os.fsdecode(b"d\xff\xfe/caf\xe9 \x80.bin")
    assert "\udcff" in relpath  # what os.listdir/watchdog hand the shim
    assert read_confined(vm, relpath) == b"latin-1 name"
    os.symlink(b"../../outside/top.txt", root + b"/d\xff\xfe/l\xff")
    refused(vm, os.fsdecode(b"d\xff\xfe/l\xff"), "symlink")


def test_a_name_that_cannot_be_encoded_is_refused_by_an_exception(vm: Path) -> None:
    before = open_fds()
    with pytest.raises((UnicodeEncodeError, ConfinementError)):
        os.close(open_confined(str(vm), "a/\ud800.txt"))  # a lone surrogate: no bytes map to it
    assert open_fds() == before


def test_names_up_to_name_max_open_longer_ones_fail_cleanly(vm: Path) -> None:
    for name in ("n" * NAME_MAX, "é" * (NAME_MAX // 2), "日" * (NAME_MAX // 3)):
        assert len(os.fsencode(name)) <= NAME_MAX
        (vm / "a" / name).write_bytes(name.encode())
        assert read_confined(vm, f"a/{name}") == name.encode()
    before = open_fds()
    for relpath in ("a/" + "n" * (NAME_MAX + 1), "n" * (NAME_MAX + 1) + "/top.txt"):
        with pytest.raises(OSError) as info:
            open_confined(str(vm), relpath)
        assert info.value.errno == errno.ENAMETOOLONG
        assert not isinstance(info.value, ConfinementError)
    assert open_fds() == before


def test_a_tree_deeper_than_path_max_is_walked_component_by_component(vm: Path) -> None:
    name = "d" * 200
    depth = PATH_MAX // (len(name) + 1) + 2  # the whole path is longer than PATH_MAX
    fd = os.open(vm, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        out = os.open("deep.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, b"deep")
        os.close(out)
        os.symlink(str(vm.parent / "outside" / "top.txt"), "link", dir_fd=fd)
    finally:
        os.close(fd)
    relpath = "/".join([name] * depth + ["deep.txt"])
    assert len(relpath) > PATH_MAX
    with pytest.raises(OSError) as info:
        open(vm / relpath, "rb")  # the kernel's own walk gives up ...
    assert info.value.errno == errno.ENAMETOOLONG
    assert read_confined(vm, relpath) == b"deep"  # ... open_confined does not
    refused(vm, "/".join([name] * depth + ["link"]), "symlink")
    shutil.rmtree(vm / name)  # fd-based removal copes with the depth
