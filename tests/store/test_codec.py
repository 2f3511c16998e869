"""Codec: round trips per codec, safetensors compatibility, and every corruption is detected."""

import json
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save

from cacheblend.store import codec
from cacheblend.store.codec import (
    CorruptEntryError,
    EncodedChunkKV,
    ForeignEntryError,
    decode,
    decode_layer,
    encode,
    verify,
)

MODEL = "test-model-fingerprint"  # random_kv's default (conftest)


def test_fp16_round_trip_of_fp16_is_exact(make_kv, same_kv):
    kv = make_kv()
    decoded = decode(encode(kv, "fp16"), MODEL)
    same_kv(decoded, kv)
    assert decoded.keys.dtype == torch.float16
    assert decoded.meta == kv.meta


def test_fp16_error_of_fp32_input_is_rounding_only(make_kv):
    kv = make_kv(dtype=torch.float32)
    decoded = decode(encode(kv, "fp16"))
    relative = (decoded.keys.float() - kv.keys).abs() / kv.keys.abs().clamp_min(1e-3)
    assert relative.max() <= 2**-11 + 1e-6


def test_fp32_round_trip_is_exact(make_kv, same_kv):
    kv = make_kv(dtype=torch.float32)
    decoded = decode(encode(kv, "fp32"))
    assert decoded.keys.dtype == torch.float32
    same_kv(decoded, kv)


def test_int8_error_is_bounded_by_half_a_step(make_kv):
    kv = make_kv(dtype=torch.float32)
    blob = encode(kv, "int8")
    for index in range(kv.num_layers):
        for got, want in zip(decode_layer(blob, index), kv.layer(index), strict=True):
            step = want.abs().amax(dim=-1, keepdim=True) / 127  # per (head, token)
            assert ((got - want).abs() <= step / 2 + 1e-6).all()
    full = decode(blob)  # fp16 output: int8 error plus fp16 rounding
    assert (full.keys.float() - kv.keys).abs().max() < 0.05


def test_int8_handles_all_zero_rows(make_kv):
    kv = make_kv()
    kv.keys[:, :, 7] = 0
    decoded = decode(encode(kv, "int8"))
    assert torch.isfinite(decoded.keys.float()).all()
    assert (decoded.keys[:, :, 7] == 0).all()


def test_sizes_per_codec(make_kv):
    kv = make_kv()
    sizes = {name: len(encode(kv, name)) for name in codec.CODECS}
    assert sizes["fp32"] > 1.9 * sizes["fp16"]
    assert sizes["int8"] < 0.6 * sizes["fp16"]


def test_bf16_input_is_accepted(make_kv):
    kv = make_kv(dtype=torch.bfloat16)
    decoded = decode(encode(kv))
    assert torch.allclose(decoded.keys.float(), kv.keys.float(), rtol=1e-2, atol=1e-2)


def test_lazy_layers_match_and_are_fp32(make_kv):
    kv = make_kv()
    lazy = EncodedChunkKV(encode(kv), MODEL)
    assert (lazy.num_layers, lazy.num_tokens, lazy.codec) == (4, 50, "fp16")
    for index in range(kv.num_layers):
        keys, values = lazy.layer(index)
        assert keys.dtype == torch.float32 and keys.shape == (3, 50, 64)
        assert torch.equal(keys, kv.layer(index)[0]) and torch.equal(values, kv.layer(index)[1])


def test_checksum_is_per_layer(make_kv):
    kv = make_kv()
    blob = bytearray(encode(kv))
    lazy = EncodedChunkKV(bytes(blob))
    offset = lazy._spans["v.2"][0]
    blob[offset + 5] ^= 0x01
    lazy = EncodedChunkKV(bytes(blob))  # the header is fine
    lazy.layer(0)  # other layers still load
    with pytest.raises(CorruptEntryError, match="layer 2"):
        lazy.layer(2)
    with pytest.raises(CorruptEntryError):
        decode(bytes(blob))


def test_output_is_plain_safetensors(make_kv, tmp_path):
    kv = make_kv()
    blob = encode(kv, "int8")
    tensors = safetensors_load(blob)
    assert set(tensors) == {f"{p}.{i}" for p in ("k", "v", "ks", "vs") for i in range(4)}
    assert tensors["k.0"].dtype == torch.int8 and tensors["ks.0"].shape == (3, 50)
    path = tmp_path / "entry.safetensors"
    path.write_bytes(blob)
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    assert metadata["model"] == MODEL and metadata["codec"] == "int8"
    assert metadata["tokens"] == "50" and metadata["layers"] == "4"
    assert len(json.loads(metadata["checksums"])) == 4


