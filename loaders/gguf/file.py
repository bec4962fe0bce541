"""Zero-copy, validating reader for .gguf model files (diffusion models and text encoders).

The header is walked once by ``_scan`` with every count, length and offset checked against the
file's size; it records where each metadata value and tensor lies, and ``field()`` decodes a
value from there on request. Not ``gguf.GGUFReader``: it trusts the file (a huge array length
makes it loop for hours) and builds a numpy view per array element (seconds for a UMT5 text
encoder's 256k-token vocabulary). The gguf package supplies the quantization types and block
sizes.

Tensor data stays in one private (copy-on-write) memory map of the file: quantized tensors come
back as uint8 views of their packed blocks, float and integer tensors as typed views. Shapes are
given as torch shapes (GGUF lists dimensions fastest-first, i.e. reversed), or as the original
shape a converter recorded under ``comfy.gguf.orig_shape.<tensor>`` when it had to flatten a
tensor into rows of whole blocks (city96's ComfyUI-GGUF convert tool does this for conv weights).
"""
import math
import mmap
import os
import struct
from typing import NamedTuple

import numpy as np
import torch

from ..errors import GGUFError
from ..files.mapped import MappedFile, file_identity, opened

SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# GGML_MAX_DIMS is 4, but ComfyUI-GGUF's converter keeps a 3-D convolution's 5-D weight (Wan's
# and HunyuanVideo's patch embedding) and its fix_5d_tensors step writes it back as a 5-D F32
# tensor through gguf-py, so the Wan/HunyuanVideo files people download hold one. More than 5
# is what no converter writes (and torch convolutions stop at 3-D kernels): refused as corrupt.
MAX_DIMS = 5
MAX_TENSORS = 1 << 20        # real models have a few thousand
MAX_KV = 1 << 20
MAX_NAME_BYTES = 1 << 16     # keys and tensor names (llama.cpp allows 64; converters use ~130)
MAX_ARRAY_DEPTH = 3
MAX_ELEMENTS = 1 << 48
MAX_META_ITEMS = 1 << 23     # strings/arrays inside metadata arrays (tokenizers: < 1 M)
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."

IMAGE_ARCHS = frozenset({"flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos", "ltxv",
                         "hyvid", "wan", "lumina2", "qwen_image"})
TEXT_ARCHS = frozenset({"t5", "t5encoder", "clip", "llama", "qwen2", "qwen2vl", "qwen3", "qwen3vl",
                        "gemma2", "gemma3"})

# GGUF value types: id -> (name, fixed size or None)
_STRING, _ARRAY = 8, 9
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_INT_TYPES = {0, 1, 2, 3, 4, 5, 10, 11}
# Plain numeric GGML types: returned as typed tensors, never dequantized.
_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F64": torch.float64, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
          "I64": torch.int64}

_CORRUPT = "The file is corrupt, truncated or not a GGUF model; download or convert it again"


class GGUFTensorInfo(NamedTuple):
    name: str
    qtype: object           # gguf.GGMLQuantizationType
    shape: torch.Size       # logical torch shape (original shape when recorded)
    stored_shape: tuple     # torch shape of the data as stored (reversed GGUF dims)
    offset: int             # absolute byte offset in the file
    nbytes: int

    @property
    def quantized(self):
        return self.qtype.name not in _PLAIN


def _qtypes():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGMLQuantizationType, GGML_QUANT_SIZES


