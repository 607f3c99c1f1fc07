from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
import yaml

from infer_logger import events
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.payloads import instances, split_explanation, split_request, split_response
from tests.conformance import ROOT, reason

KSERVE = ROOT / "kserve"
needs_conformance = pytest.mark.skipif(not KSERVE.is_dir(), reason=reason("kserve"))


def _payload(name: str) -> Any:
    return json.loads((KSERVE / "payloads" / name).read_text())


def _event(type_: str, data: bytes | None, **attrs: Any) -> CloudEvent:
    return CloudEvent({"id": "1", "source": "test", "specversion": "1.0", "type": type_, **attrs}, data)


@needs_conformance
class TestKServePayloads:
    """KServe's sample payloads split into one item per instance."""

    @pytest.mark.parametrize(
        ("name", "count"),
        [
            ("iris-v1-input.json", 2),
            ("income-v1-input.json", 1),
            ("aif-germancredit-input.json", None),
            ("bert-v1-input.json", 1),
            ("moviesentiment-positive-v1-input.json", 1),
            ("art-mnist-explain-input.json", None),
        ],
    )
    def test_v1_requests(self, name: str, count: int | None) -> None:
        body = _payload(name)
        items = split_request(body)
        assert items == body["instances"]
        if count is not None:
            assert len(items) == count

    def test_named_features_stay_a_dict(self) -> None:
        (item,) = split_request(_payload("sklearn-mixedtype-input.json"))
        assert item["MSZoning"] == "RL"
        assert item["GarageArea"] == 548

    def test_v2_request_nested_data(self) -> None:
        assert split_request(_payload("iris-v2-input.json")) == [
            {"input-0": [6.8, 2.8, 4.8, 1.4]},
            {"input-0": [6.0, 3.4, 4.5, 1.6]},
        ]

    @pytest.mark.parametrize(
        "name",
        ["income-predict-expected-response.json", "moviesentiment-positive-predict-expected-response.json"],
    )
    def test_v1_responses(self, name: str) -> None:
        body = _payload(name)
        assert split_response(body) == body["predictions"]

    @pytest.mark.parametrize(
        "name", ["income-explain-example-response.json", "moviesentiment-explain-example-response.json"]
    )
    def test_anchor_explanation_is_instance_zeros(self, name: str) -> None:
        body = _payload(name)
        assert split_explanation(body) == [body]

    def test_oip_examples(self) -> None:
        examples = {e["id"]: e for e in yaml.safe_load((KSERVE / "oip-examples.yaml").read_text())["examples"]}
        spec = examples["oip-inference-request-example"]
        # input1 declares shape [3] with one element: inconsistent, so the request stays whole.
        assert split_request(spec["request"]["json"]) == [spec["request"]["json"]]
        assert split_response(spec["response"]["json"]) == [
            {"output0": [1.0, 1.1]},
            {"output0": [2.0, 2.1]},
            {"output0": [3.0, 3.1]},
        ]
        documented = examples["kserve-iris-v2-request"]["documented_response_example"]
        assert split_response(documented) == [{"predict": 1}, {"predict": 2}]


