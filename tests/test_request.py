import json

import pytest

from llmserve.config import EngineConfig
from llmserve.exchange import error_json
from llmserve.request import RequestError, parse_request

CONFIG = EngineConfig(model_path="m", max_model_len=64, max_new_tokens_cap=32, default_max_new_tokens=8)


class FakeTokenizer:
    """One token per character (ids below 1000); the chat template joins role: content lines."""

    def __len__(self):
        return 1000

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 1000 for c in text]}

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, return_dict):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return self(text)


def parse(body):
    return parse_request("r1", body, CONFIG, FakeTokenizer())


def field_of(body) -> str:
    with pytest.raises(RequestError) as e:
        parse(body)
    assert json.loads(error_json(False, e.value.status, e.value.message, e.value.field))["error"]
    return e.value.field


def test_defaults():
    r = parse({"prompt": "hello"})
    assert r.prompt_ids == [ord(c) for c in "hello"]
    assert r.params.max_new_tokens == 8 and r.params.is_greedy and r.params.top_p == 1.0
    assert not r.stream


def test_raw_bytes_and_chat():
    r = parse(b'{"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 3, "stop": "x"}')
    assert r.params.max_new_tokens == 3 and r.params.stop == ("x",)
    assert len(r.prompt_ids) == len("user: hi\nassistant: ")


def test_all_sampling_params():
    r = parse({"prompt": "a", "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 3, "stop": ["a", "b"],
               "stream": True, "presence_penalty": -2, "frequency_penalty": 0.5, "repetition_penalty": 1.2})
    p = r.params
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed, p.stop) == (0.7, 0.9, 40, 0.05, 3, ("a", "b")) and r.stream
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (-2, 0.5, 1.2) and p.adjusts_logits
    assert not parse({"prompt": "a", "presence_penalty": 0, "repetition_penalty": 1, "logit_bias": {}}).params.adjusts_logits
    assert parse({"prompt": "a", "logit_bias": {"7": 5, "3": -100.0}}).params.logit_bias == ((3, -100.0), (7, 5.0))
    assert parse({"prompt": "a", "stop_token_ids": [9, 2, 9]}).params.stop_token_ids == (2, 9)
    assert parse({"prompt": "a", "response_format": {"type": "json_object"}}).params.response_schema == "null"
    assert parse({"prompt": "a", "response_format": {"type": "text"}}).params.response_schema is None
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    assert parse({"prompt": "a", "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema}}}).params.response_schema == json.dumps(schema)


@pytest.mark.parametrize("body,field", [
    (b"", "body"),
    (b"   ", "body"),
    (b"{not json", "body"),
    (b"\xff\xfe", "body"),
    ([1, 2], "body"),
    ({}, "prompt"),
    ({"prompt": "a", "messages": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "a", "colour": 1}, "colour"),
    ({"prompt": "a", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "a", "max_new_tokens": -3}, "max_new_tokens"),
    ({"prompt": "a", "max_new_tokens": 33}, "max_new_tokens"),
    ({"prompt": "a", "max_new_tokens": "5"}, "max_new_tokens"),
    ({"prompt": "a", "max_new_tokens": 2.5}, "max_new_tokens"),
    ({"prompt": "a", "max_new_tokens": True}, "max_new_tokens"),
    ({"prompt": "a", "temperature": -0.1}, "temperature"),
    ({"prompt": "a", "temperature": "hot"}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "top_k": -1}, "top_k"),
    ({"prompt": "a", "min_p": 1.5}, "min_p"),
    ({"prompt": "a", "min_p": -0.1}, "min_p"),
    ({"prompt": "a", "seed": "x"}, "seed"),
    ({"prompt": "a", "stop": [1]}, "stop"),
    ({"prompt": "a", "stop": [""]}, "stop"),
    ({"prompt": "a", "stream": "yes"}, "stream"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages"),
    ({"prompt": "x" * 64}, "prompt"),
    ({"prompt": "x" * 60, "max_new_tokens": 10}, "max_new_tokens"),
    # text JSON can carry but UTF-8 cannot: lone surrogates, in every text field
    ("\ud800", "body"),
    ({"prompt": "ok \ud800"}, "prompt"),
    ({"messages": [{"role": "user", "content": "\udfff"}]}, "messages"),
    ({"prompt": "a", "stop": ["x", "\udc00\ud800"]}, "stop"),
    ({"prompt": "a", "top_k": 2**40}, "top_k"),
    ({"prompt": "a", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "a", "frequency_penalty": -2.01}, "frequency_penalty"),
    ({"prompt": "a", "frequency_penalty": "high"}, "frequency_penalty"),
    ({"prompt": "a", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "a", "repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"prompt": "a", "stop_token_ids": 5}, "stop_token_ids"),
    ({"prompt": "a", "stop_token_ids": [1000]}, "stop_token_ids"),
    ({"prompt": "a", "stop_token_ids": [True]}, "stop_token_ids"),
    ({"prompt": "a", "stop_token_ids": list(range(65))}, "stop_token_ids"),
    ({"prompt": "a", "logit_bias": [1]}, "logit_bias"),
    ({"prompt": "a", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"prompt": "a", "logit_bias": {"-1": 1}}, "logit_bias"),
    ({"prompt": "a", "logit_bias": {"\u0665": 1}}, "logit_bias"),     # a digit to str.isdigit, not a token id
    ({"prompt": "a", "logit_bias": {"1000": 1}}, "logit_bias"),
    ({"prompt": "a", "logit_bias": {"5": 100.5}}, "logit_bias"),
    ({"prompt": "a", "logit_bias": {"5": True}}, "logit_bias"),
    ({"prompt": "a", "logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    ({"messages": [{"role": ["user"], "content": "x"}]}, "messages"),
    (b"[" * 100000 + b"]" * 100000, "body"),
    ({"prompt": "a", "prediction": 5}, "prediction"),
    ({"prompt": "a", "prediction": "x" * 65}, "prediction"),
    ({"prompt": "a", "prediction": "\ud800"}, "prediction"),
    ({"prompt": "a", "response_format": "json"}, "response_format"),
    ({"prompt": "a", "response_format": {"type": "json_object", "strict": True}}, "response_format"),
    ({"prompt": "a", "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"prompt": "a", "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/b"}}}}}}, "response_format"),
])
def test_bad_input_names_the_field(body, field):
    assert field_of(body) == field


def test_a_prediction_is_tokenized_as_output_text():
    assert parse({"prompt": "a", "prediction": "bc"}).prediction_ids == [98, 99]
    assert parse({"prompt": "a"}).prediction_ids == []


def test_unknown_field_named_even_if_not_encodable():
    with pytest.raises(RequestError) as e:
        parse({"prompt": "a", "\ud800x": 1})
    assert e.value.field == "\\ud800x"
    (e.value.field + e.value.message).encode("utf-8")   # what the error body carries is encodable


def test_tiny_temperature_is_greedy():
    assert parse({"prompt": "a", "temperature": 1e-300}).params.is_greedy
    assert not parse({"prompt": "a", "temperature": 0.01}).params.is_greedy
