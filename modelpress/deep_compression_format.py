"""The `deep_compression` artifact: a weights-only container with Han et al.'s Huffman stage.

Deep Compression (Han et al., ICLR 2016) stores a pruned, weight-shared layer as a
small codebook, one cluster code per nonzero weight and a relative sparse index,
and Huffman-codes the codes and the index. This module reads and writes that as a
plain byte file; it holds no pickles and no code, and needs only NumPy (torch only
for `load_state_dict`). Copy this file into your project to read ModelPress
artifacts without ModelPress:

    from deep_compression_format import load_state_dict
    model = MyNet()                                   # your architecture
    model.load_state_dict(load_state_dict("model.mpdc"))

Layout (little-endian):

    b"MPDC" | u8 version (1) | u32 n | n bytes of UTF-8 JSON header | payload

The header is {"tensors": [entry, ...]}; each entry names a tensor, its shape and
its `kind`, and lists the byte lengths of its blobs in `blobs`, which follow one
another in the payload in entry order:

- kind "raw": one blob, the tensor's bytes in `dtype` (floats that fp16 holds
  exactly are stored as fp16; the decoder returns float32 for them).
- kind "codebook" (a weight with at most 256 distinct nonzero values): blobs
  [codebook, code lengths, codes, index lengths, index]. `codebook` holds the
  distinct nonzero values in `codebook_dtype`; `codes` is the Huffman-coded cluster
  code of each of the `nnz` nonzeros (row-major order); `index` is the
  Huffman-coded relative index: the gap from the previous nonzero (from position
  -1), where a gap longer than `span` is written as filler 0 entries that each
  advance `span` positions without a weight. A "lengths" blob is a canonical
  Huffman table: the code length (0 = unused) of each symbol, 4 bits each, low
  nibble first. Streams are read most significant bit first.
"""

from __future__ import annotations

import heapq
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MAGIC", "decode", "describe", "encode", "load_state_dict"]

MAGIC = b"MPDC"
VERSION = 1
MAX_CODE_LENGTH = 15  # code lengths are stored as nibbles
MAX_CLUSTERS = 256
INDEX_SPAN_BITS = range(2, 9)  # spans 3 .. 255 are tried; the smallest encoding wins


# ---------------------------------------------------------------- decoding (what users need)


def load_state_dict(path: str | Path) -> dict[str, Any]:
    """Read a deep_compression file into torch tensors for `model.load_state_dict`."""
    import torch

    with open(path, "rb") as handle:
        arrays = decode(handle.read())
    return {name: torch.from_numpy(array) for name, array in arrays.items()}


def decode(data: bytes) -> dict[str, np.ndarray]:
    """Decode a deep_compression file's bytes into name -> dense NumPy array."""
    if data[:4] != MAGIC or data[4] != VERSION:
        raise ValueError("not a deep_compression (MPDC version 1) file")
    (header_length,) = struct.unpack_from("<I", data, 5)
    header = json.loads(data[9 : 9 + header_length].decode("utf-8"))
    offset = 9 + header_length
    arrays: dict[str, np.ndarray] = {}
    for entry in header["tensors"]:
        blobs = []
        for length in entry["blobs"]:
            blobs.append(data[offset : offset + length])
            offset += length
        shape = tuple(entry["shape"])
        if entry["kind"] == "raw":
            array = np.frombuffer(blobs[0], dtype=np.dtype(entry["dtype"]).newbyteorder("<")).reshape(shape)
            arrays[entry["name"]] = array.astype(np.float32) if array.dtype == np.float16 else array.copy()
        elif entry["kind"] == "codebook":
            arrays[entry["name"]] = _decode_codebook(entry, blobs).reshape(shape)
        else:
            raise ValueError(f"unknown tensor kind {entry['kind']!r}")
    if offset != len(data):
        raise ValueError(f"{len(data) - offset} trailing bytes: the file is corrupt")
    return arrays


def _decode_codebook(entry: dict[str, Any], blobs: list[bytes]) -> np.ndarray:
    codebook = np.frombuffer(blobs[0], dtype=np.dtype(entry["codebook_dtype"]).newbyteorder("<")).astype(np.float32)
    codes = huffman_decode(blobs[1], blobs[2], len(codebook), entry["nnz"])
    span = entry["span"]
    index = huffman_decode(blobs[3], blobs[4], span + 1, entry["index_count"])
    steps = np.where(index == 0, span, index).astype(np.int64)
    positions = (np.cumsum(steps) - 1)[index != 0]
    weight = np.zeros(int(np.prod(entry["shape"], dtype=np.int64)), dtype=np.float32)
    weight[positions] = codebook[codes]
    return weight


