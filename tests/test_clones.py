"""``offscan.clones.clone_tree``: in-kernel copies of a master image whose unchanged files
inherit the master's digests. Real files in ``tmp_path``; its filesystem decides whether the
copies are reflinks (btrfs, xfs) or ``copy_file_range`` copies (ext4, tmpfs)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import random
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import no_hang

from offscan import clones
from offscan.cache import Identity, IdentityMemo
from offscan.clones import CloneStats, clone_tree

SECOND = 10**9  # nanoseconds


@pytest.fixture(autouse=True)
def no_umask() -> Iterator[None]:
    """Modes are compared exactly: no umask between the master's bits and the clone's."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def master(tmp_path: Path) -> Path:
    """A small image: text, binaries (one of several MB, one sparse), an empty and a hidden
    file, odd modes, old timestamps, symlinks of every kind and special files."""
    rng = random.Random(5)
    root = tmp_path / "master"
    (root / "etc").mkdir(parents=True)
    (root / "usr" / "lib" / "deep").mkdir(parents=True)
    (root / "private").mkdir(mode=0o700)
    (root / "readonly-dir").mkdir()
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (root / "usr" / "lib" / "libx.so").write_bytes(rng.randbytes(300_000))
    (root / "usr" / "lib" / "deep" / "huge.bin").write_bytes(rng.randbytes(5 << 20))
    with open(root / "usr" / "sparse.img", "wb") as f:
        f.seek(12 << 20)
        f.write(b"end")
    (root / "empty").write_bytes(b"")
    (root / ".hidden").write_bytes(b"dot file")
    (root / "private" / "key").write_bytes(b"secret")
    (root / "readonly-dir" / "ro.txt").write_bytes(b"read only")
    os.chmod(root / "private" / "key", 0o600)
    os.chmod(root / "readonly-dir" / "ro.txt", 0o444)
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o751)
    for i, p in enumerate(sorted(root.rglob("*"))):
        if p.is_file():  # old, distinct, sub-second atime and mtime
            os.utime(p, ns=(1_100_000_000 * SECOND + 7 * i, 1_000_000_000 * SECOND + i))
    os.chmod(root / "readonly-dir", 0o555)
    os.symlink("etc", root / "etc-link")  # a directory symlink: copied, not descended
    os.symlink("hosts", root / "etc" / "hosts-link")
    os.symlink("/etc/passwd", root / "outside-link")  # points out of the image
    os.symlink("../../nowhere", root / "usr" / "dangling")
    os.mkfifo(root / "fifo")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(root / "sock"))
    s.close()
    return root


def regular_files(root: Path) -> dict[str, os.stat_result]:
    """Every regular file under ``root`` (symlinks not followed), by relative path."""
    out = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                out[os.path.relpath(p, root)] = st
    return out


