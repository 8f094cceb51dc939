"""`python -m gateway [flags]`: the public gRPC gateway process (see gateway/config.py for the flags)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from gateway.config import GatewayConfig
from neoserve import aio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    GatewayConfig.add_cli_args(parser)
    parser.add_argument("--log-level", default=os.environ.get("NEOSERVE_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    if args.api_key is None and os.environ.get("NEOSERVE_API_KEY"):
        args.api_key = os.environ["NEOSERVE_API_KEY"]  # NOTE: env keeps the key out of `ps` output
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s gateway %(levelname)s %(name)s: %(message)s")
    config = GatewayConfig.from_cli_args(args)
    from gateway.server import serve

    aio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
