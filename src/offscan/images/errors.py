"""The exceptions of image scanning, in a module of their own so every part can raise them.

Touches nothing: it only defines exception classes.
"""

from __future__ import annotations


class ImageError(Exception):
    """An image that cannot be scanned: missing, of no supported kind, or malformed."""


class BlobDigestError(ImageError):
    """A blob whose content does not hash to the digest it is named by (corrupt or tampered)."""