def digest(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def seed_memo(master: Path, skip: frozenset[str] = frozenset()) -> IdentityMemo:
    """A memo as the appliance has it after the master's activation scan."""
    memo = IdentityMemo()
    for rel, st in regular_files(master).items():
        if rel not in skip:
            memo.put(Identity.from_stat("local", st), digest(master / rel))
    return memo


def clone(master: str, dest: str, memo: IdentityMemo, inherit: IdentityMemo) -> CloneStats:
    """clone_tree, failing instead of hanging if it ever opened the master's FIFO."""
    with no_hang(60.0, "clone_tree opened a FIFO?"):
        return clone_tree(master, dest, memo, inherit)


# -- content and metadata ----------------------------------------------------------------------


def test_clone_has_the_same_files_bytes_modes_and_times(master: Path, tmp_path: Path) -> None:
    before = regular_files(master)
    dest = tmp_path / "clones" / "c1"  # parents are created
    stats = clone(str(master), str(dest), IdentityMemo(), IdentityMemo())
    after = regular_files(dest)  # stat before reading: reads move atime
    assert after.keys() == before.keys()
    for rel, m in before.items():
        c = after[rel]
        assert stat.S_IMODE(c.st_mode) == stat.S_IMODE(m.st_mode), rel
        assert c.st_mtime_ns == m.st_mtime_ns, rel
        assert c.st_atime_ns == m.st_atime_ns, rel
        assert c.st_size == m.st_size, rel
        assert c.st_ino != m.st_ino or c.st_dev != m.st_dev, f"{rel} is the same inode"
        assert (dest / rel).read_bytes() == (master / rel).read_bytes(), rel
    assert stats.files == len(before)
    assert stats.bytes_copied == sum(st.st_size for st in before.values())
    assert 0 <= stats.reflinked <= stats.files
    assert stats.inherited == 0  # an empty memo knows no digest
    assert stats.seconds >= 0


def test_directories_keep_their_mode_plus_owner_rwx(master: Path, tmp_path: Path) -> None:
    dest = tmp_path / "c1"
    clone(str(master), str(dest), IdentityMemo(), IdentityMemo())
    for d in ("etc", "usr/lib/deep", "private", "readonly-dir"):
        want = stat.S_IMODE(os.lstat(master / d).st_mode) | 0o700  # the copy must fill it
        assert stat.S_IMODE(os.lstat(dest / d).st_mode) == want, d
    assert stat.S_IMODE(os.lstat(dest / "readonly-dir").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(dest / "private").st_mode) == 0o700


def test_symlinks_are_recreated_verbatim_never_followed(master: Path, tmp_path: Path) -> None:
    dest = tmp_path / "c1"
    clone(str(master), str(dest), IdentityMemo(), IdentityMemo())
    for rel in ("etc-link", "etc/hosts-link", "outside-link", "usr/dangling"):
        assert os.path.islink(dest / rel), rel
        assert os.readlink(dest / rel) == os.readlink(master / rel), rel
    # the directory link was not descended: nothing was copied through it
    assert not any(p.startswith("etc-link") for p in regular_files(dest))


def test_fifos_and_sockets_are_not_part_of_the_copy(master: Path, tmp_path: Path) -> None:
    dest = tmp_path / "c1"
    stats = clone(str(master), str(dest), IdentityMemo(), IdentityMemo())
    assert not os.path.lexists(dest / "fifo")
    assert not os.path.lexists(dest / "sock")
    assert stats.files == len(regular_files(master))


def test_the_copy_never_reads_content_into_user_space(
    master: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_read(*args: object) -> bytes:
        raise AssertionError("clone_tree read file content into user space")

    monkeypatch.setattr(os, "read", no_read)
    monkeypatch.setattr(os, "pread", no_read)
    clone(str(master), str(tmp_path / "c1"), IdentityMemo(), IdentityMemo())
    monkeypatch.undo()
    assert digest(tmp_path / "c1" / "usr" / "lib" / "deep" / "huge.bin") == digest(
        master / "usr" / "lib" / "deep" / "huge.bin"
    )


def test_a_clone_is_independent_of_its_master(master: Path, tmp_path: Path) -> None:
    dest = tmp_path / "c1"
    clone(str(master), str(dest), IdentityMemo(), IdentityMemo())
    original = (master / "usr" / "lib" / "libx.so").read_bytes()
    with open(dest / "usr" / "lib" / "libx.so", "r+b") as f:
        f.write(b"changed in the clone")
    (dest / "etc" / "hosts").unlink()
    assert (master / "usr" / "lib" / "libx.so").read_bytes() == original
    assert (master / "etc" / "hosts").exists()


def test_an_empty_master_gives_an_empty_clone(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    stats = clone(str(tmp_path / "m"), str(tmp_path / "c"), IdentityMemo(), IdentityMemo())
    assert os.listdir(tmp_path / "c") == []
    assert (stats.files, stats.inherited, stats.bytes_copied, stats.reflinked) == (0, 0, 0, 0)


# -- inherited verdicts ------------------------------------------------------------------------


def test_unchanged_files_inherit_the_masters_digest_by_clone_identity(
    master: Path, tmp_path: Path
) -> None:
    unknown = frozenset({"etc/hosts"})  # the memo never learnt this one
    memo, inherit = seed_memo(master, unknown), IdentityMemo()
    dest = tmp_path / "c1"
    stats = clone(str(master), str(dest), memo, inherit)
    files = regular_files(dest)
    assert stats.inherited == len(files) - len(unknown)
    assert inherit.stats()["entries"] == stats.inherited
    for rel, st in files.items():
        got = inherit.get(Identity.from_stat("local", st))  # what a clone's fstat finds
        if rel in unknown:
            assert got is None, rel
        else:
            assert got == digest(master / rel) == digest(dest / rel), rel


def test_two_clones_of_one_master_inherit_independently(master: Path, tmp_path: Path) -> None:
    memo, inherit = seed_memo(master), IdentityMemo()
    s1 = clone(str(master), str(tmp_path / "c1"), memo, inherit)
    s2 = clone(str(master), str(tmp_path / "c2"), memo, inherit)
    assert s1.inherited == s2.inherited == len(regular_files(master))
    for rel, st in regular_files(tmp_path / "c2").items():
        assert inherit.get(Identity.from_stat("local", st)) == digest(master / rel)
    for rel, st in regular_files(tmp_path / "c1").items():
        assert inherit.get(Identity.from_stat("local", st)) == digest(master / rel)


def test_a_later_write_to_a_clone_file_misses_the_inherited_memo(
    master: Path, tmp_path: Path
) -> None:
    memo, inherit = seed_memo(master), IdentityMemo()
    dest = tmp_path / "c1"
    clone(str(master), str(dest), memo, inherit)
    target = dest / "etc" / "hosts"
    old = Identity.from_stat("local", os.lstat(target))
    assert inherit.get(old) is not None
    with open(target, "r+b") as f:  # same size: only the times tell
        f.write(b"X")
    new = Identity.from_stat("local", os.lstat(target))
    assert new.size == old.size and new.ino == old.ino
    assert new != old
    assert inherit.get(new) is None


def test_a_master_file_changed_during_its_copy_is_not_inherited(
    master: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memo, inherit = seed_memo(master), IdentityMemo()
    victim = os.lstat(master / "usr" / "lib" / "libx.so").st_ino
    real = clones._copy_content

    def copy_then_touch(src: int, dst: int, size: int) -> bool:
        shared = real(src, dst, size)
        if os.fstat(src).st_ino == victim:  # the master changes under the copy
            os.utime(src, ns=(1, 2))
        return shared

    monkeypatch.setattr(clones, "_copy_content", copy_then_touch)
    dest = tmp_path / "c1"
    stats = clone(str(master), str(dest), memo, inherit)
    files = regular_files(dest)
    assert stats.inherited == len(files) - 1
    assert inherit.get(Identity.from_stat("local", files["usr/lib/libx.so"])) is None
    assert inherit.get(Identity.from_stat("local", files["etc/hosts"])) is not None


# -- the copy primitive and bad input ----------------------------------------------------------


def _copy_with(tmp_path: Path, data: bytes) -> tuple[bool, bytes]:
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(data)
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        shared = clones._copy_content(sfd, dfd, len(data))
    finally:
        os.close(sfd)
        os.close(dfd)
    return shared, dst.read_bytes()


def test_copy_falls_back_to_copy_file_range_when_reflink_is_unsupported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(fd: int, request: int, arg: int) -> int:
        assert request == clones.FICLONE
        raise OSError(errno.EOPNOTSUPP, "no reflink here")

    monkeypatch.setattr(fcntl, "ioctl", unsupported)
    data = random.Random(1).randbytes(3 << 20)
    assert _copy_with(tmp_path, data) == (False, data)


@pytest.mark.parametrize("code", [errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EBADF])
def test_every_no_reflink_errno_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def refuse(fd: int, request: int, arg: int) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "ioctl", refuse)
    assert _copy_with(tmp_path, b"abc" * 1000) == (False, b"abc" * 1000)


def test_other_reflink_errors_propagate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int, request: int, arg: int) -> int:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(fcntl, "ioctl", broken)
    with pytest.raises(OSError) as info:
        _copy_with(tmp_path, b"data")
    assert info.value.errno == errno.EIO


def test_reflinked_counts_the_files_whose_extents_were_shared(
    master: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_reflink(fd: int, request: int, arg: int) -> int:
        os.copy_file_range(arg, fd, os.fstat(arg).st_size, 0, 0)  # stands in for FICLONE
        return 0

    monkeypatch.setattr(fcntl, "ioctl", fake_reflink)
    stats = clone(str(master), str(tmp_path / "c1"), IdentityMemo(), IdentityMemo())
    assert stats.reflinked == stats.files == len(regular_files(master))
    assert digest(tmp_path / "c1" / ".hidden") == digest(master / ".hidden")


def test_an_existing_destination_is_refused_and_left_alone(master: Path, tmp_path: Path) -> None:
    dest = tmp_path / "c1"
    dest.mkdir()
    (dest / "mine.txt").write_bytes(b"keep")
    memo, inherit = seed_memo(master), IdentityMemo()
    with pytest.raises(FileExistsError):
        clone(str(master), str(dest), memo, inherit)
    assert os.listdir(dest) == ["mine.txt"]
    assert (dest / "mine.txt").read_bytes() == b"keep"
    assert inherit.get(Identity.from_stat("local", os.lstat(dest / "mine.txt"))) is None


def test_a_destination_under_a_file_is_an_os_error(master: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises((NotADirectoryError, FileExistsError)):
        clone(str(master), str(tmp_path / "file" / "c1"), IdentityMemo(), IdentityMemo())


def test_clone_stats_start_at_zero() -> None:
    s = CloneStats()
    assert (s.files, s.inherited, s.bytes_copied, s.reflinked, s.seconds) == (0, 0, 0, 0, 0.0)
