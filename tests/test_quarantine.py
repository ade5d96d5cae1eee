"""The quarantine vault: confined, atomic moves out of a VM root and confined restores."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path

import pytest
from helpers import EICAR

from offscan.quarantine import QuarantineEntry, QuarantineError, Vault

SIG = "Eicar-Test-Signature"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "vm"
    (r / "a" / "b").mkdir(parents=True)
    return r


@pytest.fixture
def vault(tmp_path: Path) -> Vault:
    return Vault(tmp_path / "vault")


def plant(root: Path, rel: str = "a/b/evil.exe", data: bytes = EICAR, mode: int = 0o755) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    p.chmod(mode)
    return p


def vault_files(v: Vault) -> list[str]:
    return sorted(os.listdir(v.directory))


def check_moved(v: Vault, entry: QuarantineEntry, root: Path, original: Path, data: bytes) -> None:
    assert not original.exists()
    blob = v.directory / f"{entry.id}.bin"
    meta = v.directory / f"{entry.id}.json"
    assert blob.read_bytes() == data
    assert stat.S_IMODE(blob.stat().st_mode) == 0o600  # owner only, never executable
    assert stat.S_IMODE(meta.stat().st_mode) == 0o600
    assert vault_files(v) == sorted([blob.name, meta.name])  # no temporaries left
    assert entry.digest == hashlib.sha256(data).hexdigest()
    assert entry.size == len(data)
    assert (entry.vm, entry.root, entry.path) == ("vm1", str(root), "a/b/evil.exe")
    assert entry.signatures == (SIG,)
    assert entry.mode == 0o755
    assert abs(entry.time - time.time()) < 60
    assert re.fullmatch(r"[0-9A-Za-z_-]+", entry.id)
    assert v.get(entry.id) == entry
    assert json.loads(meta.read_text())["path"] == "a/b/evil.exe"


def test_vault_directory_is_private(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir(mode=0o777)
    d.chmod(0o777)
    v = Vault(d)
    assert stat.S_IMODE(os.stat(v.directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(Vault(tmp_path / "new" / "q").directory).st_mode) == 0o700


def test_quarantine_same_filesystem_renames(root: Path, vault: Vault) -> None:
    original = plant(root)
    ino = original.stat().st_ino
    entry = vault.quarantine(
        vm="vm1", root=str(root), path="a/b/evil.exe", signatures=[SIG], expect_ino=ino
    )
    check_moved(vault, entry, root, original, EICAR)
    assert (vault.directory / f"{entry.id}.bin").stat().st_ino == ino  # one atomic rename


def test_quarantine_across_filesystems(root: Path) -> None:
    """Real EXDEV: the vault on /dev/shm (tmpfs), the VM on the test's temp directory."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == root.stat().st_dev:
        pytest.skip("/dev/shm is not a separate filesystem here (the simulated test covers it)")
    vault_dir = tempfile.mkdtemp(prefix="offscan-test-vault-", dir=shm)
    try:
        v = Vault(vault_dir)
        original = plant(root)
        ino = original.stat().st_ino
        entry = v.quarantine(
            vm="vm1", root=str(root), path="a/b/evil.exe", signatures=[SIG], expect_ino=ino
        )
        check_moved(v, entry, root, original, EICAR)
        assert os.stat(v.directory).st_dev != root.stat().st_dev
        where = v.restore(entry.id)
        assert Path(where).read_bytes() == EICAR
    finally:
        shutil.rmtree(vault_dir)


