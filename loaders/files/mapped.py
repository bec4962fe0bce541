"""What the safetensors and GGUF readers share: opening a model file, and noticing later that
the path no longer holds the bytes that were mapped.

Both readers map the file privately (copy-on-write) and hand out tensors that are views of
the mapping. Touching a page of a file that was truncated since is SIGBUS, which kills the
process; so before a view is used the reader re-stats the path (about a microsecond) and
raises FileChangedError instead.
"""
import contextlib
import os
import sys

from ..errors import FileChangedError


def file_identity(st):
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@contextlib.contextmanager
def opened(path, error, what):
    """Yield (fd, stat) of ``path`` opened read-only; ``error`` (a ModelFileError class) names
    the file when it cannot be opened. ``what`` names the format in messages."""
    if sys.byteorder != "little":
        raise error(path, f"{what} data is little-endian and this machine is big-endian",
                    "Use a little-endian machine")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(path, f"cannot open file ({e.strerror})",
                    "Check that the path exists and is readable") from e
    try:
        yield fd, os.fstat(fd)
    finally:
        os.close(fd)   # a mapping keeps its own duplicate descriptor


class MappedFile:
    """Base of the readers: ``path`` and the identity of the file when it was opened."""

    path: str
    _ident: tuple

    def check_unchanged(self, tensor=None):
        """Raise FileChangedError if the path no longer holds the file that was opened."""
        try:
            now = file_identity(os.stat(self.path))
        except FileNotFoundError:
            now = None
        if now == self._ident:
            return
        if now is None:
            what = "deleted"
        elif now[:2] != self._ident[:2]:
            what = "replaced by another file"
        else:
            what = "truncated" if now[2] < self._ident[2] else "modified"
        raise FileChangedError(self.path, f"the file was {what} after it was loaded",
                               "Reload the model (do not modify model files while they are "
                               "in use)", tensor=tensor)
