"""Expected, user-facing failures. The CLI prints these as one line (no traceback)."""


class ConanError(Exception):
    """Base class: a bad path, a malformed input, a config that does not validate."""


class ModelLoadError(ConanError):
    """A model directory is missing or malformed."""


class DatasetIntegrityError(ConanError):
    """A dataset's files do not match its manifest (checksum, row count, missing shard)."""