def test_quarantine_exdev_fallback_simulated(
    root: Path, vault: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulated EXDEV: os.rename out of the VM directory fails as it would across mounts."""
    real_rename = os.rename
    calls = []

    def rename(src, dst, *, src_dir_fd=None, dst_dir_fd=None):  # type: ignore[no-untyped-def]
        if src_dir_fd is not None and dst_dir_fd is None:  # the VM -> vault move
            calls.append(src)
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real_rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    monkeypatch.setattr(os, "rename", rename)
    data = EICAR + os.urandom(3 << 20)  # several copy chunks
    original = plant(root, data=data)
    ino = original.stat().st_ino
    entry = vault.quarantine(
        vm="vm1", root=str(root), path="a/b/evil.exe", signatures=[SIG], expect_ino=ino
    )
    assert calls == ["evil.exe"]
    check_moved(vault, entry, root, original, data)
    assert (vault.directory / f"{entry.id}.bin").stat().st_ino != ino  # a copy


def test_exdev_fallback_keeps_original_when_unlink_fails(
    root: Path, vault: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy is dropped when the original cannot be removed: one place, never neither."""
    real_rename, real_unlink = os.rename, os.unlink

    def rename(src, dst, *, src_dir_fd=None, dst_dir_fd=None):  # type: ignore[no-untyped-def]
        if src_dir_fd is not None and dst_dir_fd is None:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real_rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    def unlink(path, *, dir_fd=None):  # type: ignore[no-untyped-def]
        if dir_fd is not None:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "unlink", unlink)
    original = plant(root)
    with pytest.raises(QuarantineError, match="Read-only"):
        vault.quarantine(vm="vm1", root=str(root), path="a/b/evil.exe", signatures=[SIG])
    assert original.read_bytes() == EICAR
    assert vault_files(vault) == []


def test_expect_ino_mismatch_is_refused(root: Path, vault: Vault) -> None:
    original = plant(root)
    old_ino = original.stat().st_ino
    swapped = root / "a" / "b" / "new"
    swapped.write_bytes(b"harmless")
    os.replace(swapped, original)  # a different file now has the scanned name
    with pytest.raises(QuarantineError, match="changed since it was scanned"):
        vault.quarantine(
            vm="vm1", root=str(root), path="a/b/evil.exe", signatures=[SIG], expect_ino=old_ino
        )
    assert original.read_bytes() == b"harmless"
    assert vault_files(vault) == []


