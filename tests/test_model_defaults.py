"""Sampling fields a request leaves unset come from the model's own generation defaults (generation_config.json,
GGUF general.sampling.*, SmolLM2's model card for the embedded model); fields it sets win."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from neoserve.errors import ModelLoadError
from neoserve.model_defaults import SMOLLM2_MODEL_CARD, load_generation_defaults
from neoserve.sampling_params import NEUTRAL_DEFAULTS, GenerationDefaults, SamplingParams, resolve
from neoserve.v1 import inference_service_pb2 as pb
from neoserve.v1 import inference_service_pb2_grpc as pb_grpc
from tests.gateway_harness import GatewayHarness


def _fields(d: GenerationDefaults) -> dict:
    return d.sampling_fields()


def test_embedded_model_uses_its_model_card():
    assert _fields(load_generation_defaults(None)) == _fields(load_generation_defaults("embedded")) == {
        "temperature": 0.2, "top_p": 0.9, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
    assert load_generation_defaults("random:smollm2-135m") == NEUTRAL_DEFAULTS


def test_hf_generation_config(tmp_path):
    assert load_generation_defaults(str(tmp_path)) == NEUTRAL_DEFAULTS  # a folder without one
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "bos_token_id": 1}))
    d = load_generation_defaults(str(tmp_path))
    assert (d.temperature, d.top_p, d.top_k, d.min_p) == (0.6, 0.95, 20, 0.0)
    assert "generation_config.json" in d.source
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert load_generation_defaults(str(tmp_path)).temperature == 0.0  # greedy, as transformers decodes it
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 5}))
    with pytest.raises(ModelLoadError, match="top_p"):
        load_generation_defaults(str(tmp_path))


def test_gguf_sampling_metadata(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_float32("general.sampling.temp", 0.7)
    writer.add_int32("general.sampling.top_k", 40)
    writer.add_tensor("x", np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    d = load_generation_defaults(str(path))
    assert (round(d.temperature, 5), d.top_k, d.top_p) == (0.7, 40, 1.0)


def test_request_values_win_over_the_model_defaults():
    card = SMOLLM2_MODEL_CARD
    assert resolve({}, card) == SamplingParams(temperature=0.2, top_p=0.9)
    assert resolve({"temperature": 0.0, "top_k": 5, "top_p": None}, card) == SamplingParams(
        temperature=0.0, top_k=5, top_p=0.9)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    h = GatewayHarness(tmp_path_factory.mktemp("gw"))
    yield h
    h.close()


def test_both_apis_send_the_worker_the_model_defaults_unless_the_request_sets_them(harness):
    sent = harness.worker.starts
    assert harness.post_json("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 2})[0] == 200
    assert harness.post_json("/v1/completions", {"prompt": "hi", "temperature": 0.7})[0] == 200
    with grpc.insecure_channel(harness.grpc_address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        list(stub.Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParameters(max_tokens=2)), timeout=30))
        list(stub.Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParameters(max_tokens=2, top_p=0.5)),
                           timeout=30))
    got = [(round(s.params.temperature, 4), round(s.params.top_p, 4)) for s in sent[-4:]]
    assert got == [(0.2, 0.9), (0.7, 0.9), (0.2, 0.9), (0.2, 0.5)]
