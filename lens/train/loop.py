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
from lens.data.batches import ActivationData
from lens.data.source import SampleCursor, split_for_rank
from lens.errors import InputError
from lens.evaluate import evaluate, explain_samples, explained_rows
from lens.models.hub import load_model_for
from lens.models.lens_model import LensModel, activation_scale
from lens.models.orig import Orig
from lens.objective import Knobs
from lens.schedules import lr_at, schedule_value
from lens.storage import open_storage
from lens.tracking import NullTracker, make_tracker, run_files_dir
from lens.train import dist
from lens.train.checkpoint import CheckpointManager, PendingSave, apply_training_state, set_rng_state, training_state
from lens.train.optim import build_optimizer, set_lr
from lens.train.parallel import Parallel
from lens.train.preemption import Preempted, PreemptionNotice

log = logging.getLogger("lens.train")

ASSUMED_UPLOAD_BYTES_PER_S = 50e6  # per rank, for the first save's time estimate (S3 from one node: 50-500 MB/s)

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
        self.dist = dist.init(timeout_s=cfg.train.collective_timeout)
        self.device = self.dist.device
        if self.dist.world > cfg.train.batch_size:
            raise InputError(f"config error: train.batch_size={cfg.train.batch_size} is invalid; expected at least "
                             f"the number of processes ({self.dist.world}), so every rank has samples")
        run_storage = open_storage(cfg.run.dir, cfg.storage.endpoint_url)
        run_storage.check(write=True)  # a missing bucket, bad credentials or a read-only folder fail now
        lm, self.tokenizer = load_model_for(cfg)
        lm.to(self.device)
        orig = Orig(lm)
        lens_config.check_against_model(cfg, orig.parts.n_layers, orig.parts.d_model)  # before the slow parts
        self.data = ActivationData(cfg, orig, self.tokenizer, self.device)
        self.steps_per_epoch = self.data.source.steps_per_epoch(cfg.train.batch_size)
        self.cursor = SampleCursor()
        self.step = 0

        # The scale of the first training activations sets the decoder projection's initial gain.
        probe = self.data.batch(torch.arange(min(64, self.data.n_train))).A
        # Trainable copies without weights yet: Parallel shards (fsdp) or wraps (ddp) the trainable part, filling
        # the copies once laid out and moving it all to the device; the optimizer is built on what that leaves.
        self.model = LensModel(cfg, lm, self.tokenizer, act_scale=activation_scale(orig, probe), deferred=True)
        self.parallel = Parallel(cfg, self.model, self.dist.world, self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.params = list(self.model.trainable_parameters().values())
        self.save_seconds: float | None = None
        self.checkpoints = CheckpointManager(run_storage, keep=cfg.train.keep_checkpoints)
        # An async upload runs its collectives from a thread: on a group of its own, never interleaved with
        # training's. (new_group is collective: every rank creates it here.)
        self.checkpoint_group = torch.distributed.new_group(backend="gloo") if cfg.train.async_checkpoint else None
        self.pending_save: PendingSave | None = None
        self.tracker = NullTracker()  # W&B starts in fit(), once the checkpoint has loaded: no files for a bad start
        self.eval_sets = self.data.eval_sets(cfg.train.eval_samples)

    # ------------------------------------------------------------------------------------------------ state
    def resume(self) -> None:
        """Load the newest committed checkpoint that loads: each rank reads only its own shards, whatever the
        world size that saved it."""
        tensors: dict = {}

        def load(ckpt) -> None:
            check_resumable(self.cfg, ckpt.config_yaml, ckpt.uri)
            # Built only when there is a checkpoint: for a fresh optimizer DCP initialises the AdamW state with a
            # zero-lr step, which a run that starts from scratch must not take.
            if not tensors:
                tensors.update(training_state(self.model, self.optimizer))
            ckpt.load_into(tensors, self.checkpoint_group)
            apply_training_state(self.model, self.optimizer, tensors)
            self.cursor.load_state_dict(ckpt.state["cursor"])

        ckpt = self.checkpoints.resume(load, rank=self.dist.rank, all_ok=dist.all_true)
        if ckpt is None:
            log.info("no checkpoint in %s: starting at step 0 with %d processes", self.cfg.run.dir, self.dist.world)
            return
        set_rng_state(ckpt.rng)
        self.step = ckpt.step
        log.info("resumed from %s at step %d (next sample %d) with %d processes", ckpt.uri, self.step,
                 self.cursor.next, self.dist.world)

    def save(self) -> None:
        """Checkpoint, collectively: each rank writes the shards it owns. Returns once the checkpoint is committed,
        or with train.async_checkpoint once this rank's shards are copied to host memory (then `poll_save` commits
        it when the upload is done)."""
        self.wait_for_save()  # one upload at a time
        self.pending_save = self.checkpoints.start_save(
            self.step, training_state(self.model, self.optimizer),
            {"cursor": self.cursor.state_dict(), "wandb_run_id": self.cfg.run.name}, lens_config.to_yaml(self.cfg),
            rank=self.dist.rank, world=self.dist.world, all_ok=dist.all_true, process_group=self.checkpoint_group,
            asynchronous=self.cfg.train.async_checkpoint)
        if self.cfg.train.async_checkpoint:
            log.info("checkpoint step-%08d: training goes on while it uploads (blocked %.2f s)", self.step,
                     time.perf_counter() - self.pending_save.started)
        else:
            self.wait_for_save()

    def committed(self, pending: PendingSave) -> None:
        """A checkpoint is committed (every rank's shards, marker, pointer): the one place that says so."""
        self.save_seconds = dist.all_max(pending.seconds)  # the slowest rank's, on all
        log.info("checkpoint %s committed: %.1f MB on this rank in %.2f s by %d processes", pending.name,
                 self.checkpoints.last_tensor_bytes / 1e6, self.save_seconds, self.dist.world)
        self.tracker.event("checkpoint", step=pending.step, seconds=self.save_seconds,
                           mb=self.checkpoints.last_tensor_bytes / 1e6, world=self.dist.world)

    def poll_save(self) -> None:
        """At a step boundary: commit an async upload once every rank's part is done (every rank agrees)."""
        if self.pending_save is not None and dist.all_true(self.pending_save.done()):
            self.wait_for_save()

    def wait_for_save(self) -> None:
        """Wait for the save in flight (an async upload, or the one `save` just made) and say it is committed; its
        error, if any, is raised on every rank."""
        if self.pending_save is not None:
            pending, self.pending_save = self.pending_save, None
            pending.finish()
            self.committed(pending)

    def save_estimate(self) -> float:
        """Seconds a checkpoint takes: the last one's, or before any, its bytes at a cautious upload speed."""
        if self.save_seconds is not None:
            return self.save_seconds
        tensor_bytes = 3 * sum(p.numel() * 4 for p in self.params)  # fp32 weights + two Adam moments
        return tensor_bytes / self.dist.world / ASSUMED_UPLOAD_BYTES_PER_S

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
        chunks = list(mine.split(cfg.micro_batch_size))
        if self.parallel.sharded:
            # Every rank runs as many forwards as the busiest one (FSDP gathers weights inside each): a rank with
            # fewer samples repeats its last micro-batch with weight 0.
            most = -(-cfg.batch_size // self.dist.world)  # split_for_rank gives no rank more
            n = -(-most // cfg.micro_batch_size)
            chunks += [chunks[-1]] * (n - len(chunks))
        self.optimizer.zero_grad(set_to_none=False)
        for i, chunk in enumerate(chunks):
            batch = self.data.batch(chunk, capture=False)  # on the fly, the objective's unpatched pass gives A
            padding = i * cfg.micro_batch_size >= len(mine)
            with self.parallel.accumulating(last=i == len(chunks) - 1):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                    total, terms, explained = self.parallel.losses(batch, knobs)
                # Sum of per-sample losses over the global batch: any split over ranks gives the same gradient.
                (total.sum() / cfg.batch_size * (0.0 if padding else 1.0)).backward()
            self.parallel.resharded()
            if not padding:
                meter.add({"loss": total.detach(), **terms}, explained.A, explained.A_hat,
                          tokens=int((batch.positions + 1).sum()))
        # Parameters the objective never reaches (a trainable base's blocks past encoder.layer, its LM head) have no
        # gradient on any rank: the same graph runs everywhere, so skipping them keeps the ranks in step.
        grad_norm = self.parallel.clip_grad_norm(self.params, self.cfg.optim.grad_clip or float("inf"))
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
                        "data/epoch": self.cursor.next / self.data.n_train, "data/next_sample": self.cursor.next})
        terms = " ".join(f"{k} {metrics['train/' + k]:.4f}" for k in keys if k != "loss")
        log.info("step %d/%d | loss %.4f | %s | vr %.4f | gnorm %.3f tau %.3f lr %.2e | %.1f samples/s %.0f tok/s",
                 self.step, self.cfg.train.max_steps, metrics["train/loss"], terms,
                 metrics["train/variance_recovered"], self.last["grad_norm"],
                 self.last["tau"], self.last["lr"], metrics["perf/samples_per_s"], metrics["perf/tokens_per_s"])
        self.tracker.log(metrics, step=self.step)
        return metrics

    def run_eval(self) -> dict:
        metrics = {}
        if self.dist.is_main or self.parallel.sharded:  # sharded weights: every rank takes part in the gathers
            held_out, fit = self.eval_sets
            metrics = self.parallel.call(evaluate, self.model, held_out, fit, self.cfg.train.micro_batch_size)
            log.info("eval step %d | fve_nrm %.4f (token-only %.4f, mean %.4f) | cosine %.4f | variance recovered "
                     "%.4f (token-only %.4f, mean %.4f) | nmse %.4f | kl %.4f (zero %.4f, mean %.4f, token-only "
                     "%.4f)", self.step, metrics["fve_nrm"], metrics["baseline_token/fve_nrm"],
                     metrics["baseline_mean/fve_nrm"], metrics["cosine"], metrics["variance_recovered"],
                     metrics["baseline_token/variance_recovered"], metrics["baseline_mean/variance_recovered"],
                     metrics["nmse"], metrics["kl"], metrics["baseline_zero/kl"], metrics["baseline_mean/kl"],
                     metrics["baseline_token/kl"])
            self.tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step=self.step)
            self.log_explanations(held_out)
        dist.barrier()
        return metrics

    def log_explanations(self, held_out) -> None:
        """A few fixed held-out positions explained: one line each, and a W&B table, so a reader sees them change."""
        rows = explained_rows(len(held_out.positions), self.cfg.train.eval_explanations)
        if not rows:
            return
        samples = self.parallel.call(explain_samples, self.model, held_out, rows, self.cfg.train.micro_batch_size)
        for s in samples:
            log.info("eval step %d sample %d | %r -> %r | nmse %.4f", self.step, s.sample, s.context,
                     s.explanation, s.nmse)
        self.tracker.table("eval/explanations", ["step", "sample", "context", "explanation", "nmse"],
                           [[self.step, s.sample, s.context, s.explanation, s.nmse] for s in samples], self.step)

    def handle_preemption(self, seconds_left: float, saved: bool) -> None:
        """Save at this step boundary if a checkpoint fits in the time left (every rank decides alike)."""
        self.wait_for_save()  # an upload in flight counts only once committed
        estimate = self.save_estimate()
        self.tracker.event("preemption", step=self.step, seconds_left=seconds_left)
        if saved:
            log.warning("preemption notice (%.0f s left): step %d is checkpointed; exiting", seconds_left,
                        self.step)
        elif estimate < seconds_left:
            log.warning("preemption notice (%.0f s left): saving step %d (about %.1f s), then exiting",
                        seconds_left, self.step, estimate)
            self.save()
            self.wait_for_save()
        else:
            log.warning("preemption notice (%.0f s left): a checkpoint takes about %.0f s; exiting without one "
                        "(the next start resumes from the last checkpoint)", seconds_left, estimate)

    def fit(self) -> dict:
        cfg = self.cfg.train
        notice = PreemptionNotice()
        self.resume()
        if self.dist.is_main:
            self.tracker = make_tracker(self.cfg.wandb.project, self.cfg.wandb.entity, self.cfg.run.name,
                                        self.cfg.wandb.mode, lens_config.to_dict(self.cfg),
                                        dir=run_files_dir(self.cfg.run.dir),
                                        remote=self.checkpoints.storage if "://" in self.cfg.run.dir else None)
        self.tracker.event("start", step=self.step, world=self.dist.world, parallel=self.parallel.mode)
        meter = Meter()
        progress = _Progress(cfg.max_steps) if self.dist.is_main and sys.stderr.isatty() else None
        metrics: dict = {}
        while self.step < cfg.max_steps:
            self.train_step(meter)
            self.tracker.event("step", step=self.step)
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
            else:
                self.poll_save()
            seconds_left = notice.seconds_left() if self.step < cfg.max_steps else None
            if seconds_left is not None:
                self.handle_preemption(seconds_left, saved)
                self.tracker.finish()  # uploads the records: before `consume`, after which the pod may be killed
                notice.consume()
                raise Preempted(f"preempted at step {self.step}", notice.exit_code)
        self.wait_for_save()
        metrics = self.run_eval()
        if self.dist.is_main:
            self.tracker.summary({f"eval/{k}": v for k, v in metrics.items()})
        self.tracker.finish()
        self.data.close()
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


def train(cfg: LensConfig) -> dict:
    """Train (or continue training) the lens described by `cfg`; returns the final held-out metrics."""
    finished = False
    try:
        metrics = Trainer(cfg).fit()
        finished = True
        return metrics
    finally:
        dist.shutdown(finished)

