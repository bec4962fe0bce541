"""Zero-copy, validating reader for .safetensors files.

The header is the only thing read at open time; tensors are views into a private
(copy-on-write) memory map, so pages are faulted in only when a tensor is used.
Nothing in the file is trusted before it has been checked, and pickles are never loaded.
"""
import json
import mmap
import os
import struct

import torch

from ..errors import SafetensorsError
from .mapped import MappedFile, file_identity, opened

MAX_HEADER_BYTES = 100 * 1024 * 1024
_MAX_DIM = 2**63 - 1  # torch sizes are int64; larger dims would only fail later, obscurely

# Names from the safetensors spec; an entry whose torch dtype is missing in this torch
# build is reported as unsupported rather than silently dropped.
_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
}
DTYPES = {k: getattr(torch, v) for k, v in _DTYPE_NAMES.items() if hasattr(torch, v)}

_CONVERT_HINT = ("Pickled checkpoints can run arbitrary code and are never loaded; "
                 "convert it to .safetensors (e.g. with a trusted offline script) and load that")


def _not_safetensors(path, head):
    """A clearer message for well-known non-safetensors formats, or None."""
    if head.startswith(b"PK\x03\x04"):
        return SafetensorsError(path, "this is a zip archive (a PyTorch .pt/.ckpt checkpoint), "
                                "not a safetensors file", _CONVERT_HINT)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return SafetensorsError(path, "this is a Python pickle (a legacy .ckpt/.pt/.bin "
                                "checkpoint), not a safetensors file", _CONVERT_HINT)
    if head.startswith(b"GGUF"):
        return SafetensorsError(path, "this is a GGUF file, not a safetensors file",
                                "Load it with the GGUF loader")
    return None


def _reject_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key '{dup}'")
    return dict(pairs)


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


