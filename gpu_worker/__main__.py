"""`python -m gpu_worker [--listen ADDR] [engine flags]`: the worker process (model, KV cache, scheduler)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from gpu_worker.config import EngineConfig
from gpu_worker.server import WorkerServerConfig
from neoserve import aio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpu_worker", description=__doc__)
    WorkerServerConfig.add_cli_args(parser)
    EngineConfig.add_cli_args(parser)
    parser.add_argument("--log-level", default=os.environ.get("NEOSERVE_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s worker %(levelname)s %(name)s: %(message)s")
    engine_config = EngineConfig.from_cli_args(args)
    if engine_config.threads is not None:
        # NOTE: explicit thread counts: the launcher pins each process to its own cores, and OpenMP's default of
        # one thread per visible core would oversubscribe them.
        import torch

        torch.set_num_threads(engine_config.threads)
        torch.set_num_interop_threads(1)
    config = WorkerServerConfig(listen=args.listen, port_file=args.port_file, engine=engine_config)
    from gpu_worker.server import serve

    aio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
