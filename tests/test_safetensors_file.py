import json
import os
import pickle  # only to *write* a pickle that the loader must refuse
import struct
import time
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load_file as ref_load_file, save_file

from vbar_loaders.loaders.errors import FileChangedError, SafetensorsError
from vbar_loaders.loaders.files.safetensors_file import DTYPES, SafetensorsFile, load_file


def _sample_tensors():
    g = torch.Generator().manual_seed(0)
    out = {
        "f64": torch.randn(3, 4, generator=g, dtype=torch.float64),
        "f32": torch.randn(5, 7, generator=g),
        "f16": torch.randn(2, 3, 4, generator=g).half(),
        "bf16": torch.randn(17, generator=g).bfloat16(),
        "i64": torch.randint(-2**40, 2**40, (6,), generator=g),
        "i32": torch.randint(-2**30, 2**30, (2, 2), generator=g, dtype=torch.int32),
        "i16": torch.randint(-2**15, 2**15, (9,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-128, 128, (3, 3), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 256, (11,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(4, 5, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        "empty_bf16": torch.zeros(2, 0, dtype=torch.bfloat16),
    }
    if "F8_E4M3" in DTYPES:
        out["f8e4m3"] = torch.randn(8, 2, generator=g).to(torch.float8_e4m3fn)
    if "F8_E5M2" in DTYPES:
        out["f8e5m2"] = torch.randn(3, generator=g).to(torch.float8_e5m2)
    for name, dt in (("u16", "uint16"), ("u32", "uint32"), ("u64", "uint64")):
        if hasattr(torch, dt):
            out[name] = torch.arange(7, dtype=torch.int64).to(getattr(torch, dt))
    return out


META = {"format": "pt", "note": "üñí"}


@pytest.fixture
def good(tmp_path):
    p = tmp_path / "good.safetensors"
    save_file(_sample_tensors(), str(p), metadata=META)
    return p


def _assert_matches_reference(path, tensors):
    ref = ref_load_file(str(path))
    assert set(tensors) == set(ref)
    for k, r in ref.items():
        t = tensors[k]
        assert t.dtype == r.dtype and t.shape == r.shape, k
        # torch.equal lacks kernels for some dtypes (fp8, uint16...); compare the bytes
        assert t.contiguous().view(-1).view(torch.uint8).tolist() == \
            r.contiguous().view(-1).view(torch.uint8).tolist() or t.numel() == 0, k
        if r.dtype in (torch.float32, torch.float64, torch.int64, torch.bool):
            assert torch.equal(t, r), k


def test_roundtrip_all_dtypes(good):
    with SafetensorsFile(good) as f:
        assert f.metadata == META
        assert len(f) == len(_sample_tensors()) and "bf16" in f and "nope" not in f
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        _assert_matches_reference(good, tensors)
        assert tensors["scalar"].shape == () and tensors["scalar"].item() == 3.25
        dtype, shape, off, nbytes = f.info("f16")
        assert (dtype, shape, nbytes) == (torch.float16, (2, 3, 4), 48)
        with open(good, "rb") as fh:
            fh.seek(off)
            assert fh.read(nbytes) == bytes(f.raw("f16").tolist())
        assert f.raw("empty").numel() == 0
        with pytest.raises(KeyError, match="good.safetensors.*nope"):
            f.get_tensor("nope")
    _assert_matches_reference(good, load_file(good))


def test_views_survive_close(good):
    f = SafetensorsFile(good)
    t = f.get_tensor("f32")
    f.close()
    del f
    assert torch.equal(t, ref_load_file(str(good))["f32"])
    with SafetensorsFile(good) as f:
        pass
    with pytest.raises(SafetensorsError, match="closed"):
        f.get_tensor("f32")


def test_no_copy_and_lazy(tmp_path):
    # Sparse data section: 256 MB on "disk" costs nothing, and RSS would jump by that much
    # if the loader read or copied it.
    p = tmp_path / "big.safetensors"
    n = 64 * 1024 * 1024
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}})
    header += " " * (-len(header) % 8)
    with open(p, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header.encode())
        fh.truncate(8 + len(header) + 4 * n)

    def rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    t0 = time.perf_counter()
    with SafetensorsFile(p) as f:
        w = f.get_tensor("w")
        base = f._mm
    elapsed = time.perf_counter() - t0
    assert rss() - before < 16 * 1024 * 1024
    assert elapsed < 0.5
    assert w.shape == (n,) and w.dtype == torch.float32
    # The view's memory lies inside the mapping, right after the header.
    start = torch.frombuffer(base, dtype=torch.uint8, count=1).data_ptr()
    assert w.data_ptr() == start + 8 + len(header)
    w[0] = 1.5  # private copy-on-write page: must not reach the file
    with open(p, "rb") as fh:
        fh.seek(8 + len(header))
        assert fh.read(4) == b"\0\0\0\0"


# -- malformed files ------------------------------------------------------------------------
def _write(path, header, data=b"", raw_header=None):
    hb = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    return path


def _entry(dtype="F32", shape=(2,), offs=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}


MALFORMED = {
    # name: (header dict | raw bytes, data, expected tensor name or None, message fragment)
    "unknown_dtype": ({"t": _entry(dtype="F128")}, b"\0" * 8, "t", "unknown dtype"),
    "negative_shape": ({"t": _entry(shape=(-2,))}, b"\0" * 8, "t", "non-negative"),
    "float_shape": ({"t": _entry(shape=(2.0,))}, b"\0" * 8, "t", "non-negative"),
    "bool_shape": ({"t": _entry(shape=(True,), offs=(0, 4))}, b"\0" * 4, "t", "non-negative"),
    "offsets_past_end": ({"t": _entry(offs=(0, 8))}, b"\0" * 4, "t", "data_offsets"),
    "offsets_reversed": ({"t": _entry(offs=(8, 0))}, b"\0" * 8, "t", "data_offsets"),
    "overlap": ({"a": _entry(offs=(0, 8)), "b": _entry(offs=(4, 12))}, b"\0" * 12, "b",
                "overlaps tensor 'a'"),
    "length_mismatch": ({"t": _entry(shape=(3,), offs=(0, 8))}, b"\0" * 8, "t", "needs 12 bytes"),
    "missing_key": ({"t": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "t", "data_offsets"),
    "bad_metadata": ({"__metadata__": {"a": 1}}, b"", None, "__metadata__"),
    "non_object": (b"[1, 2, 3]", b"", None, "not a safetensors"),
    "non_object_padded": (b"{}" + b" " * 6, b"", None, None),  # valid: empty file
    "top_level_list_entry": ({"t": [1, 2]}, b"", "t", "not a JSON object"),
    "non_json": (b"{this is not json}", b"", None, "not valid UTF-8 JSON"),
    "bad_utf8": (b'{"\xff": 1}', b"", None, "not valid UTF-8 JSON"),
    "duplicate_key": (b'{"t": 1, "t": 2}', b"", None, "duplicate"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed(tmp_path, kind):
    header, data, tensor, fragment = MALFORMED[kind]
    p = tmp_path / f"bad_{kind}.safetensors"
    if isinstance(header, bytes):
        _write(p, None, data, raw_header=header)
    else:
        _write(p, header, data)
    if fragment is None:
        with SafetensorsFile(p) as f:
            assert len(f) == 0
        return
    with pytest.raises(SafetensorsError) as ei:
        SafetensorsFile(p)
    msg = str(ei.value)
    assert p.name in msg and fragment in msg
    if tensor:
        assert f"'{tensor}'" in msg and ei.value.tensor == tensor


def _raises(p, *fragments):
    with pytest.raises(SafetensorsError) as ei:
        SafetensorsFile(p)
    msg = str(ei.value)
    assert p.name in msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


def test_header_length_too_big(tmp_path):
    p = tmp_path / "huge.safetensors"
    p.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    _raises(p, "header length")
    p.write_bytes(struct.pack("<Q", 1) + b"{}")
    _raises(p, "header length")


def test_truncated_file(tmp_path, good):
    data = good.read_bytes()
    p = tmp_path / "cut.safetensors"
    p.write_bytes(data[:100])
    _raises(p, "truncated")
    p.write_bytes(data[:-4])
    _raises(p, "data_offsets")
    p.write_bytes(data[:5])
    _raises(p, "too short")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    _raises(p, "empty")


def test_missing_file(tmp_path):
    _raises(tmp_path / "missing.safetensors", "cannot open")


def test_pickle_file(tmp_path):
    p = tmp_path / "model.ckpt"
    p.write_bytes(pickle.dumps({"state_dict": [1, 2, 3]}, protocol=2))
    _raises(p, "pickle", "never loaded", ".safetensors")


def test_zip_file(tmp_path):
    p = tmp_path / "model.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    _raises(p, "zip", "never loaded", ".safetensors")


def test_header_length_low_byte_0x80_is_not_a_pickle(tmp_path):
    # A real header whose length is 0x80 + ... starts with byte 0x80 like a pickle does.
    h = json.dumps({"t": _entry(offs=(0, 8))}).encode()
    h += b" " * (0x80 - len(h))
    p = _write(tmp_path / "x80.safetensors", None, b"\0" * 8, raw_header=h)
    with SafetensorsFile(p) as f:
        assert f.get_tensor("t").tolist() == [0.0, 0.0]


# -- file identity ------------------------------------------------------------------------
def test_truncation_detected(tmp_path, good):
    f = SafetensorsFile(good)
    f.check_unchanged()
    os.truncate(good, 64)
    with pytest.raises(FileChangedError, match="truncated.*[Rr]eload") as ei:
        f.get_tensor("f32")  # must raise before any page of the cut region is touched
    assert good.name in str(ei.value) and "'f32'" in str(ei.value)
    with pytest.raises(FileChangedError):
        f.raw("f32")


def test_rewrite_detected(tmp_path, good):
    f = SafetensorsFile(good)
    st0 = os.stat(good)
    save_file({"x": torch.ones(3)}, str(tmp_path / "new.safetensors"))
    os.replace(tmp_path / "new.safetensors", good)
    with pytest.raises(FileChangedError, match="replaced"):
        f.get_tensor("f32")
    # same size, same inode, new mtime: rewritten in place
    f = SafetensorsFile(good)
    os.utime(good, ns=(st0.st_atime_ns, os.stat(good).st_mtime_ns + 10**9))
    with pytest.raises(FileChangedError, match="modified"):
        f.check_unchanged()


def test_delete_detected(good):
    f = SafetensorsFile(good)
    t = f.get_tensor("f32")
    os.unlink(good)
    with pytest.raises(FileChangedError, match="deleted"):
        f.get_tensor("f32")
    assert t.sum().isfinite()  # earlier views remain valid: the inode lives on
    f.verify = False
    f.get_tensor("f32")


# -- fuzz ---------------------------------------------------------------------------------
def _small_valid_file():
    from safetensors.torch import save
    return save({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                 "b": torch.tensor(7, dtype=torch.int16),
                 "c": torch.zeros(0, dtype=torch.bfloat16)}, metadata={"k": "v"})


_VALID = _small_valid_file()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)),
                min_size=1, max_size=6),
       st.one_of(st.none(), st.integers(0, len(_VALID))))
