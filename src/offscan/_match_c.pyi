"""Type stub of the native matcher core built from ext/_match_c.pyx.

It must stay the same contract as the Python twin, ``offscan._match_py.Core``.
"""

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

from ._tables import Tables

NATIVE: bool
SIMD: str  # "avx512", "avx2" or "none": the default filter loop (OFFSCAN_SIMD forces one)
SIMD_AVAILABLE: tuple[str, ...]  # every filter loop this CPU can run, narrowest first

class Core:
    """Finds every verified (part, start) hit of the compiled parts in a buffer."""

    simd: str
    def __init__(self, tables: Tables, *, simd: str | None = None) -> None: ...
    def find(
        self, buf: Buffer, min_end: int, done: npt.NDArray[np.uint8]
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]: ...
