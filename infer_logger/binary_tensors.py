"""The Open Inference Protocol's binary tensor data extension (HTTP/REST), as Triton and KServe speak it.

A body is a JSON part followed by the raw bytes of some tensors, in the order the tensors appear in
it; the `Inference-Header-Content-Length` header gives the JSON part's length, and each binary
tensor says `"parameters": {"binary_data_size": <bytes>}` instead of carrying `data`. Requests and
responses share the layout (`inputs` or `outputs`). Elements are little-endian, row-major, unpadded;
BOOL is one byte; a BYTES element is a 4-byte little-endian length and then its bytes; BF16 (Triton's
bfloat16, named but not listed by the spec) is an FP32's high 16 bits.

    doc, raw = decode(body, headers.get(HEADER), "inputs")     # raw: tensor name -> its bytes
    body, headers = encode(doc, "outputs", {"predict": array})  # any contiguous buffer

Pure Python (numpy users read `raw[name]` with `np.frombuffer(..., NUMPY_DTYPES[datatype])`; BF16,
which numpy lacks, as `<u2` shifted left 16 bits and viewed as float32), so the sidecar could use it
too; every malformed body raises `BinaryDataError` naming the tensor.
"""

from __future__ import annotations

import base64
import json
import struct
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from math import isnan, prod
from typing import Any

import orjson

from infer_logger.errors import BinaryDataError

HEADER = "inference-header-content-length"
_JSON_PART_MAX = 1 << 20  # bytes of a body searched for the end of its JSON part
CONTENT_TYPE = "application/octet-stream"

# struct codes, little-endian: element size and pure-Python (un)packing.
_CODES = {
    "BOOL": "?", "INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q",
    "UINT8": "B", "UINT16": "H", "UINT32": "I", "UINT64": "Q", "FP16": "e", "FP32": "f", "FP64": "d",
}
ITEMSIZE = {**{datatype: struct.calcsize("<" + code) for datatype, code in _CODES.items()}, "BF16": 2}
"""Bytes per element of each fixed-size datatype (BYTES elements have their own lengths)."""
NUMPY_DTYPES = {
    "BOOL": "|b1", "INT8": "|i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "UINT8": "|u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}
"""numpy dtype strings of the fixed-size datatypes (explicitly little-endian, as on the wire); BF16
has none."""
DATATYPES = (*ITEMSIZE, "BYTES")
_LENGTH = struct.Struct("<I")


def decode(body: bytes, header_length: str | int | None, key: str,
           max_values: int | None = None) -> tuple[dict[str, Any], dict[str, memoryview]]:
    """The JSON part of `body` and, by tensor name, the bytes of every `key` tensor sent as binary data.

    `header_length` is the `Inference-Header-Content-Length` header; without it the body must be
    all JSON (and then no tensor may claim binary data). A binary tensor of more than `max_values`
    values is refused before its BYTES elements are counted (millions took seconds).
    """
    view = memoryview(body)
    if header_length is None:
        doc = _json(body, "the body")
        end = len(body)
    else:
        end = _length(header_length, len(body))
        doc = _json(view[:end], f"the JSON part (the first {end} bytes)")
    tensors = doc.get(key)
    if tensors is None:
        tensors = []
    if not isinstance(tensors, list):
        raise BinaryDataError(None, f"`{key}` must be a list of tensors")
    raw: dict[str, memoryview] = {}
    offset = end
    for i, tensor in enumerate(tensors):
        if not isinstance(tensor, Mapping):
            continue  # not a tensor: the caller's check names it
        name = tensor_name(tensor, key, i)
        size = _binary_size(tensor, name)
        if size is None:
            continue
        if header_length is None:
            raise BinaryDataError(name, f"has binary_data_size but the {HEADER} header is missing, "
                                        "so the body's JSON part has no known end")
        if "data" in tensor:
            raise BinaryDataError(name, "has both `data` and binary_data_size")
        if name in raw:
            raise BinaryDataError(name, f"is named twice in `{key}`")
        datatype, shape = _datatype(tensor, name), _shape(tensor, name)
        if size > len(body) - offset:
            raise BinaryDataError(name, f"binary_data_size {size} runs past the end of the body "
                                        f"({len(body) - offset} bytes left)")
        chunk = view[offset:offset + size]
        if max_values is not None and prod(shape) > max_values:
            raise BinaryDataError(name, f"{prod(shape)} values; at most {max_values} per request")
        _check_size(name, datatype, shape, chunk)
        raw[name] = chunk
        offset += size
    if raw:  # filed by name: another tensor of a binary one's name would be read as having its bytes
        names = Counter(tensor_name(t, key, i) for i, t in enumerate(tensors) if isinstance(t, Mapping))
        if twice := next((name for name in raw if names[name] > 1), None):
            raise BinaryDataError(twice, f"is named twice in `{key}`")
    if offset != len(body):
        what = "the JSON part" if not raw else "the last binary tensor"
        raise BinaryDataError(None, f"{len(body) - offset} bytes after {what} belong to no tensor "
                                    f"(the sum of binary_data_size is {offset - end})")
    return doc, raw