class TestV2Tensors:
    """V2 tensors are sliced by shape[0], from flat or nested data."""

    def test_flat_row_major(self) -> None:
        body = {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "UINT32", "data": [1, 2, 3, 4]}]}
        assert split_request(body) == [{"x": [1, 2]}, {"x": [3, 4]}]

    def test_three_dims(self) -> None:
        body = {"inputs": [{"name": "x", "shape": [2, 2, 2], "datatype": "FP32", "data": list(range(8))}]}
        assert split_request(body) == [{"x": [[0, 1], [2, 3]]}, {"x": [[4, 5], [6, 7]]}]

    def test_column_per_feature(self) -> None:
        body = {
            "parameters": {"content_type": "pd"},
            "inputs": [
                {"name": "age", "shape": [2], "datatype": "INT64", "data": [39, 50]},
                {"name": "job", "shape": [2], "datatype": "BYTES", "data": ["clerk", "chef"],
                 "parameters": {"content_type": "str"}},
            ],
        }
        assert split_request(body) == [{"age": 39, "job": "clerk"}, {"age": 50, "job": "chef"}]

    def test_column_of_width_one(self) -> None:
        body = {"outputs": [{"name": "p", "shape": [3, 1], "datatype": "FP32", "data": [0.1, 0.2, 0.3]}]}
        assert split_response(body) == [{"p": [0.1]}, {"p": [0.2]}, {"p": [0.3]}]

    def test_lone_bytes_scalar(self) -> None:
        body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": "hello"}]}
        assert split_request(body) == [{"text": "hello"}]

    @pytest.mark.parametrize(
        "tensors",
        [
            [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3]}],  # too little data
            [{"name": "x", "shape": [], "datatype": "FP32", "data": [1]}],  # a scalar: no batch axis
            [{"name": "x", "shape": [0, 4], "datatype": "FP32", "data": []}],  # an empty batch
            # Rows of nothing: the empty data fits any first dim, which made that many rows (a
            # 70-byte body saying [10**12, 0] hung the store).
            [{"name": "x", "shape": [1000, 0], "datatype": "FP32", "data": []}],
            [{"name": "x", "shape": [3, 2, 0], "datatype": "FP32", "data": [[[], []], [[], []], [[], []]]}],
            [{"name": "x", "shape": ["n"], "datatype": "FP32", "data": [1]}],
            [
                {"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]},
                {"name": "y", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]},  # batch sizes differ
            ],
            [  # one name twice (the first tensor's data was lost)
                {"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]},
                {"name": "x", "shape": [2], "datatype": "FP32", "data": [3, 4]},
            ],
            [
                {"name": 1, "shape": [2], "datatype": "FP32", "data": [1, 2]},
                {"name": "1", "shape": [2], "datatype": "FP32", "data": [3, 4]},
            ],
        ],
    )
    def test_inconsistent_stays_whole(self, tensors: list[dict[str, Any]]) -> None:
        body = {"inputs": tensors}
        assert split_request(body) == [body]

    def test_tensors_without_data_stay_whole(self) -> None:
        """Triton's shared-memory extension names a region instead of sending `data`: each tensor
        was taken for an instance (TF's row format), two inputs of one instance made two."""
        region = {"shared_memory_region": "input0_data", "shared_memory_byte_size": 64}
        body = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "parameters": region},
                           {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "parameters": region}]}
        assert split_request(body) == [body]
        answer = {"outputs": [{"name": "OUT", "shape": [1, 16], "datatype": "INT32", "parameters": region}]}
        assert split_response(answer) == [answer]
        tensors = [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]},
                   {"name": "y", "shape": [2], "datatype": "FP32", "parameters": region}]
        assert split_request({"inputs": tensors}) == [{"inputs": tensors}]
        bf16 = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "BF16", "parameters": region},
                           {"name": "m", "shape": [1, 4], "datatype": "BF16", "parameters": region}]}
        assert split_request(bf16) == [bf16]  # Triton's BF16, not in the spec's list

    def test_more_dimensions_than_numpy_stays_whole(self) -> None:
        """Rows were reshaped one recursion per dimension: 1000 dims raised RecursionError."""
        body = {"inputs": [{"name": "x", "shape": [1] * 1000, "datatype": "FP32", "data": [1]}]}
        assert split_request(body) == [body]
        most = {"inputs": [{"name": "x", "shape": [2] + [1] * 63, "datatype": "FP32", "data": [1, 2]}]}
        first, _ = split_request(most)
        assert str(first) == "{'x': " + "[" * 63 + "1" + "]" * 63 + "}"  # 64 dims: still rows


