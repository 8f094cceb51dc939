"""The Node.js client (clients/node, stubs generated at run time from protos/) streams a reply from the real server.

Installs its npm dependencies from the lockfile (`npm ci`) when node_modules is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from neoserve.v1 import inference_service_pb2 as pb
from neoserve.v1 import inference_service_pb2_grpc as pb_grpc

pytest_plugins = ["tests.live_server"]
pytestmark = pytest.mark.slow

NODE_DIR = Path(__file__).resolve().parent.parent / "clients" / "node"


@pytest.fixture(scope="module")
def node_client_dir():
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "Node.js and npm are required for this test (apt-get install nodejs npm)"
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=600)
    return NODE_DIR


def python_reply(address: str, content: str, max_tokens: int) -> str:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        request = pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=content)]),
                                     sampling=pb.SamplingParameters(max_tokens=max_tokens, temperature=0))
        return "".join(r.delta.text for r in stub.Generate(request, timeout=60) if r.HasField("delta"))


def test_node_example_streams_a_reply(neoserve_server, node_client_dir):
    content = "Name three colors."
    proc = subprocess.run(
        ["node", "examples/stream.js", "--address", neoserve_server.address, "--chat", "--max-tokens", "20",
         "--temperature", "0", content],
        cwd=node_client_dir, capture_output=True, text=True, timeout=120, env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    expected = python_reply(neoserve_server.address, content, 20)
    assert expected and proc.stdout == expected
    assert "completion tokens]" in proc.stderr and ("FINISH_REASON_STOP" in proc.stderr or
                                                    "FINISH_REASON_LENGTH" in proc.stderr)


def test_node_client_reports_status_codes(neoserve_server, node_client_dir):
    script = """
const { createClient, generate, modelInfo } = require('.');
(async () => {
  const client = createClient(process.argv[1]);
  const info = await modelInfo(client);
  console.log(info.architecture, info.vocab_size);
  try {
    for await (const _ of generate(client, { prompt: 'hi' }, { topP: 2 })) {}
  } catch (err) { console.log(err.code, err.details); }
  client.close();
})();
"""
    proc = subprocess.run(["node", "-e", script, neoserve_server.address], cwd=node_client_dir, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "llama 49152"
    assert lines[1].startswith("3 top_p:")  # 3 = INVALID_ARGUMENT
