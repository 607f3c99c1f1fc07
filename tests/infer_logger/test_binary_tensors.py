"""The binary tensor data extension: round trips of every datatype, requested outputs, malformed bodies."""

from __future__ import annotations

from math import isnan
from typing import Any

import numpy as np
import orjson
import pytest

from infer_logger import binary_tensors as bt
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.errors import BinaryDataError

SAMPLES: dict[str, list[Any]] = {
    "BOOL": [True, False, True, True],
    "INT8": [-128, 0, 1, 127], "INT16": [-32768, -1, 2, 32767],
    "INT32": [-2**31, -1, 3, 2**31 - 1], "INT64": [-2**63, -1, 4, 2**63 - 1],
    "UINT8": [0, 1, 200, 255], "UINT16": [0, 1, 40000, 65535],
    "UINT32": [0, 1, 3_000_000_000, 2**32 - 1], "UINT64": [0, 1, 2**63, 2**64 - 1],
    "FP16": [0.0, -1.5, 65504.0, 0.000244140625], "FP32": [0.0, -1.5, 3.25, 2.0**100],
    "FP64": [0.0, -1.5, 1e-300, 1.7976931348623157e308],
    "BF16": [1.0, -2.5, 3.140625, 2.0**-133],  # no numpy dtype: the high half of an FP32
    "BYTES": [b"", b"cat", "d\u00f6g".encode(), b"\x00\xff"],
}


def request(datatype: str, shape: list[int], **extra: Any) -> dict[str, Any]:
    return {"id": "42", "inputs": [{"name": "x", "shape": shape, "datatype": datatype, **extra}]}


class TestRoundTrip:
    """What encode writes, decode reads back: every datatype, in pure Python and through numpy."""

    @pytest.mark.parametrize("datatype", list(SAMPLES))
    def test_every_datatype(self, datatype: str) -> None:
        values = SAMPLES[datatype]
        raw = {"x": bt.pack_values(datatype, values)}
        body, headers = bt.encode(request(datatype, [2, 2]), "inputs", raw)
        assert headers["content-type"] == bt.CONTENT_TYPE
        doc, raw = bt.decode(body, headers[bt.HEADER], "inputs")
        assert doc["id"] == "42" and "data" not in doc["inputs"][0]
        assert doc["inputs"][0]["parameters"]["binary_data_size"] == len(raw["x"])
        assert bt.unpack_values(datatype, raw["x"]) == values

    @pytest.mark.parametrize("datatype", [d for d in SAMPLES if d in bt.NUMPY_DTYPES])
    def test_numpy_arrays_on_the_wire(self, datatype: str) -> None:
        array = np.array(SAMPLES[datatype], dtype=bt.NUMPY_DTYPES[datatype]).reshape(2, 2)
        body, headers = bt.encode(request(datatype, [2, 2]), "inputs", {"x": array})
        _, raw = bt.decode(body, headers[bt.HEADER], "inputs")
        assert raw["x"].nbytes == array.size * bt.ITEMSIZE[datatype]
        np.testing.assert_array_equal(np.frombuffer(raw["x"], bt.NUMPY_DTYPES[datatype]).reshape(2, 2), array)
        assert bt.pack_values(datatype, SAMPLES[datatype]) == array.tobytes()  # little-endian, row-major

    def test_json_and_binary_tensors_mixed_in_order(self) -> None:
        doc = {"outputs": [
            {"name": "a", "shape": [2], "datatype": "FP64"},
            {"name": "j", "shape": [1], "datatype": "INT32", "data": [7]},
            {"name": "b", "shape": [3], "datatype": "UINT8"},
        ]}
        body, headers = bt.encode(doc, "outputs", {"a": np.array([1.0, 2.0]), "b": b"\x01\x02\x03"})
        out, raw = bt.decode(body, int(headers[bt.HEADER]), "outputs")
        assert [t["name"] for t in out["outputs"]] == ["a", "j", "b"] and out["outputs"][1]["data"] == [7]
        assert bytes(raw["b"]) == b"\x01\x02\x03"
        assert body.endswith(np.array([1.0, 2.0]).tobytes() + b"\x01\x02\x03")
        assert set(raw) == {"a", "b"}

    def test_parts_are_the_body_unjoined(self) -> None:
        rows = np.arange(12, dtype="<f8").reshape(3, 4)
        parts, headers = bt.encode_parts(request("FP64", [3, 4]), "inputs", {"x": rows})
        assert (b"".join(parts), headers) == bt.encode(request("FP64", [3, 4]), "inputs", {"x": rows})
        assert len(parts) == 2 and len(parts[0]) == int(headers[bt.HEADER])
        assert np.shares_memory(np.frombuffer(parts[1], "<f8"), rows)  # the rows' own buffer, not a copy

    def test_without_binary_tensors_it_is_json(self) -> None:
        doc = request("FP32", [1], data=[1.5])
        body, headers = bt.encode(doc, "inputs", {})
        assert headers == {"content-type": "application/json"} and orjson.loads(body) == doc
        assert bt.decode(body, None, "inputs") == (doc, {})

    def test_empty_tensor(self) -> None:
        body, headers = bt.encode(request("FP32", [0, 4]), "inputs", {"x": b""})
        _, raw = bt.decode(body, headers[bt.HEADER], "inputs")
        assert raw["x"].nbytes == 0