def huffman_decode(table: bytes, stream: bytes, alphabet: int, count: int) -> np.ndarray:
    """Decode `count` symbols of a canonical Huffman `stream` whose code lengths `table` holds."""
    lengths = _unpack_nibbles(table, alphabet)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    width = int(lengths.max())
    codes = _canonical_codes(lengths)
    # lookup[w] for every `width`-bit window w: the symbol whose code prefixes it, and that code's length
    lookup_symbol = np.zeros(1 << width, dtype=np.int64)
    lookup_length = np.zeros(1 << width, dtype=np.int64)
    for symbol in np.nonzero(lengths)[0]:
        length = int(lengths[symbol])
        start = int(codes[symbol]) << (width - length)
        lookup_symbol[start : start + (1 << (width - length))] = symbol
        lookup_length[start : start + (1 << (width - length))] = length
    bits = np.concatenate([np.unpackbits(np.frombuffer(stream, dtype=np.uint8)), np.zeros(width, dtype=np.uint8)])
    # the `width`-bit window starting at every bit position, computed at once
    windows = np.zeros(len(bits) - width, dtype=np.int64)
    for shift in range(width):
        windows = (windows << 1) | bits[shift : shift + len(windows)]
    window_list, symbol_list, length_list = windows.tolist(), lookup_symbol.tolist(), lookup_length.tolist()
    out = [0] * count
    position = 0
    for i in range(count):  # a symbol's start depends on the previous one: this walk is sequential
        window = window_list[position]
        out[i] = symbol_list[window]
        position += length_list[window]
    if position > len(bits) - width:
        raise ValueError("Huffman stream is shorter than its symbol count: the file is corrupt")
    return np.asarray(out, dtype=np.int64)


def _canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical Huffman: codes assigned in (length, symbol) order, as DEFLATE does."""
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, previous = 0, 0
    for symbol in sorted(np.nonzero(lengths)[0].tolist(), key=lambda s: (int(lengths[s]), s)):
        code <<= int(lengths[symbol]) - previous
        previous = int(lengths[symbol])
        codes[symbol] = code
        code += 1
    return codes


def _unpack_nibbles(table: bytes, count: int) -> np.ndarray:
    raw = np.frombuffer(table, dtype=np.uint8)
    return np.stack([raw & 0x0F, raw >> 4], axis=1).flatten()[:count].astype(np.int64)


# ---------------------------------------------------------------- encoding


def encode(state: Mapping[str, np.ndarray]) -> tuple[bytes, list[dict[str, Any]]]:
    """Encode name -> array losslessly; returns (file bytes, one figures dict per tensor).

    A floating-point weight (2+ dims) with at most 256 distinct nonzero values is
    stored as a Huffman-coded codebook whenever that is smaller than raw; every other
    tensor is stored raw, as fp16 where fp16 holds its values exactly.
    """
    entries: list[dict[str, Any]] = []
    payload: list[bytes] = []
    figures: list[dict[str, Any]] = []
    for name, array in state.items():
        array = np.ascontiguousarray(array)
        raw_dtype = _raw_dtype(array)
        raw = array.astype(raw_dtype).astype(raw_dtype.newbyteorder("<")).tobytes()
        entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "kind": "raw", "dtype": raw_dtype.str[1:]}
        blobs = [raw]
        coded = _encode_codebook(array) if array.dtype.kind == "f" and array.ndim >= 2 else None
        if coded is not None and sum(map(len, coded[1])) < len(raw):
            entry, blobs = {"name": name, "shape": list(array.shape), **coded[0]}, coded[1]
        entry["blobs"] = [len(b) for b in blobs]
        entries.append(entry)
        payload.extend(blobs)
        figures.append(_figures(entry))
    header = json.dumps({"tensors": entries}, separators=(",", ":")).encode("utf-8")
    return MAGIC + bytes([VERSION]) + struct.pack("<I", len(header)) + header + b"".join(payload), figures


def _raw_dtype(array: np.ndarray) -> np.dtype:
    if array.dtype.kind == "f" and np.array_equal(array.astype(np.float16).astype(array.dtype), array, equal_nan=True):
        return np.dtype(np.float16)
    return array.dtype


def _encode_codebook(array: np.ndarray) -> tuple[dict[str, Any], list[bytes]] | None:
    flat = array.reshape(-1)
    positions = np.flatnonzero(flat)
    values = flat[positions]
    codebook, codes = np.unique(values, return_inverse=True)
    if len(codebook) > MAX_CLUSTERS or len(codebook) == 0:
        return None
    codebook_dtype = _raw_dtype(codebook)
    code_table, code_stream = huffman_encode(codes.reshape(-1), len(codebook))
    gaps = np.diff(positions, prepend=-1)
    best: tuple[int, int, np.ndarray, bytes, bytes] | None = None
    for span_bits in INDEX_SPAN_BITS:
        span = (1 << span_bits) - 1
        index = _relative_index(gaps, span)
        table, stream = huffman_encode(index, span + 1)
        if best is None or len(table) + len(stream) < len(best[3]) + len(best[4]):
            best = (span, len(index), index, table, stream)
    assert best is not None
    span, index_count, _, index_table, index_stream = best
    entry = {
        "kind": "codebook",
        "codebook_dtype": codebook_dtype.str[1:],
        "nnz": int(len(positions)),
        "span": span,
        "index_count": index_count,
    }
    blobs = [
        codebook.astype(codebook_dtype).astype(codebook_dtype.newbyteorder("<")).tobytes(),
        code_table,
        code_stream,
        index_table,
        index_stream,
    ]
    return entry, blobs


def _relative_index(gaps: np.ndarray, span: int) -> np.ndarray:
    fillers = (gaps - 1) // span
    remainders = gaps - fillers * span
    lengths = fillers + 1
    index = np.zeros(int(lengths.sum()), dtype=np.int64)
    index[np.cumsum(lengths) - 1] = remainders
    return index


def huffman_encode(symbols: np.ndarray, alphabet: int) -> tuple[bytes, bytes]:
    """Canonical Huffman code of `symbols` (ints in [0, alphabet)); returns (length table, stream)."""
    counts = np.bincount(symbols, minlength=alphabet)[:alphabet] if len(symbols) else np.zeros(alphabet, np.int64)
    lengths = _code_lengths(counts)
    table_nibbles = np.zeros(alphabet + (alphabet % 2), dtype=np.uint8)
    table_nibbles[:alphabet] = lengths
    table = (table_nibbles[0::2] | (table_nibbles[1::2] << 4)).astype(np.uint8).tobytes()
    if len(symbols) == 0:
        return table, b""
    codes = _canonical_codes(lengths)
    symbol_lengths, symbol_codes = lengths[symbols], codes[symbols]
    starts = np.cumsum(symbol_lengths) - symbol_lengths
    owner = np.repeat(np.arange(len(symbols)), symbol_lengths)
    bit_in_code = np.arange(int(symbol_lengths.sum())) - starts[owner]
    bits = (symbol_codes[owner] >> (symbol_lengths[owner] - 1 - bit_in_code)) & 1
    return table, np.packbits(bits.astype(np.uint8)).tobytes()


def _code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code lengths, at most MAX_CODE_LENGTH: rare symbols' counts are raised until they fit."""
    lengths = np.zeros(len(counts), dtype=np.int64)
    used = np.nonzero(counts)[0]
    if len(used) == 1:
        lengths[used] = 1
        return lengths
    weights = counts.astype(np.float64)
    while True:
        lengths[:] = 0
        heap = [(float(weights[s]), int(s), [int(s)]) for s in used]
        heapq.heapify(heap)
        while len(heap) > 1:
            w1, t1, s1 = heapq.heappop(heap)
            w2, t2, s2 = heapq.heappop(heap)
            for s in s1 + s2:
                lengths[s] += 1
            heapq.heappush(heap, (w1 + w2, min(t1, t2), s1 + s2))
        if lengths.max() <= MAX_CODE_LENGTH:
            return lengths
        weights[used] = np.maximum(weights[used], weights[used].max() / 2 ** (MAX_CODE_LENGTH - 2))


