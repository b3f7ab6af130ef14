"""The cogvideox-2b and cogvideox1.5-5b profiles: parameter tables on the meta device, and each
architecture (2B's sin-cos positions, 1.5's 2-frame patches) at tiny width: the fresh adapted model
computes exactly what diffusers' model computes, and 1.5's frame rule holds in training and sampling."""

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from mm_lightning.commands.describe import parameter_table
from mm_lightning.config import load_config
from mm_lightning.models.loading import build_from_architecture, load_components
from mm_lightning.module import pad_to_temporal_patch
from mm_lightning.pipeline import build_pipeline, sample_video
from mm_lightning.text import identity_token_mask

# The keys that make each backbone what it is; sizes stay the tiny profile's.
ARCHITECTURE_KEYS = (
    "patch_size",
    "patch_size_t",
    "patch_bias",
    "use_rotary_positional_embeddings",
    "use_learned_positional_embeddings",
    "spatial_interpolation_scale",
    "temporal_interpolation_scale",
)
PROFILES = ["cogvideox-2b", "cogvideox1.5-5b"]


@pytest.mark.parametrize(
    "profile, backbone", [("cogvideox-2b", (1.65e9, 1.75e9)), ("cogvideox1.5-5b", (5.5e9, 5.65e9))]
)
def test_describe_counts_the_real_backbone_on_the_meta_device(profile, backbone):
    rows = {name: total for name, total, _ in parameter_table(build_from_architecture(load_config("full", profile)))}
    low, high = backbone  # CogVideoX-2B has 1.69B transformer parameters, CogVideoX1.5-5B about 5.57B
    assert low < rows["backbone (CogVideoX transformer)"] < high
    assert rows["CAN"] > 0 and rows["cross-attention"] > 0


def _tiny_of(profile: str, tmp_path):
    real = load_config("full", profile).architecture.transformer
    overrides = [f"architecture.transformer.{k}={real[k]}" for k in ARCHITECTURE_KEYS if k in real]
    return load_config("full", overrides=[f"cache_dir={tmp_path}", *overrides])  # tiny weights written there


@pytest.mark.parametrize("profile", PROFILES)
def test_fresh_adapted_model_equals_diffusers_model_on_the_profile_architecture(profile, tmp_path):
    cfg = _tiny_of(profile, tmp_path)
    components = load_components(cfg)
    tconf = components.transformer.config
    assert tconf.use_rotary_positional_embeddings == (profile != "cogvideox-2b")  # 2B: sin-cos positions
    plain = CogVideoXTransformer3DModel.from_pretrained(cfg.weights.transformer)
    torch.manual_seed(1)
    # 3 latent frames (9 video frames): odd, so 1.5's 2-frame patches need the training recipe's padding.
    latents = pad_to_temporal_patch(torch.randn(2, 3, tconf.in_channels, 8, 8), tconf.patch_size_t)
    assert latents.shape[1] == (4 if tconf.patch_size_t == 2 else 3)
    text = torch.randn(2, tconf.max_text_seq_length, tconf.text_embed_dim)
    t = torch.tensor([10, 700])
    rotary = None
    if tconf.use_rotary_positional_embeddings:
        pipe = build_pipeline(components)
        rotary = pipe._prepare_rotary_positional_embeddings(64, 64, latents.shape[1], torch.device("cpu"))
    mask = identity_token_mask(
        components.tokenizer,
        ["a man walking", "a woman smiling"],
        cfg.model.identity_words,
        None,
        tconf.max_text_seq_length,
    )
    size = components.transformer.face_encoder.clip_image_size
    face = components.transformer.encode_face(torch.rand(2, 3, size, size), torch.randn(2, 128), mask)
    with torch.no_grad():
        expected = plain(latents, text, t, image_rotary_emb=rotary, return_dict=False)[0]
        adapted = components.transformer(latents, text, t, image_rotary_emb=rotary, face=face)[0]
    assert adapted.shape == latents.shape
    assert (adapted - expected).abs().max().item() <= 1e-5

    # 1.5's sampling frame rule (diffusers pads 3 latent frames to 4, drops the padding): 9 frames out.
    if tconf.patch_size_t:
        sampling = load_config("full", overrides=[f"cache_dir={tmp_path}", "sampling.num_inference_steps=1"])
        frames = sample_video(
            build_pipeline(components),
            sampling,
            "a man talking",
            torch.rand(1, 3, size, size),
            torch.randn(128),
            seed=0,
        )
        assert frames.shape == (9, 64, 64, 3)


def test_pad_to_temporal_patch_repeats_the_first_latent_frame_in_front():
    latents = torch.arange(3.0).view(1, 3, 1, 1, 1)
    assert pad_to_temporal_patch(latents, 2).flatten().tolist() == [0.0, 0.0, 1.0, 2.0]
    assert pad_to_temporal_patch(latents, None) is latents
