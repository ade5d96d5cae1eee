"""Per-VM policies (``offscan.policy``): TOML loading, defaults, validation with errors that
name the key, layering (defaults < file default < base VM < the VM's own), exclusions,
actions in fallback order and the fail mode."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from offscan.policy import DEFAULT_POLICY, PolicyError, excluded, load_policy_file, merge, validate

DOC_EXAMPLE = """
[default]
actions = ["quarantine", "deny"]   # first that succeeds; "pass" only logs
fail_mode = "open"                 # or "closed": the shim isolates the VM while unprotected
[vm.master]
exclude_globs = ["var/cache/*", "*.iso"]
exclude_ext = ["vmdk"]
max_size = 104857600               # bytes; bigger files are not scanned
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def effective(
    file_default: dict[str, Any],
    per_vm: dict[str, dict[str, Any]],
    lineage: list[str],
    runtime: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The effective policy of ``lineage[-1]``, a clone of ``lineage[-2]``, ... of
    ``lineage[0]``, composed with ``merge`` exactly as the appliance layers it."""
    runtime = runtime or {}
    base: dict[str, Any] = {}
    for name in lineage:
        base = merge(file_default, base, per_vm.get(name), runtime.get(name))
    return base


# -- defaults ----------------------------------------------------------------------------------


def test_defaults_deny_and_fail_open_with_no_exclusions() -> None:
    assert DEFAULT_POLICY == {
        "exclude_globs": [],
        "exclude_ext": [],
        "max_size": None,
        "actions": ["deny"],
        "fail_mode": "open",
    }
    assert merge() == DEFAULT_POLICY
    assert merge(None, {}, None) == DEFAULT_POLICY
    assert excluded(DEFAULT_POLICY, "any/path/at/all.iso", 10**12) is None


def test_merge_returns_a_new_dict_and_never_changes_the_defaults() -> None:
    before = copy.deepcopy(DEFAULT_POLICY)
    out = merge({"actions": ["pass"]})
    out["fail_mode"] = "closed"
    assert out is not DEFAULT_POLICY
    assert DEFAULT_POLICY == before
    assert merge() == before


def test_later_layers_win_key_by_key() -> None:
    out = merge(
        {"actions": ["quarantine", "deny"], "max_size": 10},
        None,
        {"max_size": 20},
        {"fail_mode": "closed"},
    )
    assert out == {
        **DEFAULT_POLICY,
        "actions": ["quarantine", "deny"],
        "max_size": 20,
        "fail_mode": "closed",
    }


# -- loading TOML ------------------------------------------------------------------------------


def test_the_documented_example_loads(tmp_path: Path) -> None:
    default, per_vm = load_policy_file(write(tmp_path, DOC_EXAMPLE))
    assert default == {"actions": ["quarantine", "deny"], "fail_mode": "open"}
    assert per_vm == {
        "master": {
            "exclude_globs": ["var/cache/*", "*.iso"],
            "exclude_ext": ["vmdk"],
            "max_size": 104857600,
        }
    }


def test_an_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_policy_file(write(tmp_path, "")) == ({}, {})
    assert load_policy_file(write(tmp_path, "[default]\n[vm]\n")) == ({}, {})


def test_per_vm_tables_are_separate(tmp_path: Path) -> None:
    default, per_vm = load_policy_file(
        write(
            tmp_path,
            """
        [vm.web1]
        fail_mode = "closed"
        [vm.web2]
        actions = ["pass"]
        [vm."name with.dots"]
        max_size = 1
    """,
        )
    )
    assert default == {}
    assert per_vm == {
        "web1": {"fail_mode": "closed"},
        "web2": {"actions": ["pass"]},
        "name with.dots": {"max_size": 1},
    }


def test_a_path_object_or_string_both_load(tmp_path: Path) -> None:
    path = write(tmp_path, DOC_EXAMPLE)
    assert load_policy_file(path) == load_policy_file(str(path))


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("[default]\nactions = [", ["policy.toml"]),  # not TOML
        ("[defaults]\nfail_mode = 'open'\n", ["policy.toml", "defaults", "[default]"]),
        ("[default]\nfail_mod = 'open'\n", ["policy.toml", "'fail_mod'", "fail_mode"]),
        ("[vm.web1]\nfail_mode = 'ajar'\n", ["policy.toml", "fail_mode", "'ajar'"]),
        ("[vm.web1]\nactions = ['kill']\n", ["policy.toml", "actions", "kill"]),
        ("[vm.web1]\nmax_size = -1\n", ["policy.toml", "max_size", "negative"]),
        ("[vm.web1]\nmax_size = 'big'\n", ["policy.toml", "max_size", "'big'"]),
        ("[vm.web1]\nexclude_ext = [1]\n", ["policy.toml", "exclude_ext"]),
        ("[vm.web1]\nexclude_globs = ['ok', '']\n", ["policy.toml", "exclude_globs"]),
    ],
)
def test_bad_files_raise_policy_error_naming_file_and_key(
    tmp_path: Path, text: str, needles: list[str]
) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy_file(write(tmp_path, text))
    for needle in needles:
        assert needle in str(info.value)


def test_a_missing_file_is_a_policy_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="nope.toml"):
        load_policy_file(tmp_path / "nope.toml")
    assert issubclass(PolicyError, ValueError)


# -- validation --------------------------------------------------------------------------------


def test_validate_normalises_run_time_strings() -> None:
    # ``offscan policy set VM actions=quarantine,deny`` hands over strings
    assert validate(
        {
            "actions": "quarantine,deny",
            "exclude_globs": "tmp/*,*.log",
            "exclude_ext": ".ISO,Vmdk",
            "max_size": "4096",
            "fail_mode": "closed",
        }
    ) == {
        "actions": ["quarantine", "deny"],
        "exclude_globs": ["tmp/*", "*.log"],
        "exclude_ext": ["iso", "vmdk"],
        "max_size": 4096,
        "fail_mode": "closed",
    }


@pytest.mark.parametrize("value", [None, "", "none"])
def test_max_size_can_be_unset(value: Any) -> None:
    assert validate({"max_size": value}) == {"max_size": None}


def test_validate_keeps_only_the_keys_given() -> None:
    assert validate({}) == {}
    assert validate({"fail_mode": "open"}) == {"fail_mode": "open"}


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"actions": []}, "actions"),
        ({"actions": ""}, "actions"),
        ({"actions": ["deny", "reboot"]}, "actions"),
        ({"actions": "Deny"}, "actions"),  # case matters
        ({"actions": 1}, "actions"),
        ({"fail_mode": "Closed"}, "fail_mode"),
        ({"fail_mode": True}, "fail_mode"),
        ({"fail_mode": ["open"]}, "fail_mode"),
        ({"max_size": -5}, "max_size"),
        ({"max_size": "1MB"}, "max_size"),
        ({"max_size": [1]}, "max_size"),
        ({"exclude_globs": [""]}, "exclude_globs"),
        ({"exclude_globs": {"a": 1}}, "exclude_globs"),
        ({"exclude_ext": [None]}, "exclude_ext"),
        ({"exclude": ["*.iso"]}, "'exclude'"),
        ({"fail_mode": "open", "Actions": ["deny"]}, "'Actions'"),
    ],
)
def test_bad_values_name_the_key(settings: dict[str, Any], key: str) -> None:
    with pytest.raises(PolicyError) as info:
        validate(settings)
    assert str(info.value).startswith(key) or key in str(info.value)


def test_an_unknown_key_lists_the_known_ones() -> None:
    with pytest.raises(PolicyError) as info:
        validate({"bogus": 1})
    for known in ("exclude_globs", "exclude_ext", "max_size", "actions", "fail_mode"):
        assert known in str(info.value)


# -- actions and fail mode ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "actions",
    [
        ["deny"],
        ["pass"],
        ["quarantine"],
        ["quarantine", "deny"],
        ["quarantine", "pass"],
        ["quarantine", "quarantine", "deny"],
    ],
)
def test_actions_keep_their_fallback_order(actions: list[str]) -> None:
    # the appliance tries them in this order, the first that succeeds wins
    assert validate({"actions": actions})["actions"] == actions
    assert validate({"actions": ",".join(actions)})["actions"] == actions
    assert merge({"actions": ["deny"]}, {"actions": actions})["actions"] == actions


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_fail_mode_round_trips(tmp_path: Path, mode: str) -> None:
    default, per_vm = load_policy_file(write(tmp_path, f'[default]\nfail_mode = "{mode}"\n'))
    assert default == {"fail_mode": mode}
    assert merge(default)["fail_mode"] == mode


# -- inheritance by clones ---------------------------------------------------------------------


def test_a_clone_inherits_its_masters_policy_and_overrides_key_by_key(tmp_path: Path) -> None:
    default, per_vm = load_policy_file(
        write(
            tmp_path,
            DOC_EXAMPLE
            + """
[vm.master-clone002]
fail_mode = "closed"
max_size = 1000
""",
        )
    )
    master = effective(default, per_vm, ["master"])
    assert master == {
        **DEFAULT_POLICY,
        "actions": ["quarantine", "deny"],
        "exclude_globs": ["var/cache/*", "*.iso"],
        "exclude_ext": ["vmdk"],
        "max_size": 104857600,
    }
    assert effective(default, per_vm, ["master", "master-clone001"]) == master
    clone2 = effective(default, per_vm, ["master", "master-clone002"])
    assert clone2 == {**master, "fail_mode": "closed", "max_size": 1000}
    # a clone of a clone inherits through the chain
    assert effective(default, per_vm, ["master", "master-clone002", "grandchild"]) == clone2
    # a VM that is nobody's clone gets only the file's default
    assert effective(default, per_vm, ["other"]) == {**DEFAULT_POLICY, **default}


def test_run_time_settings_beat_the_file_and_are_inherited(tmp_path: Path) -> None:
    default, per_vm = load_policy_file(write(tmp_path, DOC_EXAMPLE))
    runtime = {
        "master": validate({"actions": "pass"}),
        "master-clone001": validate({"exclude_ext": "ISO"}),
    }
    clone = effective(default, per_vm, ["master", "master-clone001"], runtime)
    assert clone["actions"] == ["pass"]  # master's run-time setting
    assert clone["exclude_ext"] == ["iso"]  # the clone's own replaces master's ["vmdk"]
    assert clone["exclude_globs"] == ["var/cache/*", "*.iso"]  # untouched: inherited
    assert excluded(clone, "disk.vmdk") is None
    assert excluded(clone, "cd.iso") is not None


# -- exclusions --------------------------------------------------------------------------------


POLICY = merge(
    validate(
        {
            "exclude_globs": ["var/cache/*", "*.tmp", "build/**/obj", "Thumbs.db"],
            "exclude_ext": [".VMDK", "iso"],
            "max_size": 1000,
        }
    )
)


@pytest.mark.parametrize(
    ("relpath", "size", "why"),
    [
        ("disk.vmdk", None, "extension .vmdk excluded"),
        ("a/b/DISK.VMDK", None, "extension .vmdk excluded"),  # case-insensitive
        ("x.tar.iso", None, "extension .iso excluded"),
        ("var/cache/apt.bin", None, "matches exclusion 'var/cache/*'"),
        ("var/cache/deep/apt.bin", None, "matches exclusion 'var/cache/*'"),  # * crosses /
        ("home/u/edit.tmp", None, "matches exclusion '*.tmp'"),  # basename match
        ("build/x/y/obj", None, "matches exclusion 'build/**/obj'"),
        ("home/u/Thumbs.db", None, "matches exclusion 'Thumbs.db'"),  # by the file's name
        ("big.bin", 1001, "size 1001 above policy max_size 1000"),
    ],
)
def test_excluded_says_why(relpath: str, size: int | None, why: str) -> None:
    assert excluded(POLICY, relpath, size) == why


@pytest.mark.parametrize(
    ("relpath", "size"),
    [
        ("disk.vmdk.txt", None),  # only the last extension counts
        ("vmdk", None),  # a name without a dot has no extension
        ("vmdk.d/readme", None),  # a dot in a directory name is not an extension
        ("iso/file.bin", None),
        ("usr/var/cache/x", None),  # globs are anchored at the VM root
        ("var/cache", None),
        ("Thumbs.db/inside.txt", None),  # the name of a directory is not the file's
        ("Home/U/EDIT.TMP", None),  # globs are case-sensitive (unlike extensions)
        ("limit.bin", 1000),  # max_size is inclusive
        ("unknown-size.bin", None),  # without a size, max_size cannot exclude
    ],
)
def test_not_excluded(relpath: str, size: int | None) -> None:
    assert excluded(POLICY, relpath, size) is None


def test_max_size_zero_excludes_everything_but_empty_files() -> None:
    p = merge({"max_size": 0})
    assert excluded(p, "empty", 0) is None
    assert excluded(p, "one-byte", 1) == "size 1 above policy max_size 0"


def test_excluded_accepts_a_partial_policy() -> None:
    assert excluded({}, "a.iso", 10**9) is None
    assert excluded({"exclude_ext": ["iso"]}, "a.iso") == "extension .iso excluded"
