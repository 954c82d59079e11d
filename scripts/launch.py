#!/usr/bin/env python
"""Launch a consistency-lens run on Kubernetes (Helm chart helm/consistency-lens, Kubeflow PyTorchJob).

    python scripts/launch.py CONFIG [key=value ...] [--dry-run | --local [--workers N]] [-n NS] [-f VALUES.yaml]
                             [--values-out F]
    python scripts/launch.py CONFIG [key=value ...] --slurm [-f SLURM.yaml] [--dry-run]
    python scripts/launch.py status|logs|delete RUN [-n NS | --slurm]

CONFIG is a run config (conf/*.yaml) with Hydra key=value overrides; -f adds chart values files (image, GPUs,
workers, spot preset, secret names). --dry-run prints the strictly validated manifests and changes nothing.
--local runs the same rendered job on this machine (dump indexes, then a torchrun agent per worker, rendezvous on
127.0.0.1); storage is then a local directory or a local S3 endpoint (storage.endpoint_url).
--slurm submits the run to Slurm instead (scripts/submit_with_config.sh): -f files then hold Slurm values (nodes,
gpus_per_node, partition, account, qos, time, sbatch, setup, ...; see lens/launch/slurm.py); --dry-run prints the
sbatch script.
Exit codes: 0 done, 2 bad input, other non-zero retryable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lens.errors import InputError  # noqa: E402

COMMANDS = ("status", "logs", "delete")


def _launch_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", help="run config, e.g. conf/smollm2_135m.yaml")
    p.add_argument("overrides", nargs="*", help="Hydra overrides key=value")
    p.add_argument("--dry-run", action="store_true", help="print the validated manifests; touch nothing")
    p.add_argument("--local", action="store_true",
                   help="run the same rendered job on this machine: the dump Job's indexes, then one torchrun agent "
                   "per worker (rendezvous on 127.0.0.1)")
    p.add_argument("--workers", type=int, metavar="N", help="with --local: worker replicas (default 2)")
    p.add_argument("--slurm", action="store_true", help="submit to Slurm with sbatch (-f: Slurm values files)")
    p.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's)")
    p.add_argument("-f", "--values", action="append", default=[], metavar="FILE",
                   help="chart values file (repeatable; later files win)")
    p.add_argument("--values-out", metavar="FILE", help="also write the final chart values here")
    p.add_argument("--crd", metavar="FILE", help="PyTorchJob CRD YAML for strict offline validation "
                   "(default: $LENS_PYTORCHJOB_CRD; on install the cluster's CRD is used)")
    return p


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py", description="follow a launched run")
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("run", help="run name (run.name = the Helm release)")
    p.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's)")
    p.add_argument("--slurm", action="store_true", help="a Slurm run: squeue/scontrol, its output file, scancel")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import lens.launch as launch

    try:
        if argv and argv[0] in COMMANDS:
            args = _run_parser().parse_args(argv)
            if args.slurm:
                from lens.launch import slurm

                return {"status": slurm.status, "logs": slurm.logs, "delete": slurm.delete}[args.command](args.run)
            namespace = args.namespace or launch.current_namespace()
            return {"status": launch.status, "logs": launch.logs, "delete": launch.delete}[args.command](
                args.run, namespace)
        args = _launch_parser().parse_intermixed_args(argv)
        return launch.launch(args.config, args.overrides, values_files=args.values, namespace=args.namespace,
                             dry_run=args.dry_run, values_out=args.values_out, crd=args.crd, local=args.local,
                             workers=args.workers, slurm=args.slurm)
    except InputError as e:
        print(e, file=sys.stderr)
        return InputError.exit_code


if __name__ == "__main__":
    sys.exit(main())
