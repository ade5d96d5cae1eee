"""Per-VM policies: exclusions, actions on detection, fail mode; inherited by clones.

A policy is a small dict. The effective policy of a VM is the defaults, overlaid by the
policy file's ``[default]`` table, by its base VM's effective policy (for clones), then by the
VM's own settings (from the policy file's ``[vm.NAME]`` table and run-time ``policy set``).

```toml
[default]
actions = ["quarantine", "deny"]   # first that succeeds; "pass" only logs
fail_mode = "open"                 # or "closed": the shim isolates the VM while unprotected
[vm.master]
exclude_globs = ["var/cache/*", "*.iso"]
exclude_ext = ["vmdk"]
max_size = 104857600               # bytes; bigger files are not scanned
prevention = true                  # the shim holds opens until a verdict (docs/prevention.md)
prevention_timeout = 5.0           # seconds a held open waits; then fail_mode answers
```
"""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_POLICY", "PolicyError", "excluded", "load_policy_file", "merge", "validate"]

ACTIONS = ("deny", "quarantine", "pass")
FAIL_MODES = ("open", "closed")
DEFAULT_POLICY: dict[str, Any] = {
    "exclude_globs": [],
    "exclude_ext": [],
    "max_size": None,
    "actions": ["deny"],
    "fail_mode": "open",
}
# Keys with a default kept by their reader rather than here (so effective policies only show
# them when set): ``prevention`` (False) and ``prevention_timeout`` (5.0 s), read by the shim.


class PolicyError(ValueError):
    """A policy setting that cannot be applied; the message names the key and the reason."""


def _str_list(key: str, v: Any) -> list[str]:
    if isinstance(v, str):
        v = [x for x in v.split(",") if x]
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise PolicyError(f"{key}: expected a list of non-empty strings, got {v!r}")
    return v


def _actions(key: str, v: Any) -> list[str]:
    v = _str_list(key, v)
    bad = [a for a in v if a not in ACTIONS]
    if bad or not v:
        raise PolicyError(f"{key}: actions must be some of {', '.join(ACTIONS)}, got {v!r}")
    return v


def _max_size(key: str, v: Any) -> int | None:
    if v in (None, "", "none"):
        return None
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise PolicyError(f"{key}: expected a size in bytes, got {v!r}") from None
    if n < 0:
        raise PolicyError(f"{key}: must not be negative")
    return n


def _fail_mode(key: str, v: Any) -> str:
    if v not in FAIL_MODES:
        raise PolicyError(f"{key}: expected one of {', '.join(FAIL_MODES)}, got {v!r}")
    return str(v)


def _bool(key: str, v: Any) -> bool:
    if isinstance(v, str) and v.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return v.lower() in ("true", "yes", "on", "1")
    if not isinstance(v, bool):
        raise PolicyError(f"{key}: expected true or false, got {v!r}")
    return v


def _seconds(key: str, v: Any) -> float:
    try:
        n = float(v)
    except (TypeError, ValueError):
        raise PolicyError(f"{key}: expected a number of seconds, got {v!r}") from None
    if not 0 < n <= 600:
        raise PolicyError(f"{key}: must be above 0 and at most 600 seconds, got {v!r}")
    return n


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "exclude_globs": _str_list,
    "exclude_ext": lambda k, v: [e.lower().lstrip(".") for e in _str_list(k, v)],
    "max_size": _max_size,
    "actions": _actions,
    "fail_mode": _fail_mode,
    "prevention": _bool,
    "prevention_timeout": _seconds,
}


def validate(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Checked and normalised settings; PolicyError names an unknown key or a bad value."""
    out = {}
    for key, value in settings.items():
        check = _CHECKS.get(key)
        if check is None:
            raise PolicyError(f"unknown policy key {key!r}; known: {', '.join(_CHECKS)}")
        out[key] = check(key, value)
    return out


def merge(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    out = dict(DEFAULT_POLICY)
    for layer in layers:
        if layer:
            out.update(layer)
    return out


def load_policy_file(path: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(default settings, per-VM settings) from a TOML policy file."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"{path}: {exc}") from None
    unknown = set(data) - {"default", "vm"}
    if unknown:
        raise PolicyError(
            f"{path}: unknown table(s) {', '.join(sorted(unknown))}; use [default] and [vm.NAME]"
        )
    try:
        default = validate(data.get("default", {}))
        per_vm = {name: validate(t) for name, t in data.get("vm", {}).items()}
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc}") from None
    return default, per_vm


def excluded(policy: Mapping[str, Any], relpath: str, size: int | None = None) -> str | None:
    """Why ``relpath`` is excluded from scanning by ``policy``, or None."""
    ext = relpath.rsplit(".", 1)[-1].lower() if "." in relpath.rsplit("/", 1)[-1] else ""
    if ext and ext in policy.get("exclude_ext", ()):
        return f"extension .{ext} excluded"
    for pattern in policy.get("exclude_globs", ()):
        if fnmatch.fnmatchcase(relpath, pattern) or fnmatch.fnmatchcase(
            relpath.rsplit("/", 1)[-1], pattern
        ):
            return f"matches exclusion {pattern!r}"
    limit = policy.get("max_size")
    if size is not None and limit is not None and size > limit:
        return f"size {size} above policy max_size {limit}"
    return None
