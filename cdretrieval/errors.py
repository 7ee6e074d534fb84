"""The project's exceptions: each names the bad value and, where there is one, what to do."""

from __future__ import annotations


class CDRetrievalError(Exception):
    """Base class of every error this package raises on purpose."""


class ImageLoadError(CDRetrievalError, ValueError):
    """An image file is missing, empty, truncated, corrupt, not an image, or too large."""


class DataError(CDRetrievalError, ValueError):
    """A data set root, a domain or a split file is missing, empty or malformed."""


class CheckpointError(CDRetrievalError, ValueError):
    """A checkpoint or run folder is missing, from another version, or does not match."""


class IndexMismatchError(CDRetrievalError, ValueError):
    """An index was built with another model or embedding dimension than the one asked for."""


class QueryError(CDRetrievalError, ValueError):
    """A retrieval query is malformed (unknown domain, bad k, wrong tensor shape, ...)."""


class IndexFileError(CDRetrievalError, ValueError):
    """An index folder is missing, incomplete, corrupt, inconsistent or of an unknown format version."""