class _Scanner:
    """Walks the raw header with explicit bounds; raises GGUFError on the first problem."""

    def __init__(self, path, buf, size):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0
        self.items = 0

    def fail(self, problem, hint=_CORRUPT, tensor=None):
        raise GGUFError(self.path, problem, hint, tensor=tensor)

    def take(self, n, what):
        if n < 0 or self.pos + n > self.size:
            self.fail(f"{what} at byte {self.pos} needs {n} bytes but the file ends at "
                      f"{self.size} (truncated?)")
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt, n, what):
        return struct.unpack_from(fmt, self.buf, self.take(n, what))[0]

    def u32(self, what):
        return self.unpack("<I", 4, what)

    def u64(self, what):
        return self.unpack("<Q", 8, what)

    def string(self, what, limit=None):
        n = self.u64(f"length of {what}")
        if limit is not None and n > limit:
            self.fail(f"{what} is {n} bytes long (at most {limit} allowed)")
        start = self.take(n, what)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at byte {start} is not valid UTF-8")

    def value(self, vtype, key, depth=0, collect=False):
        """Skip (or, for short values, return) one metadata value of type ``vtype``; with
        ``collect``, return it, arrays as flat lists (scalar arrays in one numpy conversion)."""
        if vtype in _SCALARS:
            fmt, n = _SCALARS[vtype]
            return self.unpack(fmt, n, f"value of '{key}'")
        if vtype == _STRING:
            return self.string(f"string value of '{key}'")
        if vtype == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                self.fail(f"metadata '{key}' nests arrays deeper than {MAX_ARRAY_DEPTH}")
            itype = self.u32(f"array type of '{key}'")
            count = self.u64(f"array length of '{key}'")
            if itype in _SCALARS:
                n = _SCALARS[itype][1]
                if count > (self.size - self.pos) // n:
                    self.fail(f"metadata array '{key}' claims {count} elements, more than the "
                              f"rest of the file can hold")
                start = self.take(count * n, f"array '{key}'")
                if collect:
                    dtype = np.dtype(_SCALARS[itype][0])
                    return np.frombuffer(self.buf, dtype, count, start).tolist()
                if key.startswith(ORIG_SHAPE_PREFIX) and itype in _INT_TYPES and count <= 8:
                    fmt = "<" + _SCALARS[itype][0][1] * count
                    return ("ints", struct.unpack_from(fmt, self.buf, start))
                return None
            if itype not in (_STRING, _ARRAY):
                self.fail(f"metadata array '{key}' has unknown element type {itype}")
            if count > (self.size - self.pos) // 8:   # every string/array element has a u64
                self.fail(f"metadata array '{key}' claims {count} elements, more than the "
                          f"rest of the file can hold")
            self.items += count
            if self.items > MAX_META_ITEMS:
                # Walking them costs Python time per item: bound it so a crafted file cannot
                # stall the loader for minutes.
                self.fail(f"metadata holds more than {MAX_META_ITEMS} array elements")
            vals = [] if collect else None
            for _ in range(count):
                v = self.value(itype, key, depth + 1, collect)
                if collect:
                    vals.extend(v) if itype == _ARRAY else vals.append(v)
            return vals
        self.fail(f"metadata '{key}' has unknown value type {vtype}")