class SafetensorsFile(MappedFile):
    """A read-only view of one .safetensors file.

    ``verify=True`` re-stats the path before handing out each tensor (one ``os.stat``,
    about a microsecond) so a file truncated or replaced since opening raises
    ``FileChangedError`` instead of crashing the process with SIGBUS when a page is touched.

    Tensors are views of a MAP_PRIVATE mapping: writing to one never reaches the disk but
    copies the touched pages into RAM and is visible to later ``get_tensor`` calls on this
    object. Views stay valid after ``close()``; the mapping is unmapped when the last one dies.
    """

    def __init__(self, path, verify=True):
        self.path = os.fspath(path)
        self.verify = verify
        with opened(self.path, SafetensorsError, "safetensors") as (fd, st):
            self._ident = file_identity(st)
            self._entries, self.metadata, self._data_start = self._parse(fd, st.st_size)
            # mmap of an empty file is an error; a header-only file has nothing to view anyway
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY) if self._data_len(st) else None
        self._closed = False

    def _data_len(self, st):
        return st.st_size - self._data_start

    # -- header ----------------------------------------------------------------------------
    def _parse(self, fd, size):
        path = self.path
        head = os.pread(fd, 16, 0)
        if size == 0:
            raise SafetensorsError(path, "the file is empty",
                                   "The download or copy was probably interrupted; fetch it again")
        if size < 8:
            raise _not_safetensors(path, head) or SafetensorsError(
                path, f"the file is only {size} bytes, too short to be safetensors",
                "The download or copy was probably interrupted; fetch it again")
        (n,) = struct.unpack("<Q", head[:8])
        if not (1 < n <= MAX_HEADER_BYTES and n <= size - 8) or head[8:9] != b"{":
            known = _not_safetensors(path, head)
            if known:
                raise known
            if n > size - 8 and n <= MAX_HEADER_BYTES:
                raise SafetensorsError(path, f"header claims {n} bytes but the file has only "
                                       f"{size - 8} after the length field (file truncated?)",
                                       "Download or copy the file again")
            raise SafetensorsError(path, f"not a safetensors file (header length {n} is "
                                   f"invalid or the header does not start with '{{')",
                                   "Check that this is really a .safetensors file")
        raw = os.pread(fd, n, 8)
        if len(raw) != n:
            raise SafetensorsError(path, "the file shrank while its header was being read",
                                   "Wait until the file is fully written, then reload")
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
        except (ValueError, RecursionError) as e:
            raise SafetensorsError(path, f"header is not valid UTF-8 JSON ({e})",
                                   "The file is corrupt; download or copy it again") from None
        if not isinstance(header, dict):
            raise SafetensorsError(path, "header is not a JSON object",
                                   "The file is corrupt; download or copy it again")
        meta = header.pop("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise SafetensorsError(path, "__metadata__ must map strings to strings",
                                   "Rewrite the file with valid metadata")
        data_start = 8 + n
        entries = {name: self._check_entry(name, e, size - data_start)
                   for name, e in header.items()}
        self._check_overlap(entries)
        return entries, dict(meta), data_start

    def _check_entry(self, name, e, data_len):
        def bad(problem):
            return SafetensorsError(self.path, problem,
                                    "The file is corrupt or was written by a buggy tool; "
                                    "re-download or re-export it", tensor=name)

        if not isinstance(e, dict):
            raise bad("header entry is not a JSON object")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in e:
                raise bad(f"header entry has no '{key}'")
        dt_name, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dt_name, str) or dt_name not in DTYPES:
            if isinstance(dt_name, str) and dt_name in _DTYPE_NAMES:
                raise SafetensorsError(self.path, f"dtype {dt_name} is not supported by "
                                       f"torch {torch.__version__}",
                                       "Upgrade torch or convert the tensor", tensor=name)
            raise bad(f"unknown dtype {dt_name!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= _MAX_DIM
                                                  for d in shape):
            raise bad(f"shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(map(_is_int, offs))
                and 0 <= offs[0] <= offs[1] <= data_len):
            raise bad(f"data_offsets {offs!r} are not [begin, end] with "
                      f"0 <= begin <= end <= {data_len} (data section size)")
        dtype = DTYPES[dt_name]
        numel = span = 1
        for d in shape:
            numel *= d
            # torch computes strides over max(d, 1), so [0, 2**62, 4] overflows it too. Stop
            # early: a product of thousands of huge dims is too long even to print.
            span *= max(d, 1)
            if span > _MAX_DIM:
                raise bad(f"shape {str(shape)[:200]} has too many elements")
        nbytes = offs[1] - offs[0]
        if numel * dtype.itemsize != nbytes:
            raise bad(f"shape {shape} of {dt_name} needs {numel * dtype.itemsize} bytes "
                      f"but data_offsets span {nbytes}")
        return dtype, tuple(shape), offs[0], nbytes

    def _check_overlap(self, entries):
        spans = sorted((b, b + nb, name) for name, (_, _, b, nb) in entries.items() if nb)
        for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
            if begin < prev_end:
                raise SafetensorsError(self.path, f"data overlaps tensor '{prev}'",
                                       "The file is corrupt or maliciously crafted; "
                                       "do not use it", tensor=name)

    # -- access ----------------------------------------------------------------------------
    def keys(self):
        return list(self._entries)

    def __contains__(self, name):
        return name in self._entries

    def __len__(self):
        return len(self._entries)

    def __iter__(self):
        return iter(self._entries)

    def _entry(self, name):
        if self._closed:
            raise SafetensorsError(self.path, "the file was closed", "Open it again",
                                   tensor=name)
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named '{name}' "
                           f"(the file has {len(self._entries)} tensors)") from None

    def info(self, name):
        """(dtype, shape, absolute byte offset in the file, nbytes) without touching data."""
        dtype, shape, begin, nbytes = self._entry(name)
        return dtype, shape, self._data_start + begin, nbytes

    def _view(self, name, dtype):
        _, _, begin, nbytes = self._entry(name)
        if self.verify:
            self.check_unchanged(name)
        if nbytes == 0:
            return None
        return torch.frombuffer(self._mm, dtype=dtype, count=nbytes // dtype.itemsize,
                                offset=self._data_start + begin)

    def get_tensor(self, name):
        """The tensor as a view into the mapping: no copy, no page read until used."""
        dtype, shape = self._entry(name)[:2]
        t = self._view(name, dtype)
        return torch.empty(shape, dtype=dtype) if t is None else t.view(shape)

    def raw(self, name):
        """The tensor's bytes as a flat uint8 view."""
        t = self._view(name, torch.uint8)
        return torch.empty(0, dtype=torch.uint8) if t is None else t

    def close(self):
        # Never mmap.close(): torch views reference the mmap object without a buffer
        # export, so unmapping here would leave them dangling (segfault on next use).
        self._mm = None
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"SafetensorsFile({self.path!r}, {len(self._entries)} tensors)"


def load_file(path, device="cpu", verify=True):
    """All tensors of ``path`` as a dict; on CPU they are zero-copy views of the file."""
    with SafetensorsFile(path, verify=verify) as f:
        out = {k: f.get_tensor(k) for k in f.keys()}
    if torch.device(device).type != "cpu":
        out = {k: v.to(device) for k, v in out.items()}
    return out
