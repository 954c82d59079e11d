"""Use a trained lens: load it from a run directory or checkpoint (local or S3) and score it on held-out data."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import yaml

from lens.config import LensConfig, from_dictconfig, to_dict
from lens.data.batches import ActivationData
from lens.errors import InputError
from lens.evaluate import evaluate
from lens.models.hub import load_model_for
from lens.models.lens_model import LensModel
from lens.train.checkpoint import Checkpoint, apply_model_state, load_checkpoint, model_state, one_line

log = logging.getLogger("lens")


@dataclass
class LoadedLens:
    cfg: LensConfig
    """The run config saved with the checkpoint."""
    model: LensModel
    """Decoder and encoder with the checkpoint's weights, in eval mode, on `device`."""
    checkpoint: Checkpoint
    device: torch.device


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_lens(uri: str, endpoint_url: str | None = None, device: torch.device | None = None) -> LoadedLens:
    """The lens saved at `uri`: a run directory (its newest committed checkpoint that loads) or one checkpoint
    folder. One process reads the weights from every rank's shards, whatever world size saved them.

    `endpoint_url` (or `AWS_ENDPOINT_URL`) reaches an S3-compatible server for `s3://` URIs."""
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    device = device or default_device()
    loaded: dict = {}

    def load(checkpoint: Checkpoint) -> None:
        try:
            cfg = from_dictconfig(yaml.safe_load(checkpoint.config_yaml))
        except (yaml.YAMLError, InputError) as e:  # a damaged config.yaml is a damaged checkpoint
            raise ValueError(f"its config.yaml is unreadable ({one_line(e)})") from None
        # Built once: the older checkpoints a fallback tries are of the same run, so they share its config (unless it
        # was resumed with other settings). Every trainable tensor is refilled below, so a failed try leaves nothing.
        if loaded.get("cfg") != cfg:
            lm, tokenizer = load_model_for(cfg)
            loaded.update(cfg=cfg, model=LensModel(cfg, lm.to(device), tokenizer).to(device))
        model = loaded["model"]
        tensors = model_state(model)  # the weights only, no optimizer state
        checkpoint.load_into(tensors)
        apply_model_state(model, tensors)

    checkpoint = load_checkpoint(uri, endpoint_url, load)
    cfg, model = loaded["cfg"], loaded["model"]
    model.eval()
    log.info("loaded the lens of %s (step %d, %s layer %d)", checkpoint.uri, checkpoint.step, cfg.model.name,
             cfg.model.layer)
    return LoadedLens(cfg, model, checkpoint, device)


def held_out_data(lens: LoadedLens, data: str | None = None) -> ActivationData:
    """The run's own data (so held-out samples are the ones training evaluated on), or `data`: an activation dump
    (a folder or `s3://` prefix holding a `lens dump` manifest) or a corpus spec as in `data.corpus`."""
    cfg = lens.cfg
    if data is not None:
        from lens.data.shards import MANIFEST
        from lens.storage import open_storage

        is_dump = ("://" in data or os.path.isdir(data)) and \
            open_storage(data, cfg.storage.endpoint_url).exists(MANIFEST)
        where = {"activations": data, "on_the_fly": False} if is_dump else {"corpus": data, "on_the_fly": True}
        plain = to_dict(cfg)
        cfg = from_dictconfig({**plain, "data": {**plain["data"], **where}})
    return ActivationData(cfg, lens.model.orig, lens.model.tokenizer, lens.device)


def evaluate_lens(lens: LoadedLens, data: str | None = None, samples: int | None = None) -> dict[str, float]:
    """Held-out metrics of the lens and its baselines, computed exactly as the trainer's evaluation (same samples,
    same Gumbel keys, same baseline fits) unless `data` or `samples` say otherwise."""
    source = held_out_data(lens, data)
    try:
        held_out, fit = source.eval_sets(samples or lens.cfg.train.eval_samples)
        return evaluate(lens.model, held_out, fit, lens.cfg.train.micro_batch_size)
    finally:
        source.close()
