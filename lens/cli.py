"""`lens` command line: parse, compose and validate the config, call one function, map the outcome to an exit code.

Exit codes: 0 done; 2 bad input (config, arguments, data); anything else is a retryable failure (the cluster
restarts the pod and training resumes from the newest checkpoint).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lens.errors import InputError


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if rank == 0 else logging.WARNING  # one copy of each line in `kubectl logs`
    logging.basicConfig(level=level, stream=sys.stdout, force=True,
                        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    for noisy in ("httpx", "urllib3", "botocore", "transformers", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_train(args: argparse.Namespace) -> int:
    from lens.config import load_config
    from lens.train.loop import train

    cfg = load_config(args.config, args.overrides)
    train(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lens", description="Train and use consistency lenses.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a lens (alone or under torchrun); resumes from run.dir")
    p.add_argument("config", help="YAML config, e.g. conf/smollm2_135m.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    p.set_defaults(fn=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        return args.fn(args)
    except InputError as e:
        print(f"lens {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