def encode(doc: Mapping[str, Any], key: str, binary: Mapping[str, Any], *,
           option: int = 0) -> tuple[bytes, dict[str, str]]:
    """`doc` as a body whose `key` tensors named in `binary` travel as raw bytes, and its headers.

    `binary` maps tensor names to their bytes (bytes, memoryview, a C-contiguous array); those
    tensors lose `data` and gain `binary_data_size`. Without binary tensors the body is plain JSON.
    `option` is passed to orjson (e.g. `OPT_SERIALIZE_NUMPY` for arrays left in `data`).
    """
    parts, headers = encode_parts(doc, key, binary, option=option)
    return b"".join(parts), headers


def encode_parts(doc: Mapping[str, Any], key: str, binary: Mapping[str, Any], *,
                 option: int = 0) -> tuple[list[bytes | memoryview], dict[str, str]]:
    """`encode`'s body as its parts, the JSON part first, then each tensor's buffer as given: for a
    writer that sends them one after another, so that big tensors are not copied into one body."""
    chunks: list[memoryview] = []
    tensors = []
    for tensor in doc.get(key) or []:
        name = tensor.get("name")
        if name not in binary:
            tensors.append(tensor)
            continue
        chunk = memoryview(binary[name])
        if not chunk.c_contiguous or chunk.format[:1] in (">", "!"):
            raise BinaryDataError(name, "binary data must be one contiguous little-endian buffer")
        chunk = chunk.cast("B") if chunk.format != "B" or chunk.ndim != 1 else chunk
        _check_size(name, _datatype(tensor, name), _shape(tensor, name), chunk)
        tensor = {k: v for k, v in tensor.items() if k != "data"}
        tensor["parameters"] = {**(tensor.get("parameters") or {}), "binary_data_size": chunk.nbytes}
        tensors.append(tensor)
        chunks.append(chunk)
    missing = set(binary) - {t.get("name") for t in tensors}
    if missing:
        raise BinaryDataError(min(missing), f"has binary data but is not in `{key}`")
    if not chunks:
        return [orjson.dumps(doc, option=option)], {"content-type": "application/json"}
    head = orjson.dumps({**doc, key: tensors}, option=option)
    return [head, *chunks], {"content-type": CONTENT_TYPE, HEADER: str(len(head))}


class Inlined(dict[str, Any]):
    """`inline`'s result, told apart from a JSON body by its type: only it may hold NaN and
    infinities (FP data; JSON has none, orjson refuses them), which a store must look for."""


def inline(body: bytes) -> Inlined | None:
    """A binary-data body read without its header (a logged payload keeps no HTTP headers): its
    JSON part with every binary tensor's `data` filled in, flat and row-major, as JSON mode would
    carry it; BYTES elements as text when UTF-8, else `{"base64": ...}`. None when `body` is not one.
    """
    try:
        return _inline(body)
    except BinaryDataError:
        return None


def json_part(body: bytes) -> tuple[int, str] | None:
    """Where a binary-data body's JSON part ends, found without its header (a logged payload
    keeps none), and its tensors' key (`inputs`, else `outputs`); None when `body` is not one."""
    if not body.startswith(b"{"):
        return None
    # The JSON part ends where a JSON object starting at byte 0 ends: latin-1 maps bytes to
    # characters one to one, so the decoder's end index is the byte length.
    text = body[:_JSON_PART_MAX].decode("latin-1")
    try:
        _, end = json.JSONDecoder().raw_decode(text)
    except (ValueError, RecursionError):  # nested past Python's recursion limit: not one either
        return None
    try:
        probe = _json(memoryview(body)[:end], "the JSON part")
    except BinaryDataError:  # not UTF-8 JSON: no binary-data body
        return None
    if not carries_binary(probe):  # JSON and stray bytes after it: no tensor data
        return None
    return end, "inputs" if "inputs" in probe else "outputs"