class TestOtherShapes:
    """TF formats, explanations and whatever is not a batch."""

    def test_tf_row_inputs(self) -> None:
        assert split_request({"inputs": [[1, 2], [3, 4]]}) == [[1, 2], [3, 4]]
        rows = [{"name": "ann", "shape": "round"}, {"name": "bob", "age": 3}]  # features, not tensors
        assert split_request({"inputs": rows}) == rows

    @pytest.mark.parametrize("rows", [
        [{"name": "parcel-1", "shape": [[0, 0], [0, 1], [1, 1]]},
         {"name": "parcel-2", "shape": [[0, 0], [2, 2]]}],
        [{"age": 3, "city": "x"}, {"age": 5, "city": "y", "datatype": "float"}],
        [{"name": "x", "shape": [2], "datatype": "float"}, {"name": "y", "shape": [2], "datatype": "float"}],
        [{"name": "x", "shape": [2], "parameters": {}}, {"name": "y", "shape": [2]}],  # no datatype
        # One row that could be a tensor among rows that cannot (a shared-memory tensor has no `data`).
        [{"name": "x", "shape": [2], "datatype": "FP32"}, {"age": 5}],
    ])
    def test_tf_rows_with_tensor_like_features_are_split(self, rows: list[dict[str, Any]]) -> None:
        """A `datatype` feature, or a `name` and a list `shape`, in one row kept the batch whole,
        as if its rows were V2 tensors without `data`: only V2 tensors, all of them, do that."""
        assert split_request({"inputs": rows}) == rows
        assert split_response({"outputs": rows}) == rows

    def test_tf_columnar_inputs(self) -> None:
        body = {"inputs": {"a": [1, 2], "b": [[1, 1], [2, 2]]}}
        assert split_request(body) == [{"a": 1, "b": [1, 1]}, {"a": 2, "b": [2, 2]}]

    def test_tf_columnar_outputs_of_unequal_length_stay_whole(self) -> None:
        body = {"outputs": {"a": [1, 2], "b": [1]}}
        assert split_response(body) == [body]

    def test_explanations_list(self) -> None:
        assert split_explanation({"explanations": [{"a": 1}, {"a": 2}]}) == [{"a": 1}, {"a": 2}]

    @pytest.mark.parametrize(
        "body", [{"instances": []}, {"instances": "invalid"}, {"error": "bad"}, [1, 2], "text", None]
    )
    def test_unsplittable(self, body: Any) -> None:
        assert split_request(body) == [body]


