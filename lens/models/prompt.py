"""Prompt text -> token ids, with `<bos>` standing for the tokenizer's BOS token and one named slot."""

from __future__ import annotations

import torch

BOS = "<bos>"


def prompt_ids(tokenizer, text: str) -> torch.Tensor:
    """Token ids of `text` (no special tokens added), with each `<bos>` replaced by the BOS id (dropped when the
    tokenizer has none)."""
    ids: list[int] = []
    for i, piece in enumerate(text.split(BOS)):
        if i > 0 and tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
        if piece:
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def split_prompt(tokenizer, text: str, slot: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids left and right of the one `slot` marker in `text`."""
    left, right = text.split(slot)
    return prompt_ids(tokenizer, left), prompt_ids(tokenizer, right)
