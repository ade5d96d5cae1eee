"""The cache: identity memo, content digests, the verdict cache and single-flight.

The appliance's scan pipeline asks, in order: *have we seen this file identity before?*
(:class:`IdentityMemo`, no read needed), *what is its content digest?* (:func:`digest_fd`),
*do we already have a verdict for this content under the current pattern version?*
(:class:`VerdictCache`), and *is someone already scanning this content?* (:class:`SingleFlight`).
Only when all four say no does the engine run, so the same content is matched at most once per
pattern version across every VM on the host (DESIGN.md invariant 2).

Digests are SHA-256. A non-cryptographic hash (xxhash, CRC, ...) is not an option: the verdict
cache hands a verdict to *any* content with the same digest, so an attacker who can build a
collision with a known-clean file would have their malware served that clean verdict without it
ever being matched.

The verdict cache can persist to an append-only log in a state directory (see
:class:`VerdictCache`), so an appliance restarted after a crash, even ``kill -9``, serves the
verdicts it reached before the crash instead of matching that content again.

One module per part: :mod:`.digests`, :mod:`.memo` (identity memo), :mod:`.records` (cached
verdicts and their log framing), :mod:`.verdicts` (the verdict cache), :mod:`.verdict_log`
(its persistence), :mod:`.statelock` (the state-directory lock), :mod:`.flight`
(single-flight), :mod:`.errors`. This package only re-exports them.
"""

from __future__ import annotations

# Names that were module-level in offscan.cache before the split; some are imported by tests.
# __all__ stays the public API it was; the other names are re-exported explicitly (``as``).
from .digests import DIGEST_ALGORITHM, DIGEST_SIZE, content_digest, digest_bytes, digest_fd
from .digests import MIN_DIGEST_SIZE as MIN_DIGEST_SIZE
from .digests import READ_BLOCK as READ_BLOCK
from .errors import CacheError, LogCorruptError, StateDirLockedError
from .flight import SingleFlight
from .memo import DEFAULT_MAX_ENTRIES as DEFAULT_MAX_ENTRIES
from .memo import Identity, IdentityMemo
from .records import LOG_MAGIC as LOG_MAGIC
from .records import MAX_RECORD_BYTES as MAX_RECORD_BYTES
from .records import RECORD_HEADER as RECORD_HEADER
from .records import CachedVerdict
from .records import Status as Status
from .statelock import LOCK_NAME as LOCK_NAME
from .verdict_log import COMPACT_RATIO as COMPACT_RATIO
from .verdict_log import COMPACT_RETRY_DELAY as COMPACT_RETRY_DELAY
from .verdict_log import DEFAULT_COMPACT_MIN_RECORDS as DEFAULT_COMPACT_MIN_RECORDS
from .verdict_log import DEFAULT_FSYNC_INTERVAL as DEFAULT_FSYNC_INTERVAL
from .verdict_log import LOG_NAME as LOG_NAME
from .verdicts import DEFAULT_SHARDS as DEFAULT_SHARDS
from .verdicts import VerdictCache

__all__ = [
    "DIGEST_ALGORITHM",
    "DIGEST_SIZE",
    "CacheError",
    "CachedVerdict",
    "Identity",
    "IdentityMemo",
    "LogCorruptError",
    "SingleFlight",
    "StateDirLockedError",
    "VerdictCache",
    "content_digest",
    "digest_bytes",
    "digest_fd",
]
