"""Reference matcher core: finds signature-part hits with pyahocorasick (the typed contract).

``ext/_match_c.pyx`` implements the same ``Core`` natively; both must return the same hits for
every input, which the Hypothesis tests check.
"""

from __future__ import annotations

import ahocorasick
import numpy as np

from ._tables import Tables

NATIVE = False


class Core:
    """Finds every verified (part, start) hit of the compiled parts in a buffer."""

    def __init__(self, tables: Tables) -> None:
        self.t = tables
        self._auto = ahocorasick.Automaton(ahocorasick.STORE_ANY, ahocorasick.KEY_STRING)
        by_atom: dict[bytes, list[int]] = {}
        for p, atom in enumerate(tables.atoms):
            by_atom.setdefault(atom, []).append(p)
        for atom, parts in by_atom.items():
            self._auto.add_word(atom.decode("latin-1"), (len(atom), tuple(parts)))
        self._empty = not by_atom
        if not self._empty:
            self._auto.make_automaton()
        t = tables
        self._len = t.part_len.tolist()
        self._vstart = t.part_vstart.tolist()
        self._plain = t.part_plain.tolist()
        self._once = t.part_once.tolist()
        self._atom_off = t.atom_off.tolist()
        self._values = t.values.tobytes()
        self._masks = t.masks.tobytes()
        self._alt_start = t.part_alt_start.tolist()
        self._alts = [
            (
                int(t.alt_off[a]),
                int(t.alt_len[a]),
                bool(t.alt_neg[a]),
                {
                    t.alt_pool[s : s + int(t.alt_len[a])].tobytes()
                    for s in range(
                        int(t.alt_pool_start[a]),
                        int(t.alt_pool_start[a]) + int(t.alt_nopt[a]) * int(t.alt_len[a]),
                        int(t.alt_len[a]),
                    )
                },
            )
            for a in range(len(t.alt_off))
        ]

    def _verify(self, buf: bytes, p: int, s: int) -> bool:
        ln = self._len[p]
        v0 = self._vstart[p]
        window = buf[s : s + ln]
        if self._plain[p]:
            return window == self._values[v0 : v0 + ln]
        values, masks = self._values, self._masks
        for i in range(ln):
            m = masks[v0 + i]
            if m and (window[i] & m) != values[v0 + i]:
                return False
        for a in range(self._alt_start[p], self._alt_start[p + 1]):
            off, alen, neg, options = self._alts[a]
            if (window[off : off + alen] in options) == neg:
                return False
        return True

    def find(self, buf, min_end: int, done: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Hits whose part ends after ``min_end`` (window overlap), as (parts, starts) arrays.

        Parts flagged *once* are skipped when ``done[p]`` is set and set it on their first hit.
        """
        data = bytes(buf)
        n = len(data)
        out_p: list[int] = []
        out_s: list[int] = []
        if not self._empty:
            for end, (alen, parts) in self._auto.iter(data.decode("latin-1")):
                i = end - alen + 1
                for p in parts:
                    if done[p]:
                        continue
                    s = i - self._atom_off[p]
                    e = s + self._len[p]
                    if s < 0 or e > n or e <= min_end:
                        continue
                    if self._verify(data, p, s):
                        out_p.append(p)
                        out_s.append(s)
                        if self._once[p]:
                            done[p] = 1
        return np.array(out_p, dtype=np.int32), np.array(out_s, dtype=np.int64)
