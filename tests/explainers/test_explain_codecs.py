"""Payload codecs: V1 and V2 requests to instance arrays, predictor bodies and answers."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from explainers import codecs
from explainers.codecs import Schema
from explainers.errors import InvalidInputError, PredictorError
from infer_logger import binary_tensors as bt

IRIS = Schema(("sl", "sw", "pl", "pw"))
MIXED = Schema(("island", "bill", "sex"), frozenset({"island", "sex"}))


class TestDecodeInstances:
    """Every instance of V1 and V2 requests, in feature order; bad shapes name the expected one."""

    def test_v1_rows_and_objects(self) -> None:
        rows = codecs.decode_instances({"instances": [[1, 2, 3, 4], {"pw": 8, "pl": 7, "sw": 6, "sl": 5}]}, IRIS)
        assert rows.dtype == float and rows.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]

    def test_v2_natural_flat_and_per_feature(self) -> None:
        natural = {"inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP32", "data": [[1, 2, 3, 4], [5, 6, 7, 8]]}]}
        flat = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP64", "data": [1, 2, 3, 4, 5, 6, 7, 8]}]}
        per_feature = {"inputs": [{"name": n, "shape": [2], "datatype": "FP64", "data": [i, i + 4]}
                                  for i, n in enumerate(("sl", "sw", "pl", "pw"), start=1)]}
        for body in (natural, flat, per_feature):
            assert codecs.decode_instances(body, IRIS).tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]

    def test_mixed_types_stay_objects(self) -> None:
        rows = codecs.decode_instances({"instances": [["Biscoe", 40, "male"]]}, MIXED)
        assert rows.dtype == object and rows.tolist() == [["Biscoe", 40.0, "male"]]

    @pytest.mark.parametrize("body, words", [
        ({"instances": [[1, 2, 3]]}, ["instances[0]", "3 values", "[n, 4]"]),
        ({"instances": [[1, 2, 3, "x"]]}, ["instances[0][3] (pw)", "expected a number"]),
        ({"instances": [[1, 2, 3, True]]}, ["expected a number"]),
        ({"instances": [{"sl": 1}]}, ["missing", "pw"]),
        ({"inputs": [{"name": "input-0", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}, ["[n, 4]"]),
        ({"inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP32", "data": [1, 2, 3]}]}, ["3 values"]),
        ({"instances": []}, ["empty", "[n, 4]"]),
        ({"rows": [[1, 2, 3, 4]]}, ["instances", "inputs", "[n, 4]"]),
        ([1, 2], ["JSON object"]),
    ])
    def test_bad_input_names_the_shape(self, body: object, words: list[str]) -> None:
        with pytest.raises(InvalidInputError) as caught:
            codecs.decode_instances(body, IRIS)
        assert all(w in str(caught.value) for w in words), str(caught.value)

    def test_numbers_in_bytes_tensors_may_be_strings(self) -> None:
        """A mixed model's input is BYTES, whose elements are strings: '40.5' was refused (JSON and binary)."""
        tensor = {"name": "input-0", "shape": [1, 3], "datatype": "BYTES", "data": ["Biscoe", "40.5", "male"]}
        raw = bt.pack_values("BYTES", tensor["data"])
        binary = {k: v for k, v in tensor.items() if k != "data"}
        head = orjson.dumps({"inputs": [{**binary, "parameters": {"binary_data_size": len(raw)}}]})
        per_feature = [{"name": n, "shape": [1], "datatype": "BYTES", "data": [v]}
                       for n, v in zip(MIXED.feature_names, tensor["data"])]
        for doc in ({"inputs": [tensor]}, codecs.decode_body(head + raw, str(len(head))), {"inputs": per_feature}):
            assert codecs.decode_instances(doc, MIXED).tolist() == [["Biscoe", 40.5, "male"]]
        for bad, why in (("x", "expected a number, got 'x'"), ("nan", "expected a finite number")):
            with pytest.raises(InvalidInputError, match=rf"\(bill\): {why}"):
                codecs.decode_instances({"inputs": [{**tensor, "data": ["Biscoe", bad, "male"]}]}, MIXED)
        with pytest.raises(InvalidInputError, match=r"\(bill\): expected a number, got '40.5'"):  # not BYTES
            codecs.decode_instances({"inputs": [{**tensor, "datatype": "FP64"}]}, MIXED)

    def test_categorical_needs_strings(self) -> None:
        with pytest.raises(InvalidInputError, match=r"island\): expected a string"):
            codecs.decode_instances({"instances": [[1, 40, "male"]]}, MIXED)

    def test_json_nested_near_its_limit_is_400(self) -> None:
        # orjson reads 1024 levels; repr of the bad value in the message, or str of a tensor name,
        # recursed past Python's limit: RecursionError, a 500.
        deep = orjson.loads(b"[" * 990 + b"1" + b"]" * 990)
        with pytest.raises(InvalidInputError, match=r"\[3\] \(pw\): expected a number, got \[\[\[\[\.\.\.]]]]"):
            codecs.decode_instances({"instances": [[1, 2, 3, deep]]}, IRIS)
        with pytest.raises(InvalidInputError, match=r"\(island\): expected a string, got \[\[\[\["):
            codecs.decode_instances({"instances": [[deep, 40, "male"]]}, MIXED)
        per_feature = [{"name": n, "shape": [1], "datatype": "FP64", "data": [1]} for n in IRIS.feature_names]
        with pytest.raises(InvalidInputError, match=r"nests JSON too deeply to read; expected shape \[n, 4\]"):
            codecs.decode_instances({"inputs": [*per_feature, {"name": deep, "shape": [1], "data": [1]}]}, IRIS)

    def test_one_feature_among_several_tensors_is_read_by_name(self) -> None:
        """A width-1 model read inputs[0], whatever its name."""
        tensors = [{"name": "z", "shape": [1], "datatype": "FP64", "data": [99]},
                   {"name": "a", "shape": [1], "datatype": "FP64", "data": [1]}]
        assert codecs.decode_instances({"inputs": tensors}, Schema(("a",))).tolist() == [[1.0]]
        with pytest.raises(InvalidInputError, match=r"no tensor for \['b'\]"):
            codecs.decode_instances({"inputs": tensors}, Schema(("b",)))
        one = {"inputs": tensors[:1]}  # one tensor: read whatever its name
        assert codecs.decode_instances(one, Schema(("b",))).tolist() == [[99.0]]

    def test_a_tensor_name_used_twice(self) -> None:
        # The per-feature tensors were looked up by name: the last of the two silently won.
        tensors = [{"name": n, "shape": [1], "datatype": "FP64", "data": [1]} for n in IRIS.feature_names]
        with pytest.raises(InvalidInputError, match="inputs: tensor 'pl' is named twice"):
            codecs.decode_instances({"inputs": [*tensors, {**tensors[2], "data": [9]}]}, IRIS)