def test_symlinks_are_refused(root: Path, vault: Vault, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evil").write_bytes(EICAR)
    (root / "link").symlink_to(outside)  # a symlinked directory on the way
    (root / "a" / "flink").symlink_to(outside / "evil")  # a symlink as the file itself
    for path in ("link/evil", "a/flink"):
        with pytest.raises(QuarantineError, match="symlink"):
            vault.quarantine(vm="vm1", root=str(root), path=path, signatures=[SIG])
    assert (outside / "evil").read_bytes() == EICAR
    assert (root / "a" / "flink").is_symlink()
    assert vault_files(vault) == []


@pytest.mark.parametrize("path", ["../outside/evil", "/etc/passwd", "a/../../x", "", "."])
def test_escaping_paths_are_refused(root: Path, vault: Vault, path: str) -> None:
    with pytest.raises(QuarantineError):
        vault.quarantine(vm="vm1", root=str(root), path=path, signatures=[SIG])
    assert vault_files(vault) == []


def test_special_and_missing_files_are_refused(root: Path, vault: Vault) -> None:
    os.mkfifo(root / "a" / "fifo")  # must not block on open
    with pytest.raises(QuarantineError, match="not a regular file"):
        vault.quarantine(vm="vm1", root=str(root), path="a/fifo", signatures=[SIG])
    with pytest.raises(QuarantineError, match="not a regular file"):
        vault.quarantine(vm="vm1", root=str(root), path="a/b", signatures=[SIG])
    with pytest.raises(QuarantineError, match="no such file"):
        vault.quarantine(vm="vm1", root=str(root), path="a/nothing", signatures=[SIG])
    with pytest.raises(QuarantineError):
        vault.quarantine(vm="vm1", root=str(root), path="missing/dir/x", signatures=[SIG])
    assert vault_files(vault) == []


def test_hard_linked_file_is_copied_not_shared(root: Path, vault: Vault) -> None:
    """A rename would leave the vault blob reachable through the other link in the VM."""
    original = plant(root)
    other = root / "a" / "other-name"
    os.link(original, other)
    entry = vault.quarantine(vm="vm1", root=str(root), path="a/b/evil.exe", signatures=[SIG])
    blob = vault.directory / f"{entry.id}.bin"
    assert not original.exists()
    assert blob.stat().st_ino != other.stat().st_ino
    assert blob.stat().st_nlink == 1
    assert stat.S_IMODE(other.stat().st_mode) == 0o755  # the other name is left as it was


def test_list_get_delete(root: Path, vault: Vault) -> None:
    plant(root, "one", b"1")
    plant(root, "two", b"22")
    e1 = vault.quarantine(vm="vm1", root=str(root), path="one", signatures=["A"])
    e2 = vault.quarantine(vm="vm2", root=str(root), path="two", signatures=["B", "C"])
    assert e1.id != e2.id
    assert vault.list() == [e1, e2]
    assert vault.get(e2.id).signatures == ("B", "C")
    for bad in ("../x", "a/b", "", "..", ".", "x" * 100, f"{e1.id}.json", f"../{e1.id}"):
        with pytest.raises(QuarantineError, match="malformed quarantine id"):
            vault.get(bad)
        with pytest.raises(QuarantineError):
            vault.delete(bad)
    with pytest.raises(QuarantineError, match="no quarantine entry"):
        vault.get("20000101T000000-000000-0000000000")
    vault.delete(e1.id)
    assert vault.list() == [e2]
    assert not any(n.startswith(e1.id) for n in vault_files(vault))
    with pytest.raises(QuarantineError, match="no quarantine entry"):
        vault.delete(e1.id)


def test_malformed_metadata_is_an_error_and_skipped_by_list(root: Path, vault: Vault) -> None:
    plant(root, "one", b"1")
    plant(root, "two", b"2")
    good = vault.quarantine(vm="vm1", root=str(root), path="one", signatures=["A"])
    bad = vault.quarantine(vm="vm1", root=str(root), path="two", signatures=["A"])
    meta = vault.directory / f"{bad.id}.json"
    fields = json.loads(meta.read_text())
    for text in (
        "{not json",
        "[]",
        json.dumps({"id": bad.id}),
        json.dumps({**fields, "size": "big"}),
        json.dumps({**fields, "signatures": "A"}),
        json.dumps({**fields, "id": good.id}),  # copied from another entry
    ):
        meta.write_text(text)
        with pytest.raises(QuarantineError, match="metadata"):
            vault.get(bad.id)
        assert vault.list() == [good]


def test_restore_to_original_place(root: Path, vault: Vault) -> None:
    original = plant(root)
    entry = vault.quarantine(vm="vm1", root=str(root), path="a/b/evil.exe", signatures=[SIG])
    shutil.rmtree(root / "a")  # parents are recreated, inside the root
    where = vault.restore(entry.id)
    assert where == str(original)
    assert original.read_bytes() == EICAR
    assert stat.S_IMODE(original.stat().st_mode) == 0o755
    assert vault.list() == []
    assert vault_files(vault) == []
    assert sorted(p.name for p in (root / "a" / "b").iterdir()) == ["evil.exe"]  # no temporaries


def test_restore_never_sets_setuid(root: Path, vault: Vault) -> None:
    plant(root, "tool", b"x", mode=0o4755)
    entry = vault.quarantine(vm="vm1", root=str(root), path="tool", signatures=[SIG])
    assert entry.mode == 0o4755
    restored = Path(vault.restore(entry.id))
    assert stat.S_IMODE(restored.stat().st_mode) == 0o755


def test_restore_into_the_vms_current_root(root: Path, vault: Vault, tmp_path: Path) -> None:
    plant(root)
    entry = vault.quarantine(vm="vm1", root=str(root), path="a/b/evil.exe", signatures=[SIG])
    moved = tmp_path / "vm-moved"
    moved.mkdir()
    where = vault.restore(entry.id, root=str(moved))
    assert where == str(moved / "a" / "b" / "evil.exe")
    assert Path(where).read_bytes() == EICAR


@pytest.mark.parametrize("tampered", ["../x", "/tmp/offscan-restore-escape", "a/../../x", "./../x"])
def test_restore_refuses_paths_leaving_the_root(
    root: Path, vault: Vault, tmp_path: Path, tampered: str
) -> None:
    plant(root)
    entry = vault.quarantine(vm="vm1", root=str(root), path="a/b/evil.exe", signatures=[SIG])
    meta = vault.directory / f"{entry.id}.json"
    data = json.loads(meta.read_text())
    data["path"] = tampered
    meta.write_text(json.dumps(data))
    with pytest.raises(QuarantineError, match=r"absolute|'\.\.'"):
        vault.restore(entry.id)
    assert not (tmp_path / "x").exists()
    assert not Path("/tmp/offscan-restore-escape").exists()
    assert vault.get(entry.id).path == tampered  # still in the vault


def test_restore_refuses_a_symlinked_parent_made_after_quarantine(
    root: Path, vault: Vault, tmp_path: Path
) -> None:
    plant(root)
    entry = vault.quarantine(vm="vm1", root=str(root), path="a/b/evil.exe", signatures=[SIG])
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "a" / "b").rmdir()
    (root / "a" / "b").symlink_to(outside)  # the guest points the directory elsewhere
    with pytest.raises(QuarantineError, match="symlink"):
        vault.restore(entry.id)
    shutil.rmtree(root / "a")
    (root / "a").symlink_to(outside)  # ... or the top-level one
    with pytest.raises(QuarantineError, match="symlink"):
        vault.restore(entry.id, overwrite=True)
    assert list(outside.iterdir()) == []
    assert vault.get(entry.id) == entry


