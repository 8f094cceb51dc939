"""The `neoserve` command.

    neoserve serve [--model PATH] [--port 50051]     # sidecar + worker + gateway, supervised; Ctrl-C drains and exits
                   [--http-port 8000]                # OpenAI-compatible HTTP API (-1: off)
    neoserve serve --once "Tell me a joke" --chat    # serve, stream one reply to the terminal, exit
    neoserve generate "Once upon a time" [--chat] [--max-tokens N] [--address HOST:PORT]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _add_sampling_args(p: argparse.ArgumentParser, *, seed: bool = True) -> None:
    p.add_argument("--chat", action="store_true", help="send the text as a user chat message (chat template)")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the server's)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: the server's)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (default: all)")
    if seed:  # NOTE: `serve` has the engine's --seed already (the default seed of unseeded requests)
        p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the server's)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _stream_reply(address: str, text: str, args, *, api_key: str | None, tls: bool = False) -> int:
    import grpc

    from neoserve.client import Client

    sampling = {"max_tokens": args.max_tokens, "stop": args.stop}
    for name in ("temperature", "top_p", "top_k", "seed"):
        if name == "seed" and args.command == "serve":
            continue
        if getattr(args, name) is not None:
            sampling[name] = getattr(args, name)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": text})
        kwargs = {"messages": messages}
    else:
        kwargs = {"prompt": text}
    out = sys.stdout
    try:
        last = None
        with Client(address, api_key=api_key, tls=tls) as client:
            for chunk in client.generate(**kwargs, **sampling):
                if chunk.text:
                    out.write(chunk.text)
                    out.flush()
                last = chunk
    except grpc.RpcError as e:
        if last is not None:  # NOTE: end the partial reply's line; a reply that never began has none
            out.write("\n")
        if e.code() == grpc.StatusCode.UNAVAILABLE and last is None and args.command == "generate":
            # NOTE: nothing answered at all (no reply chunk came): most likely no server runs there yet.
            print(f"neoserve: no neoserve server at {address} ({e.details()}).\n"
                  f"  start one with:  neoserve serve\n"
                  f"  or point at one: neoserve generate --address HOST:PORT ... (or env NEOSERVE_ADDRESS)",
                  file=sys.stderr)
        else:
            print(f"neoserve: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        out.write("\n")
        return 130
    out.write("\n")
    if last is not None and last.usage is not None:
        print(f"[{last.finish_reason}; {last.usage.prompt_tokens} prompt + {last.usage.completion_tokens} "
              f"completion tokens]", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    return _stream_reply(args.address, args.text, args, api_key=args.api_key or os.environ.get("NEOSERVE_API_KEY"),
                         tls=args.tls)


def cmd_serve(args) -> int:
    from gateway.launcher import Launcher, ServeConfig, install_signal_handlers
    from gpu_worker.config import EngineConfig

    logging.basicConfig(level=logging.WARNING if args.once else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    serve_config = ServeConfig.from_cli_args(args)
    if args.once is not None:
        serve_config.http_port = -1  # NOTE: one reply over gRPC: no HTTP port to open (or collide on)
    engine_config = EngineConfig.from_cli_args(args)
    if args.once is not None and engine_config.compile == "auto":
        # NOTE: one reply, then exit: a background compile would only take a core from that reply.
        engine_config.compile = "off"
    if engine_config.threads is not None:  # the launcher passes --threads from its CPU plan; an explicit one wins
        serve_config.worker_threads = engine_config.threads
        engine_config.threads = None
    engine_argv = engine_config.to_cli_args()
    launcher = Launcher(serve_config, engine_argv, engine_model=engine_config.model, engine_mode=engine_config.mode,
                        engine_device=engine_config.device, engine_cpu_kv_gib=engine_config.cpu_kv_gib,
                        quiet=args.once is not None)
    install_signal_handlers(launcher)
    code = 1
    try:
        if not launcher.start():
            return 1 if not launcher._stop.is_set() else 0
        if args.once is not None:
            code = _stream_reply(launcher.address, args.once, args,
                                 api_key=serve_config.api_key or os.environ.get("NEOSERVE_API_KEY"),
                                 tls=serve_config.tls_cert is not None)
        else:
            metrics = (f"; metrics at http://{serve_config.host}:{launcher.metrics_port}/metrics"
                       if launcher.metrics_port else "")
            http = (f"\n  OpenAI-compatible HTTP API at {launcher.http_url} (the base_url for OpenAI SDKs)"
                    if launcher.http_url else "")
            print(f"neoserve: serving on {launcher.address} (gRPC, neoserve.v1.InferenceService){metrics}{http}\n"
                  f"  try:  neoserve generate --address {launcher.address} --chat \"Hello!\"\n"
                  f"  stop: Ctrl-C", flush=True)
            code = launcher.run_until_stopped()
    finally:
        launcher.shutdown()
    return code


def build_parser() -> argparse.ArgumentParser:
    from gateway.launcher import ServeConfig
    from gpu_worker.config import EngineConfig

    parser = argparse.ArgumentParser(prog="neoserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server (sidecar, worker, gateway) until Ctrl-C")
    EngineConfig.add_cli_args(serve)
    ServeConfig.add_cli_args(serve)
    serve.add_argument("--once", metavar="PROMPT", default=None,
                       help="stream one reply to PROMPT to the terminal, then shut down")
    _add_sampling_args(serve, seed=False)
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="stream a reply from a running server")
    gen.add_argument("text", help="the prompt (with --chat: the user message)")
    gen.add_argument("--address", default=os.environ.get("NEOSERVE_ADDRESS", "127.0.0.1:50051"),
                     help="the server's gRPC address (default: env NEOSERVE_ADDRESS, else %(default)s)")
    gen.add_argument("--api-key", default=None, help="API key (default: env NEOSERVE_API_KEY)")
    gen.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    for name, (_, text) in TOOLS.items():
        sub.add_parser(name, help=text, add_help=False)  # NOTE: listed here; main() hands them their own argv
    return parser


# Subcommands that parse their own flags (`neoserve probe --help`): name -> (module with main(argv), help).
TOOLS = {
    "probe": ("gpu_worker.probe", "measure this host (memory and CPU attention bandwidth, hand-off cost, device) "
                                  "into host.json, for plan"),
    "plan": ("gpu_worker.sim.__main__", "simulate gpu-only vs auto vs cpu-all for a model, a host profile or "
                                        "preset and a workload, before deploying"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:
        import importlib

        return importlib.import_module(TOOLS[argv[0]][0]).main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)
