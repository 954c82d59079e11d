"""`lens` command line: parse, compose and validate the config, call one function, map the outcome to an exit code.

Exit codes (`lens.errors`): 0 done; 2 bad input (config, arguments, data), reported in one line on stderr before
any work or write; 128 and above a fault that may pass (the cluster restarts the pod and training resumes from the
newest checkpoint): 128 an error that outlasted its retries, 128 + N a signal (143 SIGTERM, 130 SIGINT).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from lens.agent import stop_agent
from lens.errors import EXIT_INPUT, EXIT_RETRYABLE, InputError, RetryableError

if TYPE_CHECKING:
    from lens.explain import TextExplanation


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

    _quiet_hf_progress()
    cfg = load_config(args.config, args.overrides)
    train(cfg)
    return 0


def _cmd_torchrun(args: argparse.Namespace) -> int:
    from lens.agent import run

    return run(args.torchrun_args)


def _cmd_dump(args: argparse.Namespace) -> int:
    from lens.config import load_config
    from lens.data.dump import dump

    _quiet_hf_progress()
    cfg = load_config(args.config, args.overrides)
    dump(cfg, args.index, args.count)  # a worker that finishes before the others exits 0 too: its work is done
    return 0


def _quiet_hf_progress() -> None:
    if not sys.stderr.isatty():  # logs and captured stderr: no "Loading weights" bars before a one-line error
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from lens.inference import evaluate_lens, load_lens
    from lens.tracking import make_tracker, run_files_dir

    if args.samples is not None and args.samples < 1:
        raise InputError(f"--samples: {args.samples} is invalid; expected an integer >= 1 (held-out samples), or "
                         "leave it out for the run's train.eval_samples")
    if args.json:
        check_output_file(args.json, "--json")
    _quiet_hf_progress()
    lens = load_lens(args.run, args.endpoint_url)
    metrics = evaluate_lens(lens, args.data, args.samples)
    step = lens.checkpoint.step
    print(format_eval_table(metrics, f"{lens.checkpoint.uri} (step {step})"))
    if args.json:
        write_output_file(args.json, "--json", json.dumps({"checkpoint": lens.checkpoint.uri, "step": step,
                                                           "data": args.data or "run", **metrics}, indent=1))
    if not args.no_wandb:  # the W&B run of this lens (same id) gets the numbers in its summary
        cfg = lens.cfg
        tracker = make_tracker(cfg.wandb.project, cfg.wandb.entity, cfg.run.name, cfg.wandb.mode, {},
                               dir=run_files_dir(cfg.run.dir), jsonl=False)
        tracker.summary({"eval/step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
        tracker.finish()
    return 0


def format_eval_table(metrics: dict[str, float], title: str) -> str:
    """The lens next to its baselines: one row each, FVE on unit-normalised vectors / cosine / variance recovered /
    normalised MSE / functional KL."""
    rows = [("lens", ""), ("current token only", "baseline_token/"), ("mean", "baseline_mean/"),
            ("zero", "baseline_zero/")]
    lines = [title, f"{'':<20}{'fve_nrm':>10}{'cosine':>10}{'var. recovered':>16}{'norm. MSE':>12}{'KL (nats)':>12}"]
    for label, prefix in rows:
        lines.append(f"{label:<20}{metrics[prefix + 'fve_nrm']:>10.4f}{metrics[prefix + 'cosine']:>10.4f}"
                     f"{metrics[prefix + 'variance_recovered']:>16.4f}{metrics[prefix + 'nmse']:>12.4f}"
                     f"{metrics[prefix + 'kl']:>12.4f}")
    return "\n".join(lines)


def _cmd_explain(args: argparse.Namespace) -> int:
    from lens.explain import check_request, explain
    from lens.inference import load_lens

    check_request(args.text, args.best_of)  # before the slow load
    if args.html:
        check_output_file(args.html, "--html")
    _quiet_hf_progress()
    lens = load_lens(args.run, args.endpoint_url)
    report = explain(lens, args.text, args.best_of)
    print(format_explain_table(report))
    if args.html:
        from lens.html_report import render

        write_output_file(args.html, "--html", render(report))
        print(f"wrote {args.html}")
    return 0


def check_output_file(path: str, flag: str) -> None:
    """Fail now, before the model loads, if `path` cannot be written: create and remove a scratch file beside it
    (the only test that also holds for root and for read-only mounts)."""
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{flag} {path}: is a directory; expected a file path")
    folder = target.parent
    if not folder.is_dir():
        raise InputError(f"{flag} {path}: the folder {str(folder)!r} does not exist; create it or choose another path")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{target.name}.", suffix=".check"):
            pass
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot write in {str(folder)!r} ({e.strerror}); choose a writable "
                         "path") from None


def write_output_file(path: str, flag: str, text: str) -> None:
    """Write `text` to `path` atomically (the local storage's fsynced write-then-rename): a failed write leaves any
    older file whole."""
    from lens.storage import LocalStorage

    target = Path(path)
    try:
        LocalStorage(target.parent).write_bytes(target.name, text.encode())
    except OSError as e:
        raise InputError(f"{flag} {path}: writing failed ({e.strerror}); free space or choose another path") \
            from None


def format_explain_table(report: TextExplanation) -> str:
    """One row per explained token: position, token, nMSE, KL, explanation and each explanation token's salience.
    Tokens are shown as Python literals, so spaces, newlines and empty tokens stay visible."""
    width = min(40, max(len(repr(r.explanation)) for r in report.records))
    lines = [f"{report.checkpoint} (step {report.step}) | {report.model} layer {report.layer} | best of "
             f"{report.best_of}"]
    if report.first_explained > 0:
        lines.append(f"positions 0-{report.first_explained - 1} are not explained (BOS and data.min_pos: training "
                     "never explains them)")
    lines.append(f"{'pos':>4}  {'token':<14}{'nMSE':>7}{'KL':>8}  {'explanation':<{width}}  "
                 "salience (nMSE rise when blanked)")
    for r in report.records:
        token = _clip(repr(r.token), 13)
        pos = f"{r.position}{'*' if r.beyond_training_context else ''}"
        explanation = _clip(repr(r.explanation), width)
        lines.append(f"{pos:>4}  {token:<14}{r.nmse:>7.3f}{r.kl:>8.4f}  {explanation:<{width}}  "
                     + " ".join(f"{s:+.3f}" for s in r.salience))
    if any(r.beyond_training_context for r in report.records):
        lines.append(f"* at or past data.seq_len={report.train_seq_len}: longer than any training context")
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


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
    # A Slurm step's tasks get their slot from srun; an Indexed Job's pods from the environment (worker_slot).
    p.add_argument("--index", type=int, default=os.environ.get("SLURM_PROCID"),
                   help="this worker's index (default: $SLURM_PROCID, else $JOB_COMPLETION_INDEX, else 0)")
    p.add_argument("--count", type=int, default=os.environ.get("SLURM_NTASKS"),
                   help="number of workers (default: $SLURM_NTASKS, else $JOB_COMPLETION_COUNT, else 1)")
    p.set_defaults(fn=_cmd_dump)
    p = sub.add_parser("torchrun", help="torchrun ARGS, keeping exit 2 for bad input (what a cluster pod runs)",
                       description="Run `torchrun ARGS` in this process: a `lens train|dump` config is validated "
                       "before any worker starts; a worker's exit 2 stops torchrun and exits 2 (no restarts); other "
                       "failures exit 128 or above (retryable). Example: lens torchrun --nproc-per-node 2 "
                       "--no-python lens train conf/smollm2_135m.yaml")
    p.add_argument("torchrun_args", nargs=argparse.REMAINDER, help="torchrun's arguments and entrypoint")
    p.set_defaults(fn=_cmd_torchrun)
    p = sub.add_parser("eval", help="held-out metrics of a trained lens next to the zero / mean / token baselines")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT",
                   help="run directory (its newest committed checkpoint) or checkpoint folder; local or s3://")
    p.add_argument("--data", metavar="URI", default=None,
                   help="held-out data other than the run's own: an activation dump (folder or s3:// prefix) "
                        "or a corpus as in data.corpus")
    p.add_argument("--samples", type=int, default=None, help="held-out samples (default: the run's "
                                                              "train.eval_samples, the set training evaluated on)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the metrics as JSON")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)")
    p.add_argument("--no-wandb", action="store_true", help="do not write the metrics to the W&B run's summary")
    p.set_defaults(fn=_cmd_eval)
    p = sub.add_parser("explain", help="explain every token of a text with a trained lens; scores, salience, HTML")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT",
                   help="run directory (its newest committed checkpoint) or checkpoint folder; local or s3://")
    p.add_argument("text", help="the text whose tokens to explain")
    p.add_argument("--best-of", metavar="K", type=int, default=1,
                   help="sample K explanations per token and keep the lowest-MSE one (default 1: the training-style "
                        "forward)")
    p.add_argument("--html", metavar="FILE", default=None, help="also write a self-contained HTML page")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)")
    p.set_defaults(fn=_cmd_explain)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["torchrun"] and argv[1:2] not in (["-h"], ["--help"]):  # all of the rest is torchrun's
        args = argparse.Namespace(command="torchrun", fn=_cmd_torchrun, torchrun_args=argv[1:])
    else:
        args = parser.parse_args(argv)  # a bad argument: argparse's usage line and exit 2
    _setup_logging()
    try:
        return args.fn(args)
    except InputError as e:
        report_input_error(f"lens {args.command}: {e}")
        return EXIT_INPUT
    except RetryableError as e:  # also a preemption (lens.train.preemption.Preempted), with its 128 + signal
        print(f"lens {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C: abort at once, the last checkpoint stays the resume point
        print(f"lens {args.command}: interrupted; the next start resumes from the newest checkpoint", file=sys.stderr)
        return 128 + 2
    except Exception:  # anything else may pass (an outage that outlasted its retries, a lost peer): retryable
        traceback.print_exc()
        print(f"lens {args.command}: failed (exit {EXIT_RETRYABLE}, retryable); the next start resumes from the "
              "newest checkpoint", file=sys.stderr)
        return EXIT_RETRYABLE


def run() -> NoReturn:
    """The `lens` command: `main()`, then exit with its code; a command that may have run a process group (it
    imported lens.train.dist) leaves through `lens.train.dist.exit_process`, which says why."""
    code = main()
    if "lens.train.dist" in sys.modules:
        from lens.train.dist import exit_process

        exit_process(code)
    sys.exit(code)


def report_input_error(line: str) -> None:
    """The one stderr line of an exit 2; under `lens torchrun` also handed to the agent (`LENS_INPUT_ERROR_FILE`),
    which this stops: it then exits 2 at once instead of restarting workers that will fail again."""
    line = " ".join(line.split())
    print(line, file=sys.stderr)
    marker = os.environ.get("LENS_INPUT_ERROR_FILE")
    if not marker:
        return
    try:
        with open(marker, "x") as f:  # the first rank's line wins; that rank stops the agent
            f.write(line + "\n")
    except OSError:
        return
    stop_agent()


if __name__ == "__main__":
    run()