class TestBF16:
    """Triton's bfloat16: each element the high 16 bits of an FP32 (a Triton-like predictor
    answered it as binary data, and the explainer failed at start; a logged request got 400
    "not valid UTF-8")."""

    BITS = (0x3F80, 0xC020, 0x4049, 0x0000, 0x8000, 0x0001, 0x7F7F)
    VALUES = (1.0, -2.5, 3.140625, 0.0, -0.0, 2.0**-133, 3.3895313892515355e38)

    def test_decoded_exactly(self) -> None:
        raw = b"".join(b.to_bytes(2, "little") for b in self.BITS)
        head = orjson.dumps({"outputs": [{"name": "p", "shape": [7], "datatype": "BF16",
                                          "parameters": {"binary_data_size": 14}}]})
        _, found = bt.decode(head + raw, len(head), "outputs")
        values = bt.unpack_values("BF16", found["p"])
        assert values == list(self.VALUES) and str(values[4]) == "-0.0"
        assert bt.ITEMSIZE["BF16"] == 2 and bt.pack_values("BF16", self.VALUES) == raw

    def test_nan_and_infinities_as_fp16_has_them(self) -> None:
        fp16 = bt.unpack_values("FP16", bt.pack_values("UINT16", [0x7C00, 0xFC00, 0x7E00]))
        bf16 = bt.unpack_values("BF16", bt.pack_values("UINT16", [0x7F80, 0xFF80, 0x7FC0]))
        assert bf16[:2] == fp16[:2] == [float("inf"), float("-inf")]
        assert isnan(bf16[2]) and isnan(fp16[2])
        for datatype in ("FP16", "BF16"):
            back = bt.unpack_values(datatype, bt.pack_values(datatype, [float("nan"), float("-inf")]))
            assert isnan(back[0]) and back[1] == float("-inf")
        [full_nan] = bt.unpack_values("FP32", b"\xff\xff\xff\x7f")  # rounded up, it carries into the sign
        [back] = bt.unpack_values("BF16", bt.pack_values("BF16", [full_nan]))
        assert isnan(back)

    def test_packed_to_the_nearest_even(self) -> None:
        ties = [1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-16]
        assert bt.unpack_values("UINT16", bt.pack_values("BF16", ties)) == [0x3F80, 0x3F82, 0x3F81]
        for datatype, too_big in (("BF16", 3.4e38), ("BF16", 1e39), ("FP16", 65520.0), ("FP32", 1e39)):
            with pytest.raises(BinaryDataError, match=f"do not fit {datatype}"):  # was OverflowError
                bt.pack_values(datatype, [too_big])


