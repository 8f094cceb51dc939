"""Shared fixtures: the embedded model, loaded once per test session where tests share it."""

from __future__ import annotations

import os

import pytest

# NOTE: 2-core machines: one torch thread per test process keeps parallel helpers (sidecar, servers) from
# oversubscribing the cores. Tests that measure nothing do not need more.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# NOTE: servers and engines the tests start serve eagerly: a background torch.compile of the decode step costs
# minutes of a 2-core machine. tests/test_compiled_decode.py compiles on purpose (compile="on").
os.environ.setdefault("NEOSERVE_COMPILE", "off")


@pytest.fixture(scope="session")
def embedded_gguf():
    from neoserve.model_files import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def hf_model(embedded_gguf):
    """transformers' own loading of the embedded GGUF: the reference for the model's numbers."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(embedded_gguf.parent), gguf_file=embedded_gguf.name,
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    from neoserve.tokenizer import Tokenizer

    return Tokenizer.load(None)


# The "full" tier: end-to-end runs that repeat what cheaper tests in the default run already cover, at several
# minutes each (a second real replica set, the prefix cache through every mode's engine). They run with
# NEOSERVE_FULL_TESTS=1 (`NEOSERVE_FULL_TESTS=1 bash scripts/test.sh`); the default run stays inside CI's 20 minutes
# on 2 cores.
FULL_TESTS = os.environ.get("NEOSERVE_FULL_TESTS") == "1"


def pytest_collection_modifyitems(config, items):
    if FULL_TESTS:
        return
    skip = pytest.mark.skip(reason="full tier: set NEOSERVE_FULL_TESTS=1 to run it")
    for item in items:
        if "full" in item.keywords:
            item.add_marker(skip)
