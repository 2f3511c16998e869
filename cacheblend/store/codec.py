"""ChunkKV <-> bytes, as a safetensors file with a checksummed header: no pickle, ever.

Layout of one encoded entry (a valid safetensors file; ``safetensors.torch.load`` reads it):

- tensors ``k.{i}`` and ``v.{i}`` per layer, each (num_kv_heads, num_tokens, head_dim), in the
  codec's storage dtype; the ``int8`` codec adds ``ks.{i}`` / ``vs.{i}`` fp32 scales, each
  (num_kv_heads, num_tokens): one absmax scale per token and head.
- string metadata: format, codec, codec version, KV layout version, model fingerprint, shape,
  storage dtype, the entry's ``meta`` as JSON, one xxh3-128 checksum per layer (over that layer's
  tensor bytes) and a checksum over the other metadata fields.

Decoding parses the header itself (8-byte length + JSON, as the safetensors spec defines) rather
than calling ``safetensors.torch.load``: that lets ``EncodedChunkKV`` decode and verify one layer
at a time (layer-wise loading) and costs one copy instead of two. Any mismatch (length, shape,
dtype, checksum, codec version, model) raises ``CorruptEntryError``; store tiers turn it into a
miss and drop the entry.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import xxhash
from safetensors.torch import save as safetensors_save

from cacheblend.store.base import ChunkKV
from cacheblend.store.keys import KV_LAYOUT_VERSION

FORMAT = "cacheblend-kv"
CODEC_VERSION = 1
CODECS = ("fp16", "fp32", "int8")
DEFAULT_CODEC = "fp16"
CHECKSUM_ALGO = "xxh3_128"

_MAX_HEADER_BYTES = 64 << 20  # a header past this is garbage, not an entry
_INT8_MAX = 127.0

# codec -> (storage dtype of k/v, safetensors dtype tag, numpy dtype)
_STORAGE = {
    "fp16": (torch.float16, "F16", np.float16),
    "fp32": (torch.float32, "F32", np.float32),
    "int8": (torch.int8, "I8", np.int8),
}
_SCALE_TAG = "F32"  # int8 scales are stored as fp32


class CorruptEntryError(ValueError):
    """An entry that cannot be used: torn, truncated, corrupted, foreign or of another layout."""


class ForeignEntryError(CorruptEntryError):
    """A well-formed entry written for another model fingerprint."""


# ---------------------------------------------------------------------------------------------
# encode


def _as_numpy_float(x: torch.Tensor, np_dtype: type) -> np.ndarray:
    """``x`` as a C-contiguous numpy array of ``np_dtype`` (fp16 or fp32).

    numpy casts: single-threaded, and on a busy 2-core machine several times faster than torch
    ops, whose intra-op threads mostly wait for a free core.
    """
    if x.dtype not in (torch.float16, torch.float32):  # bf16 & co: numpy has no such dtype
        x = x.float()
    return np.ascontiguousarray(x.numpy(), dtype=np_dtype)


def _quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 per (head, token). x: (H, T, D) -> q (H, T, D) int8, scale (H, T)."""
    values = _as_numpy_float(x, np.float32)
    scale = np.abs(values).max(axis=-1) / np.float32(_INT8_MAX)  # (H, T)
    scale[scale == 0] = 1.0  # all-zero rows: any scale works
    quantized = np.rint(values / scale[..., None])
    np.clip(quantized, -_INT8_MAX, _INT8_MAX, out=quantized)
    return torch.from_numpy(quantized.astype(np.int8)), torch.from_numpy(scale)


def _layer_tensors(kv: ChunkKV, index: int, codec: str) -> dict[str, torch.Tensor]:
    """The named tensors of one layer, in storage dtype, contiguous."""
    keys, values = kv.keys[index].detach().cpu(), kv.values[index].detach().cpu()  # (H, T, D)
    if codec == "int8":
        qk, sk = _quantize_int8(keys)
        qv, sv = _quantize_int8(values)
        return {f"k.{index}": qk, f"v.{index}": qv, f"ks.{index}": sk, f"vs.{index}": sv}
    torch_dtype, _, np_dtype = _STORAGE[codec]
    if keys.dtype == torch_dtype:
        return {f"k.{index}": keys.contiguous(), f"v.{index}": values.contiguous()}
    return {
        f"k.{index}": torch.from_numpy(_as_numpy_float(keys, np_dtype)),
        f"v.{index}": torch.from_numpy(_as_numpy_float(values, np_dtype)),
    }


