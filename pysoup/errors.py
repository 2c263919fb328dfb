"""The one exception family. Messages are one line and name the file and the tensor."""


class SoupError(Exception):
    """Base class of every error pysoup raises on purpose."""


class FormatError(SoupError):
    """A checkpoint file or directory is malformed (bad header, bad offsets, missing shard...)."""


class PlanError(SoupError):
    """The inputs cannot be merged as asked: missing keys, shape mismatch, bad weights or parameters."""


class BackendError(SoupError):
    """A requested backend or CPU ISA cannot run here."""


class OutputError(SoupError):
    """The output could not be written (disk full, permission denied); nothing was left at the target."""
