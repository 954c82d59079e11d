"""The training program the cluster job runs: `lens train CONFIG` alone or under torchrun.

Reads top to bottom: set up (process group, model, data, optimizer), resume from the newest complete checkpoint if
there is one, then for each optimizer step take the next global batch from the cursor, process this rank's share
in micro-batches, all-reduce the gradients, clip, step, and log / evaluate / checkpoint on their cadence.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

import torch

from lens import config as lens_config
from lens.config import LensConfig
from lens.data.corpus import Corpus
from lens.data.shards import ShardSource
from lens.data.source import OnTheFlySource, SampleCursor, split_for_rank
from lens.errors import InputError
from lens.evaluate import evaluate
from lens.models.hub import load_model
from lens.models.lens_model import LensModel, activation_scale
from lens.models.orig import Orig
from lens.objective import Batch, Knobs, lens_losses
from lens.schedules import lr_at, schedule_value
from lens.storage import open_storage
from lens.tracking import NullTracker, make_tracker
from lens.train import dist
from lens.train.checkpoint import CheckpointManager, set_rng_state
from lens.train.optim import build_optimizer, set_lr
from lens.train.preemption import Preempted, PreemptionNotice

log = logging.getLogger("lens.train")

# Keys of the run config that a checkpoint's weights depend on: resuming with other values is an error.
_SHAPE_KEYS = ("model.name", "model.layer", "decoder.prompt", "decoder.patch_layers", "decoder.per_layer_proj",
               "decoder.train_base", "encoder.prompt", "encoder.train_base", "encoder.layer")


@dataclass
class Meter:
    """Sums of per-sample terms over the current log interval (reduced across ranks when read)."""

    sums: dict[str, float] = field(default_factory=dict)
    moments: torch.Tensor | None = None  # per-dim sums of A, A^2, A - A_hat, (A - A_hat)^2: variance recovered
    samples: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, terms: dict[str, torch.Tensor], A: torch.Tensor, A_hat: torch.Tensor, tokens: int) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.sum())
        A, err = A.double(), (A - A_hat).double()
        m = torch.stack([A.sum(0), A.pow(2).sum(0), err.sum(0), err.pow(2).sum(0)]).cpu()
        self.moments = m if self.moments is None else self.moments + m
        self.samples += len(A)
        self.tokens += tokens


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _get(cfg_dict: dict, dotted: str):
    for part in dotted.split("."):
        cfg_dict = cfg_dict.get(part) if isinstance(cfg_dict, dict) else None
    return cfg_dict


def check_resumable(cfg: LensConfig, saved_yaml: str, where: str) -> None:
    """A run dir holds one lens: refuse to continue it with a config its weights were not trained for."""
    import yaml

    saved, now = yaml.safe_load(saved_yaml), lens_config.to_dict(cfg)
    for key in _SHAPE_KEYS:
        if _get(saved, key) != _get(now, key):
            raise InputError(f"config error: {key}={_get(now, key)!r} differs from {_get(saved, key)!r} in the "
                             f"checkpoint at {where}; use a new run.dir (or run.name) for a different lens")


class Trainer:
    def __init__(self, cfg: LensConfig):
        self.cfg = cfg
        self.dist = dist.init()
        self.device = self.dist.device
        if self.dist.world > cfg.train.batch_size:
            raise InputError(f"config error: train.batch_size={cfg.train.batch_size} is invalid; expected at least "
                             f"the number of processes ({self.dist.world}), so every rank has samples")
        lm, self.tokenizer = load_model(cfg.model.name, _dtype(cfg.model.dtype))
        lm.to(self.device)
        orig = Orig(lm)
        lens_config.check_against_model(cfg, orig.parts.n_layers, orig.parts.d_model)  # before the slow parts
        if cfg.data.on_the_fly:
            self.source = OnTheFlySource(Corpus.build(cfg.data, self.tokenizer), cfg.run.seed, cfg.data.min_pos)
        else:  # activations dumped by `lens dump`; the manifest is checked against this config
            self.source = ShardSource.from_config(cfg, d_model=orig.parts.d_model)
        self.steps_per_epoch = self.source.steps_per_epoch(cfg.train.batch_size)
        self.cursor = SampleCursor()
        self.step = 0

        # The scale of the first training activations sets the decoder projection's initial gain.
        self.orig = orig
        probe = self._batch(torch.arange(min(64, self.source.n_train))).A
        self.model = LensModel(cfg, lm, self.tokenizer, act_scale=activation_scale(orig, probe)).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.params = list(self.model.trainable_parameters().values())
        self.checkpoints = CheckpointManager(open_storage(cfg.run.dir, cfg.storage.endpoint_url),
                                             keep=cfg.train.keep_checkpoints)
        self.tracker = make_tracker(cfg.wandb.project, cfg.wandb.entity, cfg.run.name, cfg.wandb.mode,
                                    lens_config.to_dict(cfg), dir=_local_dir(cfg.run.dir)) \
            if self.dist.is_main else NullTracker()
        self.eval_sets = self._eval_sets()

    # ------------------------------------------------------------------------------------------------ state
    def resume(self) -> None:
        ckpt = self.checkpoints.load_latest()
        if ckpt is None:
            log.info("no checkpoint in %s: starting at step 0", self.cfg.run.dir)
            return
        check_resumable(self.cfg, ckpt.config_yaml, ckpt.uri)
        self.model.load_trainable_state({k: v.to(self.device) for k, v in ckpt.weights.items()})
        self.optimizer.load_state_dict(ckpt.optimizer_state)
        self.cursor.load_state_dict(ckpt.state["cursor"])
        set_rng_state(ckpt.rng)
        self.step = ckpt.step
        log.info("resumed from %s at step %d (next sample %d)", ckpt.uri, self.step, self.cursor.next)

    def save(self) -> None:
        """Checkpoint (rank 0 writes; the others wait so nobody runs ahead of a checkpoint being written)."""
        if self.dist.is_main:
            self.checkpoints.save(self.step, self.model.trainable_state(),
                                  self.optimizer.state_dict(), {"cursor": self.cursor.state_dict(),
                                                                "wandb_run_id": self.cfg.run.name},
                                  lens_config.to_yaml(self.cfg))
        dist.barrier()

    # ------------------------------------------------------------------------------------------------ data
    def _batch(self, global_ids: torch.Tensor, held_out: bool = False) -> Batch:
        """The samples with these global ids (held out: the first n of the validation split), on the device, with
        their activations: read from the dump, or captured now."""
        fetched = self.source.val_batch(len(global_ids)) if held_out else self.source.lookup(global_ids)
        ids, positions, *acts = (t.to(self.device) if t is not None else None for t in fetched)
        A, A_prime = acts if acts else (None, None)
        if A is None:
            A = self.orig.capture(ids, self.cfg.model.layer, positions)
        prime_ids = None
        if A_prime is not None and self.cfg.loss.resample_ablation and not held_out:
            ctx, pos = self.source.lookup_prime(global_ids)
            prime_ids = ctx[torch.arange(len(pos)), pos].to(self.device)
        return Batch(ids, positions, A.float(), global_ids.to(self.device),
                     None if A_prime is None else A_prime.float(), prime_ids)

    def _eval_sets(self) -> tuple[Batch, Batch]:
        """Held-out activations (validation split) and as many training ones for the baselines' fits."""
        n = self.cfg.train.eval_samples
        held_out = self._batch(-1 - torch.arange(n), held_out=True)  # negative ids: keys apart from training ones
        fit = self._batch(torch.arange(min(n, self.source.n_train)))
        return held_out, fit

    # ------------------------------------------------------------------------------------------------ loop
    def knobs(self) -> Knobs:
        s, spe = self.cfg.schedules, self.steps_per_epoch
        return Knobs(tau=schedule_value(s.tau, self.step, spe), alpha=schedule_value(s.alpha, self.step, spe),
                     entropy_mult=schedule_value(s.entropy, self.step, spe))

    def train_step(self, meter: Meter) -> None:
        cfg = self.cfg.train
        lr = lr_at(self.cfg.optim, self.step, cfg.max_steps, self.steps_per_epoch)
        set_lr(self.optimizer, lr)
        knobs = self.knobs()
        mine = split_for_rank(self.cursor.take(cfg.batch_size), self.dist.rank, self.dist.world)
        self.optimizer.zero_grad(set_to_none=False)
        for chunk in mine.split(cfg.micro_batch_size):
            batch = self._batch(chunk)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                total, terms, A_hat = lens_losses(self.model, batch, knobs)
            # Sum of per-sample losses over the global batch: any split over ranks gives the same gradient.
            (total.sum() / cfg.batch_size).backward()
            meter.add({"loss": total.detach(), **terms}, batch.A, A_hat, tokens=int((batch.positions + 1).sum()))
        dist.all_reduce_sum([p.grad for p in self.params])
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip or float("inf"))
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"non-finite gradient norm at step {self.step}; not stepping the optimizer")
        self.optimizer.step()
        self.step += 1
        self.last = {"lr": lr, "tau": knobs.tau, "alpha": knobs.alpha, "grad_norm": float(grad_norm)}

    def report(self, meter: Meter) -> dict:
        """Reduce the interval's sums across ranks; log one line and the tracker."""
        keys = sorted(meter.sums)
        totals = torch.tensor([meter.sums[k] for k in keys] + [meter.samples, meter.tokens], dtype=torch.float64)
        moments = meter.moments
        dist.all_reduce_sum([totals, moments])
        n, tokens = totals[-2].item(), totals[-1].item()
        var_A = (moments[1] / n - (moments[0] / n) ** 2).sum()
        var_err = (moments[3] / n - (moments[2] / n) ** 2).sum()
        elapsed = time.perf_counter() - meter.started
        metrics = {f"train/{k}": totals[i].item() / n for i, k in enumerate(keys)}
        metrics["train/variance_recovered"] = float(1 - var_err / var_A)
        metrics.update({f"train/{k}": v for k, v in self.last.items()})
        metrics.update({"perf/samples_per_s": n / elapsed, "perf/tokens_per_s": tokens / elapsed,
                        "data/epoch": self.cursor.next / self.source.n_train, "data/next_sample": self.cursor.next})
        terms = " ".join(f"{k} {metrics['train/' + k]:.4f}" for k in keys if k != "loss")
        log.info("step %d/%d | loss %.4f | %s | vr %.4f | gnorm %.3f tau %.3f lr %.2e | %.1f samples/s %.0f tok/s",
                 self.step, self.cfg.train.max_steps, metrics["train/loss"], terms,
                 metrics["train/variance_recovered"], self.last["grad_norm"],
                 self.last["tau"], self.last["lr"], metrics["perf/samples_per_s"], metrics["perf/tokens_per_s"])
        self.tracker.log(metrics, step=self.step)
        return metrics

    def run_eval(self) -> dict:
        metrics = {}
        if self.dist.is_main:
            held_out, fit = self.eval_sets
            metrics = evaluate(self.model, held_out, fit, self.cfg.train.micro_batch_size)
            log.info("eval step %d | variance recovered %.4f (token-only %.4f, mean %.4f) | nmse %.4f | kl %.4f "
                     "(zero %.4f, mean %.4f, token-only %.4f)", self.step, metrics["variance_recovered"],
                     metrics["baseline_token/variance_recovered"], metrics["baseline_mean/variance_recovered"],
                     metrics["nmse"], metrics["kl"], metrics["baseline_zero/kl"], metrics["baseline_mean/kl"],
                     metrics["baseline_token/kl"])
            self.tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step=self.step)
        dist.barrier()
        return metrics

    def fit(self) -> dict:
        cfg = self.cfg.train
        notice = PreemptionNotice()
        self.resume()
        meter = Meter()
        progress = _Progress(cfg.max_steps) if self.dist.is_main and sys.stderr.isatty() else None
        metrics: dict = {}
        while self.step < cfg.max_steps:
            self.train_step(meter)
            if progress:
                progress.update(self.step)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self.report(meter)
                meter = Meter()
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                self.run_eval()
            saved = self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps
            if saved:
                self.save()
            if self.step < cfg.max_steps and notice.agreed(self.device):
                if not saved:
                    self.save()
                self.tracker.finish()
                raise Preempted(f"preempted at step {self.step}; checkpoint saved, the next start resumes there")
        metrics = self.run_eval()
        if self.dist.is_main:
            self.tracker.summary({f"eval/{k}": v for k, v in metrics.items()})
        self.tracker.finish()
        self.source.close()
        return metrics


class _Progress:
    """A one-line progress bar, only when stderr is a terminal (logs stay one line per interval)."""

    def __init__(self, total: int):
        self.total, self.start = total, time.perf_counter()

    def update(self, step: int) -> None:
        frac = step / self.total
        bar = "#" * int(30 * frac)
        sys.stderr.write(f"\r[{bar:<30}] {step}/{self.total} {time.perf_counter() - self.start:.0f}s")
        sys.stderr.flush()
        if step == self.total:
            sys.stderr.write("\n")


def _local_dir(run_dir: str) -> str:
    """Where W&B writes its files: the run dir when it is local, else ./wandb-local."""
    return "wandb-local" if "://" in run_dir else run_dir


def train(cfg: LensConfig) -> dict:
    """Train (or continue training) the lens described by `cfg`; returns the final held-out metrics."""
    try:
        return Trainer(cfg).fit()
    finally:
        dist.shutdown()

