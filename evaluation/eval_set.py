"""Evaluation sets: identities (1-4 reference photos and a class word each) x prompts.

YAML (or JSON) layout, paths relative to the file:

    identities:
      - name: astronaut
        class_word: woman            # fills "{who}" in the prompts, e.g. "a woman"
        references: [refs/astronaut_0.jpg, refs/astronaut_1.jpg]
    prompts:                         # "{who}" becomes "a <class_word>"
      - "{who} walking along a beach at sunset"
      - prompt: "{who} talking to the camera in a bright office"
        negative_prompt: "blurry, low quality"   # this prompt's own negative prompt
    prompts_per_identity: 4          # the paper: each identity x 4 category-matched prompts
    negative_prompt: "distorted face"  # optional: for prompts without their own; else sampling.negative_prompt

Point `eval.eval_set` at your own file (e.g. PubFig-style identities + VBench prompts).
Without one, the built-in demo set uses the demo dataset's packaged face photos.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass
class EvalItem:
    identity: str
    references: list[Path]
    prompt: str
    negative_prompt: str | None = None  # None: the config's sampling.negative_prompt


DEMO_PROMPTS = ["{who} talking to the camera in a bright office", "{who} walking along a beach at sunset"]


def load_eval_set(path: str | Path) -> list[EvalItem]:
    path = Path(path)
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or "identities" not in spec or "prompts" not in spec:
        raise ValueError(f"{path}: an eval set needs 'identities' and 'prompts' (see evaluation/eval_set.py)")
    per_identity = int(spec.get("prompts_per_identity", 4))
    for identity in spec["identities"]:
        if not 1 <= len(identity["references"]) <= 4:
            raise ValueError(
                f"{path}: identity {identity['name']!r} needs 1-4 reference images, has {len(identity['references'])}"
            )
    default_negative = spec.get("negative_prompt")
    prompts = [p if isinstance(p, dict) else {"prompt": p} for p in spec["prompts"][:per_identity]]
    for p in prompts:
        if "prompt" not in p:
            raise ValueError(f"{path}: a prompt is a string or a mapping with 'prompt' and 'negative_prompt', got {p}")
    # Prompt-major order, so that eval.max_videos keeps as many identities as it can.
    return [
        EvalItem(
            identity["name"],
            [path.parent / r for r in identity["references"]],
            p["prompt"].format(who=f"a {identity['class_word']}"),
            p.get("negative_prompt", default_negative),
        )
        for p in prompts
        for identity in spec["identities"]
    ]


def demo_eval_set(cache_dir: str | Path) -> Path:
    """Writes (once) an eval set over the demo dataset's identities: one reference each, 2 prompts."""
    import json

    from mm_lightning.data.demo import ensure_demo_dataset

    root = ensure_demo_dataset(cache_dir)
    out = root / "eval_set.yaml"
    if out.exists():
        return out
    identities, seen = [], set()
    for line in (root / "metadata.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "image" and row["identity"] not in seen:
            seen.add(row["identity"])
            class_word = next(w for w in ("woman", "man", "person") if f" {w} " in f" {row['caption']} ")
            identities.append({"name": row["identity"], "class_word": class_word, "references": row["references"][:1]})
    spec = {"identities": identities, "prompts": DEMO_PROMPTS, "prompts_per_identity": len(DEMO_PROMPTS)}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(spec, sort_keys=False))
    tmp.replace(out)
    return out
