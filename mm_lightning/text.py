"""Prompt handling: T5 embeddings (through diffusers' CogVideoX pipeline) and the identity-token mask."""

from __future__ import annotations

import re

import torch


def identity_token_mask(
    tokenizer, prompts: list[str], words: list[str], trigger_word: str | None, max_length: int
) -> torch.Tensor:
    """[B, max_length] mask, 1 at the tokens of the class word ("man", "woman", ...) or trigger word.

    Tokenised exactly as CogVideoXPipeline._get_t5_prompt_embeds does (max_length padding,
    truncation, special tokens), so mask positions line up with the T5 embeddings; token
    character offsets find the words, whatever the tokenizer splits them into.
    """
    targets = [trigger_word] if trigger_word else list(words)
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in targets) + r")\b", re.IGNORECASE)
    encoded = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_offsets_mapping=True,
    )
    mask = torch.zeros(len(prompts), max_length)
    for i, (prompt, offsets) in enumerate(zip(prompts, encoded["offset_mapping"])):
        spans = [m.span() for m in pattern.finditer(prompt)]
        for j, (start, end) in enumerate(offsets):
            if end > start and any(start < s_end and end > s_start for s_start, s_end in spans):
                mask[i, j] = 1.0
    return mask
