"""The committed gRPC stubs match protos/, and the public API follows buf's STANDARD naming rules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from neoserve.internal.v1 import worker_pb2
from neoserve.v1 import inference_service_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_not_stale():
    proc = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _upper_snake(name: str) -> str:
    out = []
    for i, c in enumerate(name):
        if c.isupper() and i:
            out.append("_")
        out.append(c.upper())
    return "".join(out)


def test_buf_style_names():
    for module in (pb, worker_pb2):
        fd = module.DESCRIPTOR
        # PACKAGE_VERSION_SUFFIX and PACKAGE_DIRECTORY_MATCH
        assert fd.package.split(".")[-1] == "v1"
        assert fd.name.startswith(fd.package.replace(".", "/") + "/")
        for enum in fd.enum_types_by_name.values():
            prefix = _upper_snake(enum.name) + "_"
            assert enum.values[0].number == 0 and enum.values[0].name == prefix + "UNSPECIFIED"  # ENUM_ZERO_VALUE_SUFFIX
            assert all(v.name.startswith(prefix) for v in enum.values)  # ENUM_VALUE_PREFIX
        for service in fd.services_by_name.values():
            assert service.name.endswith("Service")  # SERVICE_SUFFIX
            for method in service.methods:  # RPC_REQUEST_STANDARD_NAME / RPC_RESPONSE_STANDARD_NAME
                assert method.input_type.name == method.name + "Request"
                assert method.output_type.name == method.name + "Response"
        for message in fd.message_types_by_name.values():  # FIELD_LOWER_SNAKE_CASE
            assert all(f.name == f.name.lower() for f in message.fields)


def test_public_api_shape():
    svc = pb.DESCRIPTOR.services_by_name["InferenceService"]
    methods = {m.name: m for m in svc.methods}
    assert set(methods) == {"Generate", "Tokenize", "ModelInfo"}
    gen = methods["Generate"]
    assert gen.server_streaming and not gen.client_streaming
    oneof = pb.GenerateRequest.DESCRIPTOR.oneofs_by_name["input"]
    assert {f.name for f in oneof.fields} == {"prompt", "chat", "prompt_token_ids"}
    event = pb.GenerateResponse.DESCRIPTOR.oneofs_by_name["event"]
    assert {f.name for f in event.fields} == {"delta", "complete"}
