"""The `neoserve` command as a new user meets it: its --help, its messages, the model id clients type."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys

import pytest

from tests.live_server import PROJECT_ROOT


def _subparser(name: str):
    from cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")  # NOTE: argparse keeps subparsers only here
    return sub.choices[name]


def test_help_states_each_default_once():
    """--help once printed "(default: the model's, at most 8192) (default: None)": each flag's help names its default
    at most once, and never as Python's None."""
    for command in ("serve", "generate"):
        for action in _subparser(command)._actions:
            text = (action.help or "") % {"default": action.default}  # NOTE: argparse expands %(default)s likewise
            assert text.lower().count("default") <= 1, (command, action.option_strings, text)
            assert "(default: None)" not in text, (command, action.option_strings, text)


def test_launcher_says_once_not_1_times(caplog):
    """Children that exit with no restarts left: "exited (code 3) once", not "1 times"."""
    import re

    from gateway.launcher import Launcher, ServeConfig

    launcher = Launcher(ServeConfig(port=0, metrics_port=-1, max_restarts=0), [], engine_model=None,
                        engine_mode="gpu-only", engine_device="cpu")
    try:
        for child in launcher.children:
            child.spec.argv = [sys.executable, "-c", "raise SystemExit(3)"]
            child.start()
        for child in launcher.children:
            child.wait(30)
        with caplog.at_level(logging.ERROR):
            assert not launcher.supervise_once()
    finally:
        for child in launcher.children:
            child.kill()
            child.wait(10)
        shutil.rmtree(launcher.run_dir, ignore_errors=True)
    assert re.search(r"\b(sidecar|worker|gateway) exited \(code 3\) once\b", caplog.text), caplog.text
    assert " 1 times" not in caplog.text, caplog.text


def test_generate_without_a_server_says_how_to_start_one():
    with socket.socket() as s:  # NOTE: a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "cli", "generate", "--address", f"127.0.0.1:{port}", "hello"],
                          capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT)
    assert proc.returncode == 1, proc
    assert f"no neoserve server at 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "neoserve serve" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


# --- the model id clients type ----------------------------------------------------------------------------------------

def test_model_id_is_a_slug_a_client_can_type(tmp_path):
    from neoserve.model_files import model_id

    assert model_id(None) == model_id("embedded") == "smollm2-135m-instruct"
    assert model_id("/models/Llama-3.2-1B-Instruct-Q4_K_M.gguf") == "llama-3.2-1b-instruct-q4_k_m"
    folder = tmp_path / "Qwen2.5 0.5B Instruct"
    folder.mkdir()
    assert model_id(str(folder) + "/") == "qwen2.5-0.5b-instruct"
    assert model_id("random:llama-3-8b") == "random-llama-3-8b"


def test_worker_reports_the_stable_model_id():
    """The worker's Info (what gRPC ModelInfo and OpenAI /v1/models name the model by) once reported the GGUF's
    general.name, "Smollm2 135M 8k Lc100K Mix1 Ep2"."""
    import asyncio
    from types import SimpleNamespace

    from gpu_worker.config import EngineConfig
    from gpu_worker.server import WorkerServicer

    config = SimpleNamespace(name="Smollm2 135M 8k Lc100K Mix1 Ep2", architecture="llama", vocab_size=49152,
                             eos_token_ids=[2])
    engine = SimpleNamespace(model_config=config, max_model_len=8192)
    info = asyncio.run(WorkerServicer(EngineConfig(device="cpu"), engine).Info(None, None))
    assert info.model_id == "smollm2-135m-instruct"
    assert info.model_spec == ""


@pytest.mark.parametrize("tool", ["probe", "plan"])
def test_probe_and_plan_are_subcommands_with_their_own_flags(tool, capsys):
    from cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main([tool, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: neoserve {tool}" in capsys.readouterr().out