def _inline(body: bytes) -> Inlined | None:
    """`inline`, but a body with a JSON part whose binary tensors do not read (an unknown datatype,
    sizes that do not add up) raises BinaryDataError saying why; None when it has no JSON part."""
    if (found := json_part(body)) is None:
        return None
    end, key = found
    doc, raw = decode(body, end, key)
    tensors = []
    for index, tensor in enumerate(doc.get(key) or []):
        name = tensor_name(tensor, key, index) if isinstance(tensor, Mapping) else None
        if name not in raw:
            tensors.append(tensor)
            continue
        datatype = _datatype(tensor, name)
        values = unpack_values(datatype, raw[name])
        if datatype == "BYTES":
            values = [_text_or_base64(v) for v in values]
        params = {k: v for k, v in (tensor.get("parameters") or {}).items() if k != "binary_data_size"}
        tensor = {**{k: v for k, v in tensor.items() if k != "parameters"}, "data": values}
        if params:
            tensor["parameters"] = params
        tensors.append(tensor)
    return Inlined({**doc, key: tensors})


def carries_binary(doc: object) -> bool:
    """Whether a body that parsed as JSON says its tensors' data follows in binary: a binary part
    of blanks only (INT8 9, 10, 13 or 32, a zero-size tensor) is JSON's trailing whitespace."""
    if not isinstance(doc, dict):
        return False
    for key in ("inputs", "outputs"):
        tensors = doc.get(key)
        if isinstance(tensors, list) and any(
            isinstance(t, Mapping) and isinstance(t.get("parameters"), Mapping) and "binary_data_size" in t["parameters"]
            for t in tensors
        ):
            return True
    return False


def _text_or_base64(value: bytes) -> str | dict[str, str]:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(value).decode()}


def wants_binary(request: Mapping[str, Any], output: str) -> bool:
    """Whether `request` asks for `output` as binary data: its own `binary_data`, else the request's
    `binary_data_output`. An `outputs` that is not a list names none."""
    outputs = request.get("outputs")
    for wanted in outputs if isinstance(outputs, list) else ():
        if isinstance(wanted, Mapping) and wanted.get("name") == output:
            params = wanted.get("parameters")
            if isinstance(params, Mapping) and "binary_data" in params:
                return bool(params["binary_data"])
            break
    params = request.get("parameters")
    return isinstance(params, Mapping) and bool(params.get("binary_data_output", False))


def pack_values(datatype: str, values: Iterable[Any]) -> bytes:
    """Flat values as a tensor's binary data (BYTES elements: bytes, or str as UTF-8)."""
    if datatype == "BYTES":
        parts = []
        for value in values:
            item = value.encode() if isinstance(value, str) else bytes(value)
            parts += [_LENGTH.pack(len(item)), item]
        return b"".join(parts)
    items = list(values)
    try:
        if datatype == "BF16":
            return struct.pack(f"<{len(items)}H", *map(_bf16_bits, items))
        return struct.pack(f"<{len(items)}{_CODES[datatype]}", *items)
    except KeyError:
        raise BinaryDataError(None, _unknown(datatype)) from None
    except (struct.error, OverflowError) as exc:  # OverflowError: a float past FP16's or FP32's range
        raise BinaryDataError(None, f"values do not fit {datatype}: {exc}") from None


def unpack_values(datatype: str, raw: bytes | memoryview) -> list[Any]:
    """A tensor's binary data as a flat list (BYTES elements as bytes)."""
    if datatype == "BYTES":
        return _bytes_elements(raw, None)
    if datatype not in ITEMSIZE:
        raise BinaryDataError(None, _unknown(datatype))
    count, rest = divmod(len(raw), ITEMSIZE[datatype])
    if rest:
        raise BinaryDataError(None, f"{len(raw)} bytes are not a whole number of {datatype} elements")
    if datatype == "BF16":  # each element the high half of a little-endian FP32, its low half zeros
        wide = bytearray(4 * count)
        wide[2::4], wide[3::4] = bytes(raw[0::2]), bytes(raw[1::2])
        return list(struct.unpack(f"<{count}f", wide))
    return list(struct.unpack(f"<{count}{_CODES[datatype]}", raw))


