"""Text alignment is built only from a complete local CLIP folder; the plumbing is checked on a tiny one."""

import json

import numpy as np
import pytest
import torch
import transformers

from mm_lightning.evaluation.suite import EvaluatorConfig, VideoEvaluator
from mm_lightning.evaluation.text_alignment import TextAlignment, clip_unavailable_reason


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A 1-layer CLIP with random weights and a 26-letter vocabulary: tests the wiring, scores nothing."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in map(chr, range(ord("a"), ord("z") + 1)):
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, **small
        ),
        vision_config=dict(image_size=32, patch_size=8, **small),
        projection_dim=16,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(folder)
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(folder)
    return folder


def test_reasons_name_what_is_missing(tmp_path):
    assert "no CLIP path" in clip_unavailable_reason(None)
    assert "does not exist" in clip_unavailable_reason(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{}")
    reason = clip_unavailable_reason(tmp_path)
    assert "weights" in reason and "tokenizer" in reason and "config" not in reason.split("lacks")[1]
    with pytest.raises(FileNotFoundError, match="lacks weights"):
        TextAlignment(tmp_path)


def test_evaluator_without_clip_has_no_text_alignment():
    evaluator = VideoEvaluator(EvaluatorConfig(clip_path=None))
    assert "text_alignment" not in evaluator.metrics
    assert evaluator.text_alignment_skipped


def test_score_is_the_mean_frame_cosine(tiny_clip):
    assert clip_unavailable_reason(tiny_clip) is None
    metric = TextAlignment(tiny_clip, batch_size=2)
    frames = np.random.default_rng(0).integers(0, 255, (3, 48, 64, 3), dtype=np.uint8)
    value = float(metric(frames, "a man"))
    # By hand: all frames in one batch through CLIPModel, cosine of normalised embeddings.
    pixels = metric.image_processor(images=list(frames), return_tensors="pt")["pixel_values"]
    text = metric.tokenizer(["a man"], return_tensors="pt")
    with torch.no_grad():
        out = metric.model(**text, pixel_values=pixels)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    assert value == pytest.approx(float(cos.mean()), abs=1e-5)
    assert float(metric.compute()) == pytest.approx(value)
    import hashlib

    digest = hashlib.sha256((tiny_clip / "model.safetensors").read_bytes()).hexdigest()
    assert metric.provenance == f"CLIPScore on {tiny_clip.name} (weights sha256 {digest})"
    assert VideoEvaluator(EvaluatorConfig(clip_path=str(tiny_clip))).text_alignment_provenance == metric.provenance
