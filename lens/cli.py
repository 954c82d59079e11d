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

    if not sys.stderr.isatty():  # logs and captured stderr: no "Loading weights" bars before a one-line error
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    cfg = load_config(args.config, args.overrides)
    train(cfg)
    return 0


def _cmd_dump(args: argparse.Namespace) -> int:
    from lens.config import load_config
    from lens.data.dump import dump

    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    cfg = load_config(args.config, args.overrides)
    dump(cfg, args.index, args.count)  # a worker that finishes before the others exits 0 too: its work is done
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lens", description="Train and use consistency lenses.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a lens (alone or under torchrun); resumes from run.dir")
    p.add_argument("config", help="YAML config, e.g. conf/smollm2_135m.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    p.set_defaults(fn=_cmd_train)
    p = sub.add_parser("dump", help="capture activations into shards at data.activations; rerun to resume")
    p.add_argument("config", help="YAML config, e.g. conf/smollm2_135m.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.shard_size=512")
    p.add_argument("--index", type=int, default=None,
                   help="this worker's index (default: $JOB_COMPLETION_INDEX, else 0)")
    p.add_argument("--count", type=int, default=None,
                   help="number of workers (default: $JOB_COMPLETION_COUNT, else 1)")
    p.set_defaults(fn=_cmd_dump)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging()
    from lens.train.preemption import EXIT_CODE, Preempted

    try:
        return args.fn(args)
    except InputError as e:
        print(f"lens {args.command}: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"lens {args.command}: {e}", file=sys.stderr)
        return EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