def test_foreign_model_is_refused(make_kv):
    blob = encode(make_kv(model="other-model"))
    with pytest.raises(ForeignEntryError):
        decode(blob, MODEL)
    assert decode(blob).meta["model"] == "other-model"  # no expectation given: accepted


def test_unknown_codec_is_a_value_error(make_kv):
    with pytest.raises(ValueError, match="fp16"):
        encode(make_kv(), "fp8")


@pytest.mark.parametrize("length", [0, 7, 8, 100, 1000, -1, -100])
def test_truncated_entries_are_corrupt(make_kv, length):
    blob = encode(make_kv())
    with pytest.raises(CorruptEntryError):
        decode(blob[:length])


def test_trailing_garbage_is_corrupt(make_kv):
    with pytest.raises(CorruptEntryError, match="trailing"):
        decode(encode(make_kv()) + b"\0")


def test_garbage_and_other_formats_are_corrupt(make_kv):
    for blob in (b"", b"\xff" * 64, b"\x02\0\0\0\0\0\0\0{}", b"\x02\0\0\0\0\0\0\0[]"):
        with pytest.raises(CorruptEntryError):
            decode(blob)
    with pytest.raises(CorruptEntryError, match="without metadata"):
        decode(save({"x": torch.zeros(2)}))
    with pytest.raises(CorruptEntryError, match="not a"):
        decode(save({"x": torch.zeros(2)}, metadata={"format": "pt"}))


def test_header_tampering_is_detected(make_kv):
    kv = make_kv()
    blob = encode(kv)
    length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + length])
    header["__metadata__"]["meta"] = json.dumps({"model": MODEL, "seed": 99})
    text = json.dumps(header).encode()
    tampered = len(text).to_bytes(8, "little") + text + blob[8 + length :]
    with pytest.raises(CorruptEntryError, match="header checksum"):
        decode(tampered)


def test_random_bit_flips_never_decode_to_wrong_values(make_kv):
    kv = make_kv(tokens=8)
    blob = encode(kv)
    rng = random.Random(0)
    detected = 0
    for _ in range(300):
        damaged = bytearray(blob)
        position = rng.randrange(len(damaged))
        damaged[position] ^= 1 << rng.randrange(8)
        try:
            decoded = decode(bytes(damaged))
        except CorruptEntryError:
            detected += 1
            continue
        # Only a harmless flip (e.g. in the header's space padding) may decode: to the same data.
        assert torch.equal(decoded.keys, kv.keys) and torch.equal(decoded.values, kv.values)
    assert detected >= 290


def test_verify_checks_every_layer(make_kv):
    blob = bytearray(encode(make_kv()))
    verify(bytes(blob))
    blob[-3] ^= 0xFF
    with pytest.raises(CorruptEntryError):
        verify(bytes(blob))


def _rebuild(blob: bytes, edit) -> bytes:
    """``blob`` with its header JSON edited by ``edit`` and the header checksum recomputed:
    a well-formed but lying header, as a buggy or hostile writer could produce."""
    length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + length])
    edit(header)
    header["__metadata__"]["header_checksum"] = codec._header_checksum(header["__metadata__"])
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + blob[8 + length :]


def _set_meta(field, value):
    return lambda header: header["__metadata__"].__setitem__(field, value)


def _set_tensor(name, field, value):
    return lambda header: header[name].__setitem__(field, value)


@pytest.mark.parametrize(
    "edit",
    [
        _set_meta("layers", "1000000000"),
        _set_meta("layers", "3"),
        _set_meta("layers", "x"),
        _set_meta("kv_heads", "-3"),
        _set_meta("tokens", "51"),
        _set_meta("codec", "fp8"),
        _set_meta("codec", "int8"),
        _set_meta("codec_version", "2"),
        _set_meta("layout", "kv-postrope-v1"),
        _set_meta("meta", "[1, 2]"),
        _set_meta("meta", "{"),
        _set_meta("checksums", "{}"),
        _set_meta("checksums", "[1, 2, 3, 4]"),
        _set_tensor("k.0", "dtype", "F32"),
        _set_tensor("k.0", "shape", [3, 25, 128]),
        _set_tensor("k.0", "data_offsets", ["0", "1"]),
        _set_tensor("k.0", "data_offsets", None),
        _set_tensor("k.0", "data_offsets", [-2, 19198]),
        lambda header: header.pop("v.3"),
        lambda header: header.__setitem__("k.9", header["k.0"]),
        lambda header: header.__setitem__("k.0", [1]),
    ],
)
def test_lying_headers_are_corrupt(make_kv, edit):
    with pytest.raises(CorruptEntryError):
        decode(_rebuild(encode(make_kv()), edit))