class TestRequestedOutputs:
    """`binary_data` on an output wins over the request's `binary_data_output`."""

    def test_per_output_and_request_level(self) -> None:
        assert not bt.wants_binary({}, "p")
        assert bt.wants_binary({"parameters": {"binary_data_output": True}}, "p")
        assert bt.wants_binary({"outputs": [{"name": "p", "parameters": {"binary_data": True}}]}, "p")
        assert not bt.wants_binary({"outputs": [{"name": "q", "parameters": {"binary_data": True}}]}, "p")
        assert not bt.wants_binary({"parameters": {"binary_data_output": True},
                                    "outputs": [{"name": "p", "parameters": {"binary_data": False}}]}, "p")
        for outputs in (1, True, "p"):  # iterated: a TypeError for a number
            assert bt.wants_binary({"parameters": {"binary_data_output": True}, "outputs": outputs}, "p")


class TestMalformed:
    """Every fault is a BinaryDataError (a ValueError) naming the tensor and what is wrong."""

    def body(self, datatype: str = "FP32", shape: list[int] | None = None, raw: bytes = b"\0" * 8,
             size: int | None = None) -> tuple[bytes, int]:
        tensor = {"name": "input-0", "shape": shape or [2], "datatype": datatype,
                  "parameters": {"binary_data_size": len(raw) if size is None else size}}
        head = orjson.dumps({"inputs": [tensor]})
        return head + raw, len(head)

    def fails(self, body: bytes, header: str | int | None, *words: str) -> BinaryDataError:
        with pytest.raises(BinaryDataError) as caught:
            bt.decode(body, header, "inputs")
        assert isinstance(caught.value, ValueError)
        assert all(w in str(caught.value) for w in words), str(caught.value)
        return caught.value

    def test_size_does_not_match_the_shape(self) -> None:
        body, n = self.body(shape=[3])
        err = self.fails(body, n, "'input-0'", "8 bytes of FP32 for shape [3]", "12 expected")
        assert err.tensor == "input-0"

    def test_missing_header(self) -> None:
        body, _ = self.body()
        self.fails(body, None, "not JSON", bt.HEADER)
        head = orjson.dumps({"inputs": [{"name": "input-0", "shape": [0], "datatype": "FP32",
                                         "parameters": {"binary_data_size": 0}}]})
        self.fails(head, None, "'input-0'", f"{bt.HEADER} header is missing")

    def test_header_beyond_the_body(self) -> None:
        body, _ = self.body()
        err = self.fails(body, len(body) + 1, f"{len(body) + 1} bytes", f"only {len(body)}")
        assert err.tensor is None
        self.fails(body, "twelve", "not a byte count")
        n = len(body) - 8
        for loose in (f"+{n}", f"{n // 10}_{n % 10}", "-0"):  # int() takes these; HTTP does not
            self.fails(body, loose, "not a byte count")
        assert bt.decode(body, f" {n}\t", "inputs")[0]["inputs"][0]["name"] == "input-0"
        self.fails(body, 0, "not a length")

    @pytest.mark.parametrize("digits", [4300, 4301, 5000])
    def test_a_header_of_thousands_of_digits(self, digits: int) -> None:
        """int() refuses past 4300 digits: a ValueError, the explainer's 500."""
        body, n = self.body()
        self.fails(body, "9" * digits, f"{digits}-digit byte count", f"only {len(body)}")
        assert bt.decode(body, "0" * 5000 + str(n), "inputs")[0]["inputs"][0]["name"] == "input-0"

    def test_header_inside_the_json(self) -> None:
        body, n = self.body()
        self.fails(body, n - 1, f"the first {n - 1} bytes", "not JSON")

    def test_bad_datatype(self) -> None:
        body, n = self.body(datatype="FLOAT")
        self.fails(body, n, "'input-0'", "'FLOAT' is not one of BOOL")
        with pytest.raises(BinaryDataError, match="not one of"):
            bt.pack_values("FP8", [1])
        with pytest.raises(BinaryDataError, match="not one of"):
            bt.unpack_values("FP8", b"\0")

    def test_data_runs_past_the_end_or_bytes_are_left_over(self) -> None:
        body, n = self.body(size=16)
        self.fails(body, n, "binary_data_size 16 runs past the end", "8 bytes left")
        body, n = self.body(raw=b"\0" * 8)
        self.fails(body + b"\0\0", n, "2 bytes after the last binary tensor")
        empty = orjson.dumps({"inputs": []})
        self.fails(empty + b"\0", len(empty), "after the JSON part")

    def test_bytes_elements_cut_short(self) -> None:
        body, n = self.body(datatype="BYTES", shape=[1], raw=b"\x05\0\0\0abc")
        self.fails(body, n, "'input-0'", "5 bytes announced, 3 left")
        body, n = self.body(datatype="BYTES", shape=[2], raw=b"\x01\0\0\0a\x01\0")
        self.fails(body, n, "element 1", "cut short")
        body, n = self.body(datatype="BYTES", shape=[3], raw=b"\x01\0\0\0a")
        self.fails(body, n, "1 BYTES elements for shape [3]")

    def test_bad_tensor_fields(self) -> None:
        body, n = self.body(size=-1)
        self.fails(body, n, "binary_data_size -1 is not a byte count")
        head = orjson.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "UINT8", "data": [1],
                                         "parameters": {"binary_data_size": 1}}]})
        self.fails(head + b"\1", len(head), "'x'", "both `data` and binary_data_size")
        head = orjson.dumps({"inputs": [{"name": "x", "shape": "1", "datatype": "UINT8",
                                         "parameters": {"binary_data_size": 1}}]})
        self.fails(head + b"\1", len(head), "shape '1' is not a list of sizes")
        twice = {"name": "x", "shape": [1], "datatype": "UINT8", "parameters": {"binary_data_size": 1}}
        head = orjson.dumps({"inputs": [twice, twice]})
        self.fails(head + b"\1\1", len(head), "named twice")
        self.fails(b'{"inputs": 3}', None, "`inputs` must be a list")
        self.fails(b"[1]", None, "not a JSON object")

    def test_a_json_tensor_of_a_binary_ones_name(self) -> None:
        # Its bytes are filed by name: a reader took the JSON tensor for the binary one (a 500 in
        # the explainer: KeyError for no datatype, BinaryDataError unpacking BYTES).
        binary = {"name": "x", "shape": [1], "datatype": "UINT8", "parameters": {"binary_data_size": 1}}
        for tensors in ([{"name": "x", "shape": [1], "data": [1]}, binary],  # before it, or after it
                        [binary, {"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}]):
            head = orjson.dumps({"inputs": tensors})
            err = self.fails(head + b"\1", len(head), "'x'", "named twice in `inputs`")
            assert err.tensor == "x"
        json_only = orjson.dumps({"inputs": [{"name": "x", "shape": [1], "data": [1]}] * 2})
        assert bt.decode(json_only, None, "inputs")[1] == {}  # no bytes to mistake: left to the caller

    def test_encode_checks_what_it_sends(self) -> None:
        with pytest.raises(BinaryDataError, match="'x': 4 bytes of FP64 for shape \\[1\\] \\(8 expected\\)"):
            bt.encode(request("FP64", [1]), "inputs", {"x": b"\0" * 4})
        with pytest.raises(BinaryDataError, match="'y': has binary data but is not in `inputs`"):
            bt.encode(request("FP64", [1]), "inputs", {"y": b"\0" * 8})
        with pytest.raises(BinaryDataError, match="contiguous"):
            bt.encode(request("FP64", [2]), "inputs", {"x": np.zeros((2, 2))[:, 0]})
        with pytest.raises(BinaryDataError, match="do not fit UINT8"):
            bt.pack_values("UINT8", [256])
        with pytest.raises(BinaryDataError, match="whole number of FP32"):
            bt.unpack_values("FP32", b"\0" * 5)


class TestInline:
    """A logged body (no headers kept) read back as the JSON it stands for."""

    def test_every_datatype_fills_data(self) -> None:
        tensors = [{"name": d.lower(), "shape": [2, 2], "datatype": d} for d in SAMPLES]
        raw = {d.lower(): bt.pack_values(d, SAMPLES[d]) for d in SAMPLES}
        body, _ = bt.encode({"id": "1", "inputs": tensors, "parameters": {"x": 1}}, "inputs", raw)
        doc = bt.inline(body)
        assert doc is not None and doc["id"] == "1" and doc["parameters"] == {"x": 1}
        by_name = {t["name"]: t for t in doc["inputs"]}
        for datatype, values in SAMPLES.items():
            tensor = by_name[datatype.lower()]
            assert "parameters" not in tensor  # binary_data_size goes with the bytes
            if datatype == "BYTES":
                assert tensor["data"] == ["", "cat", "d\u00f6g", {"base64": "AP8="}]
            else:
                assert tensor["data"] == pytest.approx(values) if datatype.startswith("FP") else values

    def test_outputs_and_json_tensors_alongside(self) -> None:
        outputs = [{"name": "p", "shape": [3], "datatype": "INT64", "parameters": {"binary_data": True}},
                   {"name": "j", "shape": [1], "datatype": "FP32", "data": [0.5]}]
        body, _ = bt.encode({"model_name": "m", "outputs": outputs}, "outputs", {"p": bt.pack_values("INT64", [1, 2, 3])})
        doc = bt.inline(body)
        assert doc is not None
        assert doc["outputs"][0] == {"name": "p", "shape": [3], "datatype": "INT64", "data": [1, 2, 3],
                                     "parameters": {"binary_data": True}}
        assert doc["outputs"][1] == outputs[1]

    @pytest.mark.parametrize("name", [None, 7])
    def test_a_tensor_without_a_text_name_fills_data(self, name: object) -> None:
        """`decode` files it under `inputs[0]`: looked up by its raw name, it was logged with
        neither data nor bytes."""
        tensor: dict[str, object] = {"shape": [3], "datatype": "FP32", "parameters": {"binary_data_size": 12}}
        if name is not None:
            tensor["name"] = name
        head = orjson.dumps({"inputs": [tensor]})
        doc = bt.inline(head + bt.pack_values("FP32", [1.0, 2.0, 3.0]))
        assert doc is not None and doc["inputs"][0]["data"] == [1.0, 2.0, 3.0]

    @pytest.mark.parametrize(("datatype", "values"), [("INT8", [10]), ("UINT8", [32, 9, 13]), ("INT16", [8224]),
                                                      ("FP32", [])])
    def test_a_binary_part_of_blanks_is_no_json_whitespace(self, datatype: str, values: list[int]) -> None:
        """orjson takes blank bytes after the JSON part as whitespace: the body parsed as JSON, its
        tensors without data, and the audit held tensor metadata as features."""
        from infer_logger.events import decode_data

        tensors = [{"name": "x", "shape": [len(values)], "datatype": datatype}]
        body, _ = bt.encode({"inputs": tensors}, "inputs", {"x": bt.pack_values(datatype, values)})
        event = CloudEvent({"specversion": "1.0", "id": "1", "source": "/s", "type": "t",
                            "datacontenttype": "application/json"}, body)
        event.json()  # it does parse
        expected = {"inputs": [{"name": "x", "shape": [len(values)], "datatype": datatype, "data": values}]}
        assert decode_data(event) == expected
        plain = CloudEvent(event.attributes, b'{"inputs": [{"name": "x", "data": [1], "parameters": '
                                             b'{"binary_data_size": 4}}]}')  # claims binary, has none: as parsed
        assert decode_data(plain) == plain.json()

    @pytest.mark.parametrize("body", [b"", b"not json", b'{"inputs": []}', b'{"a": 1', b"\x00\x01{}",
                                      b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", '
                                      b'"parameters": {"binary_data_size": 8}}]}\x00\x00\x00'])
    def test_anything_else_is_none(self, body: bytes) -> None:
        # Plain JSON is JSON's business; a cut or inconsistent body stays opaque (logged as base64).
        doc = bt.inline(body)
        assert doc is None or "data" not in str(doc)

    def test_json_nested_past_the_recursion_limit_is_none(self) -> None:
        """Past orjson's 1024 levels, the search for the JSON part's end raised RecursionError."""
        assert bt.inline(b'{"instances":' + b"[" * 100_000 + b"]" * 100_000 + b"}") is None
