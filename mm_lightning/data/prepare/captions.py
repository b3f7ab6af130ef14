"""Captions: a sidecar when there is one, else a local captioner, else a template.

Every caption must name the person with a class word (model.identity_words), or the trigger
word when one is set: the identity embedding is fused into the text at those tokens. Templates use the class
word found in the folder label ("alice_woman" -> "woman"), else "person": without a gender
and age classifier we do not guess. Captions from a sidecar or captioner that name neither
are refused (the row is dropped and counted).
"""

import re
from pathlib import Path

import numpy as np

TEMPLATES = {"image": "a photo of a {word}", "video": "a video of a {word}"}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def has_identity_word(caption: str, identity_words: list[str], trigger_word: str | None) -> bool:
    """Whether the identity-token mask (mm_lightning/text.py) finds a token: the trigger word when
    one is configured (the mask then looks for nothing else), else any class word."""
    targets = [trigger_word] if trigger_word else identity_words
    return bool(set(_words(caption)) & {w.lower() for w in targets})


def class_word(label: str | None, identity_words: list[str]) -> str:
    """The first class word in the folder label, else "person"."""
    for word in _words(label or ""):
        if word in identity_words:
            return word
    return "person"


def template_caption(kind: str, word: str, trigger_word: str | None) -> str:
    return TEMPLATES[kind].format(word=f"{trigger_word} {word}" if trigger_word else word)


class Captioner:
    """Any transformers image-text-to-text model from a local folder (nothing is bundled or fetched)."""

    def __init__(self, model_dir: str, prompt: str):
        from transformers import pipeline

        if not Path(model_dir).is_dir():
            raise FileNotFoundError(f"prepare.captioner: {model_dir} is not a folder holding a transformers model")
        self.pipe = pipeline("image-text-to-text", model=model_dir)
        self.prompt = prompt

    def __call__(self, image: np.ndarray) -> str:
        from PIL import Image

        messages = [
            {
                "role": "user",
                "content": [{"type": "image", "image": Image.fromarray(image)}, {"type": "text", "text": self.prompt}],
            }
        ]
        out = self.pipe(text=messages, max_new_tokens=60, return_full_text=False)
        return str(out[0]["generated_text"]).strip()