def _bf16_bits(value: float) -> int:
    """`value` as BF16, rounded to the nearest even as FP16 and FP32 are (by way of FP32)."""
    (bits,) = struct.unpack("<I", struct.pack("<f", value))
    if isnan(value):  # NaN: rounding its payload up could carry into infinity or the sign
        return bits >> 16 | 0x0040
    rounded: int = (bits + 0x7FFF + (bits >> 16 & 1)) >> 16
    if rounded & 0x7FFF == 0x7F80 and bits & 0x7FFFFFFF != 0x7F800000:
        raise OverflowError("float too large to pack as BF16")  # as struct does for FP16
    return rounded


# -- checks ----------------------------------------------------------------------------------------


def _json(part: bytes | memoryview, what: str) -> dict[str, Any]:
    try:
        doc = orjson.loads(part)
    except orjson.JSONDecodeError as exc:
        hint = "" if what != "the body" else f" (binary tensor data needs the {HEADER} header)"
        raise BinaryDataError(None, f"{what} is not JSON{hint}: {exc}") from None
    if not isinstance(doc, dict):
        raise BinaryDataError(None, f"{what} is not a JSON object")
    return doc


def _length(header: str | int, available: int) -> int:
    # Digits only (around them the blanks a field value may have), as HTTP writes numbers: int()
    # also takes "+100" and "1_00".
    if isinstance(header, str):
        header = header.strip(" \t")
        if not (header.isascii() and header.isdigit()):
            raise BinaryDataError(None, f"{HEADER}: {header!r} is not a byte count")
        header = header.lstrip("0") or "0"
        if len(header) > 20:  # int() refuses past 4300 digits (a ValueError: a 500)
            raise BinaryDataError(None, f"{HEADER} says the JSON part has a {len(header)}-digit byte count, "
                                        f"but the body has only {available} bytes")
    length = int(header)
    if length <= 0:
        raise BinaryDataError(None, f"{HEADER}: {length} is not a length of a JSON part")
    if length > available:
        raise BinaryDataError(None, f"{HEADER} says the JSON part has {length} bytes, "
                                    f"but the body has only {available}")
    return length


def _binary_size(tensor: Mapping[str, Any], name: str) -> int | None:
    params = tensor.get("parameters")
    if not isinstance(params, Mapping) or "binary_data_size" not in params:
        return None
    size = params["binary_data_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BinaryDataError(name, f"binary_data_size {size!r} is not a byte count")
    return size


def tensor_name(tensor: Mapping[str, Any], key: str, index: int) -> str:
    """The name `decode` files a tensor's bytes under: its `name`, or `<key>[<index>]` without one."""
    name = tensor.get("name")
    return name if isinstance(name, str) else f"{key}[{index}]"


def _datatype(tensor: Mapping[str, Any], name: str) -> str:
    datatype = tensor.get("datatype")
    if datatype not in DATATYPES:
        raise BinaryDataError(name, _unknown(datatype))
    return str(datatype)


def _unknown(datatype: Any) -> str:
    return f"datatype {datatype!r} is not one of {', '.join(DATATYPES)}"


def _shape(tensor: Mapping[str, Any], name: str) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise BinaryDataError(name, f"shape {shape!r} is not a list of sizes")
    return shape


def _check_size(name: str, datatype: str, shape: Sequence[int], chunk: memoryview) -> None:
    count = prod(shape)
    if datatype == "BYTES":
        found = len(_bytes_elements(chunk, name))
        if found != count:
            raise BinaryDataError(name, f"{found} BYTES elements for shape {list(shape)} ({count} expected)")
    elif chunk.nbytes != count * ITEMSIZE[datatype]:
        raise BinaryDataError(name, f"{chunk.nbytes} bytes of {datatype} for shape {list(shape)} "
                                    f"({count * ITEMSIZE[datatype]} expected)")


def _bytes_elements(raw: bytes | memoryview, name: str | None) -> list[bytes]:
    view, offset = memoryview(raw), 0
    items: list[bytes] = []
    while offset < len(view):
        if offset + 4 > len(view):
            raise BinaryDataError(name, f"BYTES element {len(items)}: its 4-byte length is cut short")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise BinaryDataError(name, f"BYTES element {len(items)}: {length} bytes announced, "
                                        f"{len(view) - offset} left")
        items.append(bytes(view[offset:offset + length]))
        offset += length
    return items