def _scan(path, buf, size):
    """Validate the header; returns (version, alignment, data_start, [tensor records],
    {key: (value type, value offset)})."""
    qt_enum, quant_sizes = _qtypes()
    s = _Scanner(path, buf, size)
    if size < 24:
        s.fail(f"the file is only {size} bytes, too short for a GGUF header")
    magic = bytes(buf[0:4])
    if magic != b"GGUF":
        hint = "Check that this is really a .gguf file"
        if magic.startswith(b"PK"):
            hint = "It is a zip archive (a PyTorch checkpoint), not GGUF"
        elif magic[:1] == b"{" or bytes(buf[8:9]) == b"{":
            hint = "It looks like a safetensors file; use a safetensors loader"
        s.fail(f"not a GGUF file (magic {magic!r}, expected b'GGUF')", hint)
    s.pos = 4
    version = s.u32("version")
    if version & 0xFFFF == 0 and version:
        s.fail("this GGUF file is big-endian", "Only little-endian GGUF files are supported; "
               "convert it on a little-endian machine")
    if version not in SUPPORTED_VERSIONS:
        s.fail(f"GGUF version {version} is not supported (supported: "
               f"{', '.join(map(str, SUPPORTED_VERSIONS))})",
               "Re-convert the model with a current gguf tool")
    n_tensors = s.u64("tensor count")
    n_kv = s.u64("metadata count")
    room = size - s.pos
    if n_kv > min(MAX_KV, room // 13):      # smallest entry: key length, type, one byte
        s.fail(f"header claims {n_kv} metadata entries; a file of {size} bytes holds at most "
               f"{min(MAX_KV, room // 13)}")
    if n_tensors > min(MAX_TENSORS, room // 24):   # smallest tensor record is 24 bytes
        s.fail(f"header claims {n_tensors} tensors; a file of {size} bytes holds at most "
               f"{min(MAX_TENSORS, room // 24)}")
    kv, orig_shapes = {}, {}
    alignment = DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = s.string("metadata key", MAX_NAME_BYTES)
        if key in kv:
            s.fail(f"metadata key '{key}' appears twice")
        vtype = s.u32(f"type of '{key}'")
        kv[key] = (vtype, s.pos)
        val = s.value(vtype, key)
        if key == "general.alignment":
            if vtype != 4 or val == 0 or val & (val - 1):
                s.fail(f"general.alignment must be a power-of-two UINT32, got {val!r} "
                       f"(type {vtype})")
            alignment = val
        elif key.startswith(ORIG_SHAPE_PREFIX):
            orig_shapes[key[len(ORIG_SHAPE_PREFIX):]] = val
    records, names = [], set()
    for _ in range(n_tensors):
        name = s.string("tensor name", MAX_NAME_BYTES)
        if name in names:
            s.fail("two tensors have this name", tensor=name)
        names.add(name)
        n_dims = s.u32(f"dimension count of '{name}'")
        if not 1 <= n_dims <= MAX_DIMS:
            s.fail(f"has {n_dims} dimensions (1 to {MAX_DIMS} supported)", tensor=name)
        dims = [s.u64(f"dimensions of '{name}'") for _ in range(n_dims)]
        raw_type = s.u32(f"type of '{name}'")
        offset = s.u64(f"data offset of '{name}'")
        try:
            qtype = qt_enum(raw_type)
            block, type_size = quant_sizes[qtype]
        except (ValueError, KeyError):
            s.fail(f"unknown tensor type number {raw_type}",
                   "The file uses a GGML type this gguf package does not know: upgrade it "
                   "(pip install -U gguf) or re-quantize the model", tensor=name)
        n = 1
        for d in dims:
            n *= d
            if n > MAX_ELEMENTS:
                s.fail(f"shape {dims} (GGUF order) has too many elements", tensor=name)
        if dims[0] % block:
            s.fail(f"row length {dims[0]} is not a multiple of the {qtype.name} block size "
                   f"{block}", tensor=name)
        records.append([name, qtype, tuple(reversed(dims)), offset, n // block * type_size, n])
    data_start = -(-s.pos // alignment) * alignment
    if data_start > size and records:
        s.fail("the file ends inside the tensor-information header (truncated?)")
    spans = []
    for rec in records:
        name, qtype, stored, offset, nbytes, n = rec
        if offset % alignment:
            s.fail(f"data offset {offset} is not a multiple of the alignment {alignment}",
                   tensor=name)
        end = data_start + offset + nbytes
        if end > size:
            s.fail(f"data (bytes {data_start + offset}..{end}) lies past the end of the file "
                   f"({size} bytes)", "The file is truncated or corrupt; download it again",
                   tensor=name)
        rec[3] = data_start + offset
        spans.append((rec[3], end, name))
    spans.sort()
    for (_, prev_end, prev), (begin, end, name) in zip(spans, spans[1:]):
        if begin < prev_end and end > begin:
            s.fail(f"data overlaps tensor '{prev}'", "The file is corrupt or maliciously "
                   "crafted; do not use it", tensor=name)
    for name, shape in orig_shapes.items():
        if name not in names:
            continue
        rec = next(r for r in records if r[0] == name)
        if not (isinstance(shape, tuple) and shape[0] == "ints"
                and all(d >= 0 for d in shape[1]) and math.prod(shape[1]) == rec[5]):
            s.fail(f"{ORIG_SHAPE_PREFIX}{name} must be a list of non-negative integers with "
                   f"{rec[5]} elements in all, got {shape!r}", tensor=name)
        rec.append(tuple(shape[1]))
    return version, alignment, data_start, records, kv


class GGUFFile(MappedFile):
    """A validated, read-only view of one .gguf file.

    ``tensor(name)``: zero-copy view (uint8 packed blocks for quantized types, typed otherwise);
    ``info(name)``: GGUFTensorInfo; ``field(key)``: a metadata value as Python data;
    ``architecture``: ``general.architecture`` (None when absent, e.g. stable-diffusion.cpp).
    Views stay valid after the object is dropped (they keep the mapping alive).
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        with opened(self.path, GGUFError, "GGUF") as (fd, st):
            self._ident = file_identity(st)
            if st.st_size == 0:
                raise GGUFError(self.path, "the file is empty", "The download or copy was "
                                "probably interrupted; fetch it again")
            # Private and copy-on-write: tensors are writable without touching the file
            # (ComfyUI and torch warn about, or refuse, read-only arrays).
            self._buf = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            scanned = _scan(self.path, self._buf, st.st_size)
        self.version, self.alignment, self.data_start, records, self._kv = scanned
        self._bytes = np.frombuffer(self._buf, dtype=np.uint8)
        self._infos = {}
        for rec in records:
            name, qtype, stored, offset, nbytes = rec[:5]
            shape = rec[6] if len(rec) > 6 else stored
            self._infos[name] = GGUFTensorInfo(name, qtype, torch.Size(shape), stored, offset,
                                               nbytes)
        self.architecture = self._architecture()

    def _architecture(self):
        if "general.architecture" not in self._kv:
            return None
        arch = self.field("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(self.path, f"general.architecture must be a string, got {arch!r}",
                            _CORRUPT)
        return arch

    # -- metadata --------------------------------------------------------------------------
    def fields(self):
        return list(self._kv)

    def field(self, key, default=None):
        """A metadata value: int/float/bool/str, or a list for arrays (flattened)."""
        if key not in self._kv:
            return default
        vtype, pos = self._kv[key]
        s = _Scanner(self.path, self._buf, len(self._buf))   # the header is validated already
        s.pos = pos
        return s.value(vtype, key, collect=True)

    # -- tensors ---------------------------------------------------------------------------
    def keys(self):
        return list(self._infos)

    def __contains__(self, name):
        return name in self._infos

    def __len__(self):
        return len(self._infos)

    def __iter__(self):
        return iter(self._infos)

    def info(self, name):
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named '{name}' "
                           f"(the file has {len(self._infos)} tensors)") from None

    def raw(self, name):
        """The tensor's stored bytes as a uint8 view (shape: rows x bytes per row)."""
        info = self.info(name)
        if info.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        t = torch.from_numpy(self._bytes[info.offset: info.offset + info.nbytes])
        return t.reshape(info.stored_shape[:-1] + (-1,))

    def tensor(self, name):
        """Typed view (logical shape) for plain types; packed uint8 view for quantized ones."""
        info = self.info(name)
        raw = self.raw(name)
        dtype = _PLAIN.get(info.qtype.name)
        if dtype is None:
            return raw
        if raw.numel() == 0:
            return torch.empty(info.shape, dtype=dtype)
        return raw.reshape(-1).view(dtype).view(info.shape)

    def state_dict(self):
        """(tensors, {name: (qtype, logical shape)}): zero-copy views of every tensor."""
        self.check_unchanged()
        sd = {name: self.tensor(name) for name in self._infos}
        return sd, {name: (i.qtype, i.shape) for name, i in self._infos.items()}

    def qtype_counts(self):
        out = {}
        for i in self._infos.values():
            out[i.qtype.name] = out.get(i.qtype.name, 0) + 1
        return out

    def __repr__(self):
        return (f"GGUFFile({self.path!r}, v{self.version}, arch={self.architecture!r}, "
                f"{len(self._infos)} tensors)")