def test_fuzz_header(tmp_path, edits, cut):
    data = bytearray(_VALID)
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    for pos, val in edits:
        data[pos % header_end] = val  # mostly mutate the header, where the parsing is
    if cut is not None:
        data = data[:cut]
    p = tmp_path / "fuzz.safetensors"
    p.write_bytes(bytes(data))
    try:
        f = SafetensorsFile(p)
    except SafetensorsError as e:
        assert p.name in str(e)
        return
    with f:
        for k in f.keys():
            t = f.get_tensor(k)
            dtype, shape, off, nbytes = f.info(k)
            assert t.dtype == dtype and tuple(t.shape) == shape
            assert off + nbytes <= len(data)
            t.view(-1).view(torch.uint8).sum()  # touch every byte: must stay in bounds


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.sampled_from(sorted(DTYPES) + ["F4", "", "f32"]) | st.text(max_size=4),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=3), kids, max_size=3),
    max_leaves=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c", "__metadata__", "new"]),
                          st.sampled_from(["dtype", "shape", "data_offsets", None]),
                          st.one_of(_JSON, st.lists(st.integers(0, 40), max_size=3))),
                min_size=1, max_size=3))
def test_fuzz_header_fields(tmp_path, edits):
    # Type-confused values (a list where a string belongs, huge ints...) must be refused
    # with SafetensorsError, never crash with TypeError/OverflowError.
    n = struct.unpack("<Q", _VALID[:8])[0]
    header, data = json.loads(_VALID[8:8 + n]), _VALID[8 + n:]
    for name, field, value in edits:
        if field is None or not isinstance(header.get(name), dict):
            header[name] = value
        else:
            header[name][field] = value
    hb = json.dumps(header).encode()
    p = tmp_path / "fuzz_fields.safetensors"
    p.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    try:
        f = SafetensorsFile(p)
    except SafetensorsError as e:
        assert p.name in str(e)
        return
    with f:
        for k in f.keys():
            assert f.get_tensor(k).view(-1).view(torch.uint8).numel() == f.info(k)[3]