def _layer_names(index: int, codec: str) -> tuple[str, ...]:
    names = (f"k.{index}", f"v.{index}")
    return names + (f"ks.{index}", f"vs.{index}") if codec == "int8" else names


def _header_checksum(metadata: dict[str, str]) -> str:
    fields = {k: v for k, v in metadata.items() if k != "header_checksum"}
    return xxhash.xxh3_128_hexdigest(json.dumps(fields, sort_keys=True).encode())


def encode(kv: ChunkKV, codec: str = DEFAULT_CODEC) -> bytes:
    """Serialize ``kv`` with ``codec`` ("fp16" default, "fp32" exact, "int8" ~half of fp16)."""
    if codec not in CODECS:
        raise ValueError(f"unknown KV codec {codec!r}; supported: {', '.join(CODECS)}")
    tensors: dict[str, torch.Tensor] = {}
    checksums = []
    for index in range(kv.num_layers):
        layer = _layer_tensors(kv, index, codec)
        digest = xxhash.xxh3_128()
        for name in _layer_names(index, codec):
            digest.update(layer[name].numpy())  # raw little-endian bytes, as stored in the file
        checksums.append(digest.hexdigest())
        tensors.update(layer)
    _, heads, tokens, head_dim = kv.keys.shape
    metadata = {
        "format": FORMAT,
        "codec": codec,
        "codec_version": str(CODEC_VERSION),
        "layout": KV_LAYOUT_VERSION,
        "model": str(kv.meta.get("model", "")),
        "layers": str(kv.num_layers),
        "kv_heads": str(heads),
        "tokens": str(tokens),
        "head_dim": str(head_dim),
        "dtype": str(_STORAGE[codec][0]).removeprefix("torch."),
        "meta": json.dumps(kv.meta, sort_keys=True, default=str),
        "checksum_algo": CHECKSUM_ALGO,
        "checksums": json.dumps(checksums),
    }
    metadata["header_checksum"] = _header_checksum(metadata)
    return safetensors_save(tensors, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# decode


def _int_field(metadata: dict[str, str], name: str) -> int:
    try:
        value = int(metadata[name])
    except (KeyError, ValueError) as exc:
        raise CorruptEntryError(f"bad header field {name!r}") from exc
    if value < 0:
        raise CorruptEntryError(f"negative header field {name!r}")
    return value


class EncodedChunkKV:
    """A lazily decoded entry with ChunkKV's read interface (``num_layers``, ``num_tokens``,
    ``meta``, ``layer(i)``), for layer-wise loading: construction validates the header and every
    tensor's shape, dtype and offsets (cheap); ``layer(i)`` verifies layer i's checksum, then
    decodes it. Raises ``CorruptEntryError`` (on construction or on ``layer(i)``).
    """

    def __init__(self, blob: bytes | bytearray | memoryview, expected_model: str | None = None):
        self._blob = blob
        self._verified: set[int] = set()
        if len(blob) < 8:
            raise CorruptEntryError(f"entry of {len(blob)} bytes is too short")
        header_len = int.from_bytes(bytes(blob[:8]), "little")
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > len(blob):
            raise CorruptEntryError("header length out of range (truncated entry?)")
        try:
            header = json.loads(bytes(blob[8 : 8 + header_len]))
        except ValueError as exc:  # bad UTF-8 or JSON
            raise CorruptEntryError(f"unreadable header: {exc}") from exc
        metadata = header.pop("__metadata__", None) if isinstance(header, dict) else None
        if not isinstance(metadata, dict):
            raise CorruptEntryError("header without metadata")
        self._data_start = 8 + header_len
        try:
            self._validate_metadata(metadata, expected_model)
            self._validate_tensors(header)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            if isinstance(exc, CorruptEntryError):
                raise
            # Bytes from disk or the network are untrusted: any surprise in them is corruption.
            raise CorruptEntryError(f"malformed header: {exc!r}") from exc

    def _validate_metadata(self, metadata: dict, expected_model: str | None) -> None:
        if metadata.get("format") != FORMAT:
            raise CorruptEntryError(f"not a {FORMAT} entry")
        if metadata.get("header_checksum") != _header_checksum(metadata):
            raise CorruptEntryError("header checksum mismatch")
        if metadata.get("codec_version") != str(CODEC_VERSION):
            raise CorruptEntryError(f"codec version {metadata.get('codec_version')!r} unsupported")
        if metadata.get("layout") != KV_LAYOUT_VERSION:
            raise CorruptEntryError(f"KV layout {metadata.get('layout')!r} != {KV_LAYOUT_VERSION}")
        if metadata.get("codec") not in CODECS:
            raise CorruptEntryError(f"unknown codec {metadata.get('codec')!r}")
        if metadata.get("checksum_algo") != CHECKSUM_ALGO:
            raise CorruptEntryError(f"unknown checksum {metadata.get('checksum_algo')!r}")
        self.codec: str = metadata["codec"]
        self.model: str = metadata.get("model", "")
        if expected_model is not None and self.model != expected_model:
            raise ForeignEntryError(f"entry of model {self.model!r}, expected {expected_model!r}")
        self.num_layers = _int_field(metadata, "layers")
        self.num_kv_heads = _int_field(metadata, "kv_heads")
        self.num_tokens = _int_field(metadata, "tokens")
        self.head_dim = _int_field(metadata, "head_dim")
        try:
            self.meta: dict = json.loads(metadata["meta"])
            self._checksums: list[str] = json.loads(metadata["checksums"])
        except (KeyError, ValueError) as exc:
            raise CorruptEntryError("bad meta or checksums field") from exc
        if not isinstance(self.meta, dict):
            raise CorruptEntryError("meta is not a JSON object")
        if not isinstance(self._checksums, list) or len(self._checksums) != self.num_layers:
            raise CorruptEntryError("checksum count != layer count")

    def _validate_tensors(self, header: dict) -> None:
        per_layer = 4 if self.codec == "int8" else 2
        if len(header) != per_layer * self.num_layers:  # before looping over num_layers
            raise CorruptEntryError("tensor count does not match the header's layer count")
        shape = [self.num_kv_heads, self.num_tokens, self.head_dim]
        expected: dict[str, tuple[str, list[int], type]] = {}
        _, tag, np_dtype = _STORAGE[self.codec]
        for index in range(self.num_layers):
            expected[f"k.{index}"] = expected[f"v.{index}"] = (tag, shape, np_dtype)
            if self.codec == "int8":
                expected[f"ks.{index}"] = expected[f"vs.{index}"] = (
                    _SCALE_TAG,
                    shape[:2],
                    np.float32,
                )
        if set(header) != set(expected):
            raise CorruptEntryError("tensor names do not match the header's layer count")
        self._spans: dict[str, tuple[int, int, type, list[int]]] = {}
        data_len = len(self._blob) - self._data_start
        end_max = 0
        for name, (tag, want_shape, np_dtype) in expected.items():
            info = header[name]
            if not isinstance(info, dict) or info.get("dtype") != tag:
                raise CorruptEntryError(f"tensor {name}: dtype {info!r}, expected {tag}")
            if info.get("shape") != want_shape:
                raise CorruptEntryError(f"tensor {name}: shape {info.get('shape')} != {want_shape}")
            begin, end = info.get("data_offsets", (None, None))
            nbytes = math.prod(want_shape) * np.dtype(np_dtype).itemsize
            if not (isinstance(begin, int) and isinstance(end, int)):
                raise CorruptEntryError(f"tensor {name}: bad offsets")
            if begin < 0 or end - begin != nbytes or end > data_len:
                raise CorruptEntryError(f"tensor {name}: offsets out of range (truncated entry?)")
            self._spans[name] = (self._data_start + begin, nbytes, np_dtype, want_shape)
            end_max = max(end_max, end)
        if end_max != data_len:
            raise CorruptEntryError(f"entry has {data_len - end_max} trailing bytes")

    @property
    def nbytes(self) -> int:
        """Encoded size in bytes."""
        return len(self._blob)

    def _array(self, name: str) -> np.ndarray:
        """Read-only numpy view of one stored tensor (no copy)."""
        offset, nbytes, np_dtype, shape = self._spans[name]
        count = nbytes // np.dtype(np_dtype).itemsize
        return np.frombuffer(self._blob, dtype=np_dtype, count=count, offset=offset).reshape(shape)

    def verify_layer(self, index: int) -> None:
        """Check layer ``index``'s checksum; raises ``CorruptEntryError``."""
        if index in self._verified:
            return
        if not 0 <= index < self.num_layers:
            raise IndexError(f"layer {index} of {self.num_layers}")
        digest = xxhash.xxh3_128()
        for name in _layer_names(index, self.codec):
            offset, nbytes, _, _ = self._spans[name]
            digest.update(memoryview(self._blob)[offset : offset + nbytes])
        if digest.hexdigest() != self._checksums[index]:
            raise CorruptEntryError(f"layer {index}: checksum mismatch")
        self._verified.add(index)

    def verify(self) -> None:
        """Check every layer's checksum; raises ``CorruptEntryError``."""
        for index in range(self.num_layers):
            self.verify_layer(index)

    def _decode_into(self, prefix: str, index: int, out: torch.Tensor) -> None:
        """Decode tensor ``{prefix}.{index}`` into ``out`` (H, T, D), fp16 or fp32.

        numpy does the casts: single-threaded, and on this CPU faster than torch's copy kernels.
        """
        stored = self._array(f"{prefix}.{index}")  # (H, T, D), a view of the blob
        target = out.numpy()
        if self.codec != "int8":
            target[...] = stored  # one copy (and cast) straight from the blob
            return
        scale = self._array(f"{prefix}s.{index}")[..., None]  # (H, T, 1)
        if target.dtype == np.float32:
            np.multiply(stored, scale, out=target)
        else:
            target[...] = stored * scale

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of one layer as fp32, each (num_kv_heads, num_tokens, head_dim), verified."""
        self.verify_layer(index)
        shape = (self.num_kv_heads, self.num_tokens, self.head_dim)
        keys, values = torch.empty(shape), torch.empty(shape)
        self._decode_into("k", index, keys)
        self._decode_into("v", index, values)
        return keys, values

    def to_chunk(self) -> ChunkKV:
        """The whole entry as a verified ``ChunkKV``: fp32 for the fp32 codec, fp16 otherwise."""
        dtype = torch.float32 if self.codec == "fp32" else torch.float16
        shape = (self.num_layers, self.num_kv_heads, self.num_tokens, self.head_dim)
        keys, values = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
        for index in range(self.num_layers):
            self.verify_layer(index)
            self._decode_into("k", index, keys[index])
            self._decode_into("v", index, values[index])
        meta = dict(self.meta)
        meta.setdefault("model", self.model)
        return ChunkKV(keys, values, meta)


def decode(blob: bytes | bytearray | memoryview, expected_model: str | None = None) -> ChunkKV:
    """Verify and decode a whole entry; raises ``CorruptEntryError``."""
    return EncodedChunkKV(blob, expected_model).to_chunk()


def decode_layer(
    blob: bytes | bytearray | memoryview, index: int, expected_model: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify and decode one layer as fp32 (K, V); raises ``CorruptEntryError``."""
    return EncodedChunkKV(blob, expected_model).layer(index)


def verify(blob: bytes | bytearray | memoryview, expected_model: str | None = None) -> None:
    """Check the header, shapes and every layer's checksum; raises ``CorruptEntryError``."""
    EncodedChunkKV(blob, expected_model).verify()