class TestPredictorBodies:
    """What the client sends and reads back."""

    def test_encode_v2_one_tensor(self) -> None:
        body = orjson.loads(codecs.encode_v2(np.array([[1.0, 2, 3, 4]]), IRIS))
        assert body["inputs"] == [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3, 4]}]

    def test_encode_v2_per_feature_with_strings(self) -> None:
        schema = Schema(MIXED.feature_names, MIXED.categorical, tensor=None)
        body = orjson.loads(codecs.encode_v2(np.array([["Dream", 40.0, "male"]], dtype=object), schema))
        assert [(t["name"], t["datatype"], t["data"]) for t in body["inputs"]] == [
            ("island", "BYTES", ["Dream"]), ("bill", "FP64", [40.0]), ("sex", "BYTES", ["male"])]

    def test_encode_v2_per_feature_in_their_datatypes(self) -> None:
        """Every number feature went as FP64, whatever the predictor's metadata said (JSON and binary)."""
        schema = Schema(MIXED.feature_names, MIXED.categorical, tensor=None, datatypes=("BYTES", "FP32", "BYTES"))
        rows = np.array([["Dream", 40.5, "male"]], dtype=object)
        body = orjson.loads(codecs.encode_v2(rows, schema))
        assert [(t["datatype"], t["data"]) for t in body["inputs"]] == [
            ("BYTES", ["Dream"]), ("FP32", [40.5]), ("BYTES", ["male"])]
        body, headers = codecs.encode_v2_binary(rows, schema)
        doc, raw = bt.decode(body, headers[bt.HEADER], "inputs")
        assert [t["datatype"] for t in doc["inputs"]] == ["BYTES", "FP32", "BYTES"] and raw["bill"].nbytes == 4

    def test_encode_v2_per_feature_in_their_shapes(self) -> None:
        """Each feature went as `[n]` whatever the metadata's shape (`[-1, 1]`): Triton refuses that."""
        schema = Schema(MIXED.feature_names, MIXED.categorical, tensor=None, shapes=((1,), (), (1, 1)))
        rows = np.array([["Dream", 40.5, "male"], ["Biscoe", 41.0, "female"]], dtype=object)
        body = orjson.loads(codecs.encode_v2(rows, schema))
        assert [(t["shape"], t["data"]) for t in body["inputs"]] == [
            ([2, 1], ["Dream", "Biscoe"]), ([2], [40.5, 41.0]), ([2, 1, 1], ["male", "female"])]
        body, headers = codecs.encode_v2_binary(rows, schema)
        doc, _ = bt.decode(body, headers[bt.HEADER], "inputs")
        assert [t["shape"] for t in doc["inputs"]] == [[2, 1], [2], [2, 1, 1]]

    def test_encode_v1(self) -> None:
        assert orjson.loads(codecs.encode_v1(np.array([[1.0, 2.0]]))) == {"instances": [[1.0, 2.0]]}

    def test_decode_outputs(self) -> None:
        body = {"outputs": [{"name": "predict", "shape": [2], "data": [0, 1]},
                            {"name": "predict_proba", "shape": [2, 2], "data": [0.9, 0.1, 0.2, 0.8]}]}
        assert codecs.decode_v2_output(body, 2, None).tolist() == [[0.9, 0.1], [0.2, 0.8]]
        assert codecs.decode_v2_output(body, 2, "predict").tolist() == [0, 1]
        assert codecs.decode_v1_output({"predictions": [[0.5, 0.5]]}, 1).shape == (1, 2)
        with pytest.raises(PredictorError, match="no output 'nope'"):
            codecs.decode_v2_output(body, 2, "nope")
        with pytest.raises(PredictorError, match="2 items"):
            codecs.decode_v1_output({"predictions": [1]}, 2)

    def test_v1_outputs_of_more_than_two_dimensions_are_rows_of_outputs(self) -> None:
        """[[[p0, p1, p2]]] reached shap as is: a ValueError reshaping it, a 500 (V2's were flattened)."""
        predictions = [[[0.1, 0.2, 0.7]], [[0.3, 0.3, 0.4]]]
        assert codecs.decode_v1_output({"predictions": predictions}, 2).tolist() == [[0.1, 0.2, 0.7], [0.3, 0.3, 0.4]]

    def test_non_finite_outputs_are_refused(self) -> None:
        """JSON null reads as NaN: explained, it gave null attributions, answered 200."""
        for body in ({"predictions": [[None, None], [0.5, 0.5]]}, {"predictions": [None, 1]}):
            with pytest.raises(PredictorError, match='non-finite "predictions"'):
                codecs.decode_v1_output(body, 2)
        nulls = {"outputs": [{"name": "proba", "shape": [2, 2], "datatype": "FP64", "data": [None, 0.5, 0.5, 0.5]}]}
        with pytest.raises(PredictorError, match="non-finite output 'proba'.*1 of 4"):
            codecs.decode_v2_output(nulls, 2, None)
        doc = {"outputs": [{"name": "proba", "shape": [2, 2], "datatype": "FP64"}]}
        body, headers = bt.encode(doc, "outputs", {"proba": np.array([[np.nan, 1.0], [0.5, np.inf]])})
        parsed, raw = bt.decode(body, headers[bt.HEADER], "outputs")
        with pytest.raises(PredictorError, match="non-finite output 'proba'.*2 of 4"):
            codecs.decode_v2_output(parsed, 2, None, raw)

    def test_v1_labels_kept_but_not_objects_or_nulls(self) -> None:
        assert codecs.decode_v1_output({"predictions": ["setosa", 2]}, 2).tolist() == ["setosa", 2]
        for junk in ([{"p": 1}, {"p": 2}], [[0.1, 0.9], [0.1]], ["a", None]):
            with pytest.raises(PredictorError, match="neither numbers nor labels"):
                codecs.decode_v1_output({"predictions": junk}, 2)

    def test_null_is_not_a_number(self) -> None:
        for body in ({"instances": [[1, None, 3, 4]]},
                     {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [1, None, 3, 4]}]}):
            with pytest.raises(InvalidInputError, match="expected a number, got None"):
                codecs.decode_instances(body, IRIS)

    def test_a_binary_tensor_without_a_name_is_read_as_a_json_one_is(self) -> None:
        # Its bytes were left out (filed under `inputs[0]`), and the 400 spoke of missing row keys.
        for tensor in ({}, {"name": 5}):
            head = orjson.dumps({"inputs": [{**tensor, "shape": [1, 4], "datatype": "FP64",
                                             "parameters": {"binary_data_size": 32}}]})
            doc = codecs.decode_body(head + np.arange(4.0).tobytes(), str(len(head)))
            assert codecs.decode_instances(doc, IRIS).tolist() == [[0.0, 1.0, 2.0, 3.0]]

    def test_binary_nan_and_infinity_refused_as_null_is(self) -> None:
        for bad in (np.nan, np.inf, -np.inf):
            rows = np.array([[1.0, bad, 3.0, 4.0]])
            body, headers = codecs.encode_v2_binary(rows, IRIS)
            doc = codecs.decode_body(body, headers[bt.HEADER])
            with pytest.raises(InvalidInputError, match=r"\[1\] \(sw\): expected a finite number"):
                codecs.decode_instances(doc, IRIS)

    def test_encode_v2_binary_as_the_schema_says(self) -> None:
        rows = np.array([[1.5, 2, 3, 4], [5, 6, 7, 8]])
        body, headers = codecs.encode_v2_binary(rows, Schema(IRIS.feature_names, datatype="FP32"))
        assert headers["content-type"] == bt.CONTENT_TYPE
        doc, raw = bt.decode(body, headers[bt.HEADER], "inputs")
        assert doc["inputs"] == [{"name": "input-0", "shape": [2, 4], "datatype": "FP32",
                                  "parameters": {"binary_data_size": 32}}]
        assert doc["parameters"] == {"binary_data_output": True} and "outputs" not in doc
        np.testing.assert_array_equal(np.frombuffer(raw["input-0"], "<f4").reshape(2, 4), rows)
        body, headers = codecs.encode_v2_binary(rows, IRIS, "predict_proba")  # FP64 by default
        doc, raw = bt.decode(body, headers[bt.HEADER], "inputs")
        assert doc["outputs"] == [{"name": "predict_proba", "parameters": {"binary_data": True}}]
        assert doc["inputs"][0]["datatype"] == "FP64" and raw["input-0"].nbytes == 64

    def test_encode_v2_binary_per_feature_with_strings(self) -> None:
        schema = Schema(MIXED.feature_names, MIXED.categorical, tensor=None)
        body, headers = codecs.encode_v2_binary(np.array([["Dream", 40.0, "male"]], dtype=object), schema)
        doc, raw = bt.decode(body, headers[bt.HEADER], "inputs")
        assert [(t["name"], t["datatype"]) for t in doc["inputs"]] == [
            ("island", "BYTES"), ("bill", "FP64"), ("sex", "BYTES")]
        assert bt.unpack_values("BYTES", raw["island"]) == [b"Dream"]
        assert bt.unpack_values("FP64", raw["bill"]) == [40.0]

    def test_decode_binary_outputs(self) -> None:
        proba = np.array([[0.9, 0.1], [0.2, 0.8]], dtype="<f4")
        doc = {"outputs": [{"name": "predict", "shape": [2], "datatype": "INT64", "data": [0, 1]},
                           {"name": "predict_proba", "shape": [2, 2], "datatype": "FP32"}]}
        body, headers = bt.encode(doc, "outputs", {"predict_proba": proba})
        parsed, raw = bt.decode(body, headers[bt.HEADER], "outputs")
        out = codecs.decode_v2_output(parsed, 2, None, raw)
        assert out.dtype == float and out.flags.writeable
        np.testing.assert_array_equal(out, proba)
        assert codecs.decode_v2_output(parsed, 2, "predict", raw).tolist() == [0, 1]
        text = {"outputs": [{"name": "label", "shape": [1], "datatype": "BYTES"}]}
        body, headers = bt.encode(text, "outputs", {"label": bt.pack_values("BYTES", ["cat"])})
        parsed, raw = bt.decode(body, headers[bt.HEADER], "outputs")
        with pytest.raises(PredictorError, match="'label': binary BYTES data is not numbers"):
            codecs.decode_v2_output(parsed, 1, None, raw)

    def test_decode_body_binary_inputs(self) -> None:
        rows = np.array([[1.0, 2, 3, 4]])
        body, headers = codecs.encode_v2_binary(rows, Schema(IRIS.feature_names, datatype="FP16"))
        doc = codecs.decode_body(body, headers[bt.HEADER])
        assert codecs.decode_instances(doc, IRIS).tolist() == [[1, 2, 3, 4]]
        assert codecs.decode_body(b'{"instances": [[1, 2, 3, 4]]}', None) == {"instances": [[1, 2, 3, 4]]}
        with pytest.raises(InvalidInputError, match="'input-0': binary_data_size 8 runs past the end"):
            codecs.decode_body(body[:-1], headers[bt.HEADER])
        with pytest.raises(InvalidInputError, match="not JSON"):
            codecs.decode_body(b"{", None)

    def test_bf16_binary_and_json(self) -> None:
        """Triton's BF16 (no numpy dtype): binary outputs failed the client ("not one of"), a binary
        input the request; as JSON it is plain numbers in an output, and an input refused (as Triton
        and KServe refuse FP16 in JSON; BF16 is not among the protocol's datatypes)."""
        bits = bt.pack_values("UINT16", [0x3F80, 0xC020, 0x4049, 0x0000])  # 1.0, -2.5, 3.140625, 0.0
        doc = {"outputs": [{"name": "proba", "shape": [2, 2], "datatype": "BF16"}]}
        body, headers = bt.encode(doc, "outputs", {"proba": bits})
        parsed, raw = bt.decode(body, headers[bt.HEADER], "outputs")
        out = codecs.decode_v2_output(parsed, 2, None, raw)
        assert out.dtype == float and out.tolist() == [[1.0, -2.5], [3.140625, 0.0]]
        as_json = {"outputs": [{**doc["outputs"][0], "data": [1.0, -2.5, 3.140625, 0.0]}]}
        assert codecs.decode_v2_output(as_json, 2, None).tolist() == out.tolist()
        body, headers = bt.encode(doc, "outputs", {"proba": bt.pack_values("UINT16", [0x3F80, 0x7FC0, 0x7F80, 0])})
        parsed, raw = bt.decode(body, headers[bt.HEADER], "outputs")
        with pytest.raises(PredictorError, match="non-finite output 'proba'.*2 of 4"):
            codecs.decode_v2_output(parsed, 2, None, raw)

        rows = np.array([[1.0, -2.5, 3.140625, 0.0]])
        body, headers = codecs.encode_v2_binary(rows, Schema(IRIS.feature_names, datatype="BF16"))
        sent, raw = bt.decode(body, headers[bt.HEADER], "inputs")
        assert sent["inputs"][0]["datatype"] == "BF16" and bytes(raw["input-0"]) == bits  # not FP64 (Triton: 400)
        doc = codecs.decode_body(body, headers[bt.HEADER])
        assert doc["inputs"][0]["data"] == [1.0, -2.5, 3.140625, 0.0]
        assert codecs.decode_instances(doc, IRIS).tolist() == rows.tolist()
        as_json = orjson.loads(codecs.encode_v2(rows, Schema(IRIS.feature_names, datatype="BF16")))
        assert as_json["inputs"][0]["datatype"] == "BF16"
        with pytest.raises(InvalidInputError, match="BF16 is taken as binary tensor data only"):  # as Triton
            codecs.decode_instances(as_json, IRIS)

    def test_encode_v2_binary_bf16_rounds_to_the_nearest_even(self) -> None:
        rows = np.array([[1.0 + 2**-8, 1.0 + 3 * 2**-8, np.nan, -np.inf]])
        body, headers = codecs.encode_v2_binary(rows, Schema(IRIS.feature_names, datatype="BF16"))
        _, raw = bt.decode(body, headers[bt.HEADER], "inputs")
        assert bt.unpack_values("UINT16", raw["input-0"])[:2] == [0x3F80, 0x3F82]
        nan, minus_inf = bt.unpack_values("BF16", raw["input-0"])[2:]
        assert np.isnan(nan) and minus_inf == -np.inf

    def test_decode_body_unpacks_only_binary_tensors_within_max_values(self) -> None:
        body, headers = codecs.encode_v2_binary(np.ones((3, 4)), IRIS)
        with pytest.raises(InvalidInputError, match=r"'input-0': 12 values; at most 8 per request"):
            codecs.decode_body(body, headers[bt.HEADER], max_values=8)  # refused before it is unpacked
        assert len(codecs.decode_body(body, headers[bt.HEADER], max_values=12)["inputs"][0]["data"]) == 12

    def test_a_bytes_tensor_past_max_values_is_refused_before_its_elements_are_read(self) -> None:
        """Its elements were all split out first (57 MiB of them held the server ~7 s)."""
        head = b'{"inputs": [{"name": "x", "shape": [3, 4], "datatype": "BYTES", "parameters": {"binary_data_size": 3}}]}'
        with pytest.raises(InvalidInputError, match=r"'x': 12 values; at most 8 per request"):
            codecs.decode_body(head + b"\xff\xff\xff", str(len(head)), max_values=8)  # not even one element

    @pytest.mark.parametrize("body", [
        {"instances": [["x"]] * 3},
        {"inputs": [["x"]] * 3},
        {"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP64", "data": [["x"]] * 3}]},
        {"inputs": [{"name": n, "shape": [3], "datatype": "FP64", "data": ["x"] * 3} for n in IRIS.feature_names]},
    ])
    def test_more_instances_than_allowed_are_refused_before_they_are_read(self, body: object) -> None:
        """6 million rows were converted (seconds on the event loop) before their count was looked at."""
        with pytest.raises(InvalidInputError, match="^3 instances; at most 2 per request$"):
            codecs.decode_instances(body, IRIS, max_rows=2)

    def test_tensor_data_longer_than_its_shape_is_refused_before_it_is_read(self) -> None:
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [["x"]] * 5}]}
        with pytest.raises(InvalidInputError, match="5 values or more for shape"):
            codecs.decode_instances(body, IRIS)

    def test_decode_body_of_a_binary_tensor_field_nested_deep(self) -> None:
        # binary_tensors' message quotes the bad shape: repr of it was a RecursionError (a 500).
        deep = b"[" * 1010 + b"]" * 1010
        head = (b'{"inputs": [{"name": "x", "shape": ' + deep
                + b', "datatype": "FP64", "parameters": {"binary_data_size": 0}}]}')
        with pytest.raises(InvalidInputError, match="nests JSON too deeply to read"):
            codecs.decode_body(head, str(len(head)))

    def test_explain_parameters(self) -> None:
        assert codecs.explain_parameters({"instances": [], "parameters": {"nsamples": 10}}) == {"nsamples": 10}
        v2 = {"inputs": [], "parameters": {"explain_parameters": {"threshold": 0.9}, "other": 1}}
        assert codecs.explain_parameters(v2) == {"threshold": 0.9}
        with pytest.raises(InvalidInputError):
            codecs.explain_parameters({"instances": [], "parameters": [1]})

    def test_explain_parameters_of_tf_style_rows(self) -> None:
        """V1 rows under `inputs` were taken for V2 tensors: their `parameters` were lost."""
        for rows in ([[1, 2, 3, 4]], [{"sl": 1, "sw": 2, "pl": 3, "pw": 4}]):
            assert codecs.explain_parameters({"inputs": rows, "parameters": {"nsamples": 10}}) == {"nsamples": 10}
        tensor = {"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3, 4]}
        v2 = {"inputs": [tensor], "parameters": {"explain_parameters": {"nsamples": 10}, "other": 1}}
        assert codecs.explain_parameters(v2) == {"nsamples": 10}

    def test_v2_explain_parameters_directly_under_parameters(self) -> None:
        """The Open Inference Protocol's parameter values are strings, numbers and booleans (an
        object is none: tritonclient refuses to send one), so an explain parameter's own name
        there was the only way, and it was dropped without a word. The names of `names` are taken;
        the rest of that free-form object is other servers' (binary_data_output, content_type...)."""
        tensor = {"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3, 4]}
        names = {"nsamples", "l1_reg", "max_evals"}
        v2 = {"inputs": [tensor], "parameters": {"nsamples": -5, "max_evals": 7, "binary_data_output": True}}
        assert codecs.explain_parameters(v2, names) == {"nsamples": -5, "max_evals": 7}  # checked by the method
        both = {"inputs": [tensor], "parameters": {"nsamples": 10, "l1_reg": "aic",
                                                   "explain_parameters": {"nsamples": 20}}}
        assert codecs.explain_parameters(both, names) == {"nsamples": 20, "l1_reg": "aic"}
        with pytest.raises(InvalidInputError, match="explain parameters must be a JSON object"):
            codecs.explain_parameters({"inputs": [tensor], "parameters": {"explain_parameters": 5}}, names)


class TestTensorDatatypes:
    """A V2 JSON tensor's `datatype` was never read: "FOO", none, FP16 (binary only, as KServe has
    it) and integers carrying fractions or past their range were all taken as numbers."""

    @staticmethod
    def tensor(**fields: object) -> dict[str, object]:
        return {"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3, 4], **fields}

    @pytest.mark.parametrize("fields, words", [
        ({"datatype": "FOO"}, "inputs (input-0): `datatype` 'FOO' is not one of BOOL, INT8"),
        ({"datatype": None}, "inputs (input-0): `datatype` None is not one of"),
        ({"datatype": "FP16"}, "inputs (input-0): FP16 is taken as binary tensor data only"),
        ({"datatype": "BF16"}, "inputs (input-0): BF16 is taken as binary tensor data only"),
        ({"datatype": "INT64", "data": [6, 2, 5.1, 1]}, "inputs (input-0): INT64 `data` holds 5.1, not an integer"),
        ({"datatype": "INT64", "data": [6, 2, 99999999999999999999999, 1]}, "not an integer in INT64's range"),
        ({"datatype": "UINT8", "data": [6, 2, 256, 1]}, "UINT8 `data` holds 256, not an integer in UINT8's range"),
        ({"datatype": "UINT8", "data": [6, 2, -1, 1]}, "UINT8 `data` holds -1"),
        ({"datatype": "INT32", "data": [6, 2, True, 1]}, "INT32 `data` holds True"),
        ({"datatype": "BOOL", "data": [1, 0, 1, 1]}, "BOOL `data` holds 1, not true or false"),
        ({"datatype": "BOOL", "data": [True, 0, True, True]}, "BOOL `data` holds 0, not true or false"),
    ])
    def test_refused_naming_tensor_and_field(self, fields: dict[str, object], words: str) -> None:
        tensor = self.tensor(**fields)
        if tensor["datatype"] is None:
            del tensor["datatype"]
        with pytest.raises(InvalidInputError) as caught:
            codecs.decode_instances({"inputs": [tensor]}, IRIS)
        assert words in str(caught.value), str(caught.value)

    def test_every_tensor_is_checked_not_only_the_features(self) -> None:
        tensors = [{"name": n, "shape": [1], "datatype": "FP64", "data": [1]} for n in IRIS.feature_names]
        with pytest.raises(InvalidInputError, match=r"inputs \(extra\): `datatype` 'FOO'"):
            codecs.decode_instances({"inputs": [*tensors, {"name": "extra", "shape": [1], "datatype": "FOO",
                                                           "data": [1]}]}, IRIS)

    def test_a_tensor_without_data(self) -> None:
        """Read as a V1 row (no `data`), it was refused for missing features."""
        tensor = self.tensor()
        del tensor["data"]
        with pytest.raises(InvalidInputError, match="tensor 'input-0' has no data"):
            codecs.decode_instances({"inputs": [tensor]}, IRIS)

    def test_rows_with_features_named_name_and_shape_stay_rows(self) -> None:
        """Taken for a tensor without data (a `shape` and a `name`): refused for its datatype."""
        schema = Schema(("name", "shape", "size"), frozenset({"name", "shape"}))
        doc = {"inputs": [{"name": "a", "shape": "circle", "size": 3}]}
        assert codecs.decode_instances(doc, schema).tolist() == [["a", "circle", 3]]

    def test_integers_and_booleans_taken(self) -> None:
        for datatype in ("INT8", "INT64", "UINT8", "UINT64"):
            doc = {"inputs": [self.tensor(datatype=datatype, data=[0, 2, 3, 127])]}
            assert codecs.decode_instances(doc, IRIS).tolist() == [[0, 2, 3, 127]]
        doc = {"inputs": [self.tensor(datatype="BOOL", data=[True, False, True, True])]}
        assert codecs.decode_instances(doc, IRIS).tolist() == [[1, 0, 1, 1]]

    def test_binary_fp16_and_bool_taken(self) -> None:
        for datatype, values, expected in (("FP16", [1.5, 2, 3, 4], [1.5, 2, 3, 4]),
                                           ("BOOL", [True, False, True, True], [1, 0, 1, 1])):
            doc = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": datatype}]}
            body, headers = bt.encode(doc, "inputs", {"input-0": bt.pack_values(datatype, values)})
            decoded = codecs.decode_body(body, headers[bt.HEADER])
            assert codecs.decode_instances(decoded, IRIS).tolist() == [expected]
