"""Expected, user-facing failures. The CLI prints these as one line (no traceback)."""


class ConanError(Exception):
    """Base class: a bad path, a malformed input, a config that does not validate."""


class ModelLoadError(ConanError):
    """A model directory is missing or malformed."""


class WeightsFileError(ModelLoadError):
    """A weights file (safetensors) is empty, truncated or corrupt; the message names the file."""


class DatasetIntegrityError(ConanError):
    """A dataset's files do not match its manifest (checksum, row count, missing shard)."""


class OutputWriteError(ConanError, OSError):
    """An output (a dataset dir, a file) cannot be written. Also an OSError, for callers that catch those."""
