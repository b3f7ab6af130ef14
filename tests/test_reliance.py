"""The identity-reliance probe: exactly 0 on a fresh model of every variant, positive once the
face branch has learned to tell two identities apart, and blind to everything but the face."""

import pytest
import torch

from mm_lightning.config import list_experiments, load_config
from mm_lightning.evaluation.eval_set import demo_eval_set, load_eval_set
from mm_lightning.faces import build_face_analyzer
from mm_lightning.module import MagicMirrorModule
from mm_lightning.reliance import RelianceProbe, donor_indices
from mm_lightning.reports import ablation_table

FAST = ["eval.reliance_identities=3", "eval.reliance_timesteps=2"]


def test_donors_share_the_caption_where_they_can():
    captions = ["a woman", "a man", "a woman", "a man", "a woman", "an elderly woman"]
    donors = donor_indices(captions)
    assert all(d != i for i, d in enumerate(donors))
    assert donors[:5] == [2, 3, 4, 1, 0]  # the next one with the same caption, cyclically
    assert donors[5] == 0  # no other sample shares it: the next one in the batch


@pytest.mark.parametrize("experiment", list_experiments())
def test_probe_reads_exactly_zero_on_a_fresh_model(experiment):
    cfg = load_config(experiment, overrides=FAST)
    module = MagicMirrorModule(cfg, stage=cfg.curriculum.order[0])
    result = RelianceProbe.from_config(cfg, module.transformer.face_encoder.clip_image_size).measure(module)
    assert result.own.shape == (2, 3) and result.own.min() > 0
    assert torch.equal(result.own, result.swapped)  # zero-init adapters: the face changes nothing yet
    assert result.metrics()["id_reliance"] == 0.0


def _two_identity_probe(cfg, module, zero_faces: bool = False) -> RelianceProbe:
    """Two demo identities that share their caption ("a woman ..."): only the face tells them apart."""
    items = [item for item in load_eval_set(demo_eval_set(cfg.cache_dir)) if item.identity in ("astronaut", "t1_a")]
    probe = RelianceProbe(
        items,
        build_face_analyzer("dlib"),
        module.transformer.face_encoder.clip_image_size,
        num_timesteps=4,
        max_batch=8,
    )
    assert probe.captions[0] == probe.captions[1] and probe.donors == [1, 0]
    if zero_faces:
        probe.ref_pixels.zero_()
        probe.id_embedding.zero_()
    return probe


def _train_on(module, probe, steps: int = 100) -> None:
    """Plain AdamW on the probe's two samples (each with its own reference), random noise, and timesteps drawn
    as the profile's training draws them."""
    latents, prompt_embeds, mask, _ = probe.encoded(module)
    params = [p for p in module.transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        face = module.transformer.encode_face(probe.ref_pixels, probe.id_embedding, mask)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = module.sample_timesteps(len(latents), generator, latents.device)
        _, error = module.denoising_error(latents, prompt_embeds, face, noise, timesteps)
        optimizer.zero_grad()
        error.mean().backward()
        optimizer.step()


@pytest.mark.slow  # 100 training steps: the face's effect takes off after about 80
def test_probe_sees_a_trained_face_branch_and_nothing_else():
    torch.manual_seed(0)
    cfg = load_config("full")
    module = MagicMirrorModule(cfg, stage="image_pretrain")
    probe = _two_identity_probe(cfg, module)
    assert probe.measure(module).metrics()["id_reliance"] == 0.0
    _train_on(module, probe)
    trained = probe.measure(module).metrics()
    print("trained on two identities:", trained)
    # Each sample is denoised better with its own face than with the other identity's.
    assert trained["id_reliance"] > 0 and trained["id_reliance_relative"] > 0.01, trained

    # The same trained model with the face inputs zeroed: own and swapped references are then the
    # same input, so any reading left would come from the caption, the noise or the timesteps.
    blind = _two_identity_probe(cfg, module, zero_faces=True).measure(module).metrics()
    assert abs(blind["id_reliance"]) < 1e-6 * abs(trained["id_reliance"]) + 1e-9, blind


def test_ablation_table_shows_id_reliance_over_seeds_against_full():
    runs = [
        ablation_table.TrainRun(variant, str(seed), "m", "FINISHED", seed, {"id_reliance": value})
        for variant, values in (("full", (0.02, 0.04)), ("structural_only", (0.01, 0.01)))
        for seed, value in enumerate(values)
    ]
    table = ablation_table.aggregate("ablation", "m", runs, ablation_table.DEFAULT_METRICS, {})
    text = ablation_table.render(table, "md")
    assert "| id_reliance | Δ full |" in text
    assert "| 0.0300 ± 0.0141 (n=2) | +0.0000 |" in text
    assert "| 0.0100 ± 0.0000 (n=2) | -0.0200 |" in text