class TestInstances:
    """`instances(event)` picks the split by event type and keeps odd payloads whole."""

    def test_request_and_response(self) -> None:
        req = _event(events.REQUEST, b'{"instances": [[1], [2]]}')
        resp = _event(events.RESPONSE, b'{"predictions": [0, 1]}', statuscode=200)
        assert instances(req) == [[1], [2]]
        assert instances(resp) == [0, 1]

    @pytest.mark.parametrize("status", [500, "500", "404.0"])
    def test_error_response_is_one_item(self, status: int | str) -> None:
        """Binary modes (HTTP, Kafka) carry statuscode as text: such an error body was split."""
        body = {"predictions": [0, 1], "error": "partial"}
        assert instances(_event(events.RESPONSE, orjson.dumps(body), statuscode=status)) == [body]

    def test_non_json_body(self) -> None:
        (item,) = instances(_event(events.RESPONSE, b"Internal Server Error", statuscode=200))
        assert item == {"base64": "SW50ZXJuYWwgU2VydmVyIEVycm9y"}

    @pytest.mark.parametrize(("body", "text"), [
        (b"Internal Server Error", "Internal Server Error"),
        ("<p>Erreur : réessayez</p>".encode(), "<p>Erreur : réessayez</p>"),
    ])
    def test_an_error_body_that_is_not_json_is_its_text(self, body: bytes, text: str) -> None:
        """It was {"base64": ...}: an Envoy or nginx error page is read by people."""
        assert instances(_event(events.RESPONSE, body, statuscode=503)) == [text]
        cut = _event(events.RESPONSE, b'{"error": "out of', statuscode=500, truncated=True, datasize=99)
        assert instances(cut) == ['{"error": "out of']

    @pytest.mark.parametrize(("charset", "text"), [
        ("windows-1252", "<p>Erreur : réessayez à 10h</p>"),
        ('"ISO-8859-1"', "<p>Erreur : réessayez à 10h</p>"),
        ("Shift_JIS", "<p>エラー</p>"),
        ("utf-16", "<p>Erreur</p>"),
        ("KOI8-U", "<p>Сервіс недоступний, ґанок</p>"),  # a codec Python ships without an alias
        ("cp874", "<p>บริการไม่พร้อมใช้งาน</p>"),
    ])
    def test_an_error_body_in_its_charset_is_its_text(self, charset: str, text: str) -> None:
        """Decoded as UTF-8 with U+FFFD for what was not, a page in another charset lost its bytes."""
        page = text.encode(charset.strip('"'))
        event = _event(events.RESPONSE, page, statuscode=503, datacontenttype=f"text/html; charset={charset}")
        assert instances(event) == [text]

    def test_a_json_error_body_is_utf8_whatever_its_label_says(self) -> None:
        """JSON is UTF-8 (RFC 8259 11: a charset parameter has no effect): read by a legacy label's
        charset, a JSON error body was garbled ('cafÃ©')."""
        cut = _event(events.RESPONSE, '{"error": "café'.encode(), statuscode=500, truncated=True,
                     datacontenttype="application/json; charset=iso-8859-1")
        assert instances(cut) == ['{"error": "café']

    @pytest.mark.parametrize(("body", "content_type"), [
        (b"<html>\xff</html>", None),
        ("<p>réessayez</p>".encode("cp1252"), "text/html"),  # no charset: UTF-8, which it is not
        ("<p>réessayez</p>".encode("cp1252"), "text/html; charset=x-unknown"),
        ("<p>réessayez</p>".encode("cp1252"), "text/html; charset=base64"),  # a codec, but not of text
        (b"<p>\x81</p>", "text/html; charset=windows-1252"),  # a byte cp1252 leaves undefined
        (b"x +2AA-", "text/plain; charset=utf-7"),  # the same
        ("<p>réessayez</p>".encode("cp1252"), "text/html; charset=" + "x" * 41),  # no charset's name
        ("<p>réessayez</p>".encode() + b"\xc3", None),  # cut mid-character, but not marked truncated
    ])
    def test_an_error_body_that_is_not_text_stays_base64(self, body: bytes, content_type: str | None) -> None:
        """U+FFFD in place of what does not decode lost those bytes for good: base64 keeps them."""
        extra = {} if content_type is None else {"datacontenttype": content_type}
        (item,) = instances(_event(events.RESPONSE, body, statuscode=502, **extra))
        assert item == events.RawPayload.of(body) and isinstance(item, events.RawPayload)

    @pytest.mark.parametrize(("cut", "charset", "text"), [
        ("{\"error\": \"réessayez\"}".encode()[:13], None, '{"error": "r'),  # in "é"'s two bytes
        ("{\"error\": \"エラー\"}".encode()[:16], None, '{"error": "エ'),  # one of "ラ"'s three
        ("<p>エラー</p>".encode("shift_jis")[:6], "shift_jis", "<p>エ"),
    ])
    def test_a_truncated_error_body_is_its_text_to_its_last_whole_character(
        self, cut: bytes, charset: str | None, text: str
    ) -> None:
        extra = {} if charset is None else {"datacontenttype": f"text/plain; charset={charset}"}
        event = _event(events.RESPONSE, cut, statuscode=500, truncated=True, datasize=99, **extra)
        assert instances(event) == [text]
        broken = _event(events.RESPONSE, b"\xff" + cut, statuscode=500, truncated=True, datasize=99, **extra)
        assert instances(broken) == [events.RawPayload.of(b"\xff" + cut)]  # not text before the cut

    @pytest.mark.parametrize(("cut", "charset"), [
        ("Erreur: エラーが発生しました".encode("utf-7")[:30], "utf-7"),  # an open run of base64
    ])
    def test_a_truncated_error_body_holding_back_more_than_a_character_is_base64(
            self, cut: bytes, charset: str) -> None:
        """The bytes a codec held back at the cut were left out of the text, all of them: a
        UTF-7 page cut in a run of Japanese kept its first 8 of 300 bytes."""
        event = _event(events.RESPONSE, cut, statuscode=500, truncated=True, datasize=99,
                       datacontenttype=f"text/plain; charset={charset}")
        assert instances(event) == [events.RawPayload.of(cut)]

    @pytest.mark.parametrize("codec", ["unicode_escape", "raw_unicode_escape", "idna", "rot13"])
    def test_codecs_that_are_no_charsets_are_not_used(self, codec: str) -> None:
        """unicode_escape read `\\x41` as "A" (the bytes lost) and `\\ud800` as a lone surrogate (the
        event refused by the store): a charset Python ships no text codec alias for reads as UTF-8."""
        for page in (b"<p>\\x41</p>", b"<p>\\ud800</p>", b"xn--caf-dma.xn--caf-dma"):
            event = _event(events.RESPONSE, page, statuscode=503, datacontenttype=f"text/html; charset={codec}")
            assert instances(event) == [page.decode()]

    def test_unknown_charset_names_are_not_kept(self) -> None:
        """Python's codec search keeps each name it did not find, for good: a made-up one per
        response grew a long-running sidecar by ~20 KB each."""
        import encodings

        known = len(encodings._cache)  # type: ignore[attr-defined]
        for i in range(50):
            event = _event(events.RESPONSE, b"down", statuscode=503,
                           datacontenttype=f"text/plain; charset=x-made-up-{i}" + "y" * (i % 2 * 2000))
            assert instances(event) == ["down"]
        assert len(encodings._cache) == known  # type: ignore[attr-defined]

    def test_a_truncated_utf16_error_body_without_a_bom_is_base64(self) -> None:
        """UTF-16's incremental decoder raises UnicodeError, not UnicodeDecodeError, for a missing
        BOM: not caught, it would fail the store's write."""
        cut = "<p>Erreur</p>".encode("utf-16-le")[:9]
        event = _event(events.RESPONSE, cut, statuscode=500, truncated=True, datasize=99,
                       datacontenttype="text/html; charset=utf-16")
        assert instances(event) == [events.RawPayload.of(cut)]

    @pytest.mark.parametrize(("truncated", "text"), [("false", None), ("True", "<p>r")])
    def test_truncated_as_binary_modes_carry_it(self, truncated: str, text: str | None) -> None:
        """Binary modes carry `truncated` as text: "false" counted as cut, so a body ending
        mid-character (not whole text) was shown as text, its last byte lost."""
        body = b"<p>r\xc3"
        (item,) = instances(_event(events.RESPONSE, body, statuscode=500, truncated=truncated, datasize=99))
        assert item == (events.RawPayload.of(body) if text is None else text)

    def test_truncated_is_not_parsed(self) -> None:
        event = _event(events.REQUEST, b'{"instances": [[1], [2]]}', truncated=True, datasize=999)
        (item,) = instances(event)
        assert set(item) == {"base64"}

    def test_no_data(self) -> None:
        assert instances(_event(events.REQUEST, None)) == [None]

    def test_explanation_and_unknown_type(self) -> None:
        assert instances(_event(events.EXPLANATION, b'{"explanations": [1, 2]}')) == [1, 2]
        assert instances(_event("com.example.other", b'{"instances": [1, 2]}')) == [{"instances": [1, 2]}]