def test_restore_refuses_a_symlink_or_directory_as_target(
    root: Path, vault: Vault, tmp_path: Path
) -> None:
    plant(root)
    entry = vault.quarantine(vm="vm1", root=str(root), path="a/b/evil.exe", signatures=[SIG])
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (root / "a" / "b" / "evil.exe").symlink_to(victim)
    with pytest.raises(QuarantineError, match="symlink"):
        vault.restore(entry.id, overwrite=True)
    assert victim.read_bytes() == b"keep"
    (root / "a" / "b" / "evil.exe").unlink()
    (root / "a" / "b" / "evil.exe").mkdir()
    with pytest.raises(QuarantineError, match="not a file"):
        vault.restore(entry.id, overwrite=True)
    assert vault.get(entry.id) == entry


def test_restore_does_not_overwrite_unless_asked(root: Path, vault: Vault) -> None:
    original = plant(root)
    entry = vault.quarantine(vm="vm1", root=str(root), path="a/b/evil.exe", signatures=[SIG])
    original.write_bytes(b"newer")
    with pytest.raises(QuarantineError, match="exists"):
        vault.restore(entry.id)
    assert original.read_bytes() == b"newer"
    assert vault.get(entry.id) == entry
    assert vault.restore(entry.id, overwrite=True) == str(original)
    assert original.read_bytes() == EICAR
    assert vault.list() == []


def test_restore_of_a_missing_root_fails_cleanly(root: Path, vault: Vault, tmp_path: Path) -> None:
    plant(root)
    entry = vault.quarantine(vm="vm1", root=str(root), path="a/b/evil.exe", signatures=[SIG])
    with pytest.raises(QuarantineError):
        vault.restore(entry.id, root=str(tmp_path / "gone"))
    assert vault.get(entry.id) == entry


def test_inside_and_overlaps(tmp_path: Path) -> None:
    v = Vault(tmp_path / "state" / "quarantine")
    assert v.inside(tmp_path / "state" / "quarantine")
    assert v.inside(tmp_path / "state" / "quarantine" / "sub")
    assert not v.inside(tmp_path / "state")
    assert not v.inside(tmp_path / "state" / "quarantine-other")
    assert v.overlaps(tmp_path / "state")  # the vault would be inside this VM root
    assert v.overlaps(tmp_path / "state" / "quarantine" / "sub")
    assert not v.overlaps(tmp_path / "vm")
    (tmp_path / "alias").symlink_to(tmp_path / "state")
    assert v.inside(tmp_path / "alias" / "quarantine" / "x")
