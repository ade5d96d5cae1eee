"""Type stub of the native confined identity lookup built from ext/_statwalk_c.pyx.

It must stay the same contract as the Python twin, ``offscan._statwalk_py.identify_many``.
"""

from typing import TypeVar

_I = TypeVar("_I", bound=tuple[str, int, int, int, int, int])

def identify_many(
    dirs: dict[str, int], relpaths: list[str], source: str, cls: type[_I], max_dirs: int
) -> list[_I | None]: ...