def describe(data: bytes) -> dict[str, Any]:
    """What a file holds: per tensor its kind, bytes and bits; and bits per weight over the whole file."""
    if data[:4] != MAGIC or data[4] != VERSION:
        raise ValueError("not a deep_compression (MPDC version 1) file")
    (header_length,) = struct.unpack_from("<I", data, 5)
    rows = [_figures(entry) for entry in json.loads(data[9 : 9 + header_length].decode("utf-8"))["tensors"]]
    elements = sum(row["elements"] for row in rows)
    coded = [row for row in rows if row["kind"] == "codebook"]
    nnz = sum(row["nnz"] for row in coded)
    return {
        "bytes": len(data),
        "header_bytes": 9 + header_length,
        "elements": elements,
        "bits_per_weight": round(8 * len(data) / max(1, elements), 4),
        "coded_bits_per_nonzero": round(8 * sum(row["bytes"] for row in coded) / max(1, nnz), 4),
        "tensors": rows,
    }


def _figures(entry: dict[str, Any]) -> dict[str, Any]:
    blobs = entry["blobs"]
    size = int(np.prod(entry["shape"], dtype=np.int64))
    row: dict[str, Any] = {"name": entry["name"], "kind": entry["kind"], "elements": size, "bytes": int(sum(blobs))}
    if entry["kind"] == "codebook":
        nnz = max(1, entry["nnz"])
        row.update(
            nnz=entry["nnz"],
            clusters=blobs[0] // np.dtype(entry["codebook_dtype"]).itemsize,
            index_span=entry["span"],
            code_bits_per_nonzero=round(8 * blobs[2] / nnz, 3),
            index_bits_per_nonzero=round(8 * blobs[4] / nnz, 3),
            bits_per_weight=round(8 * sum(blobs) / max(1, size), 4),
        )
    else:
        row["dtype"] = entry["dtype"]
    return row
