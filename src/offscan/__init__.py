"""offscan: an agentless scan offload engine (one scanning appliance per host for many VMs)."""

__version__ = "0.1.0"

from .engine import Matcher, ScanResult  # noqa: E402
from .signatures import PatternDB, SignatureError, load_database  # noqa: E402

__all__ = ["Matcher", "PatternDB", "ScanResult", "SignatureError", "load_database", "__version__"]
