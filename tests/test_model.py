"""The adapted transformer: exact zero-init equivalence, frozen base, branch flags, loading."""

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from mm_lightning.config import list_experiments, load_config
from mm_lightning.models.loading import MissingWeightsError, check_weight_paths, load_components
from mm_lightning.pipeline import build_pipeline
from mm_lightning.text import identity_token_mask


def _inputs(components, cfg, batch=2, latent_frames=3):
    torch.manual_seed(1)
    tconf = components.transformer.config
    latents = torch.randn(batch, latent_frames, tconf.in_channels, 8, 8)
    prompt_embeds = torch.randn(batch, tconf.max_text_seq_length, tconf.text_embed_dim)
    timestep = torch.tensor([10, 700])[:batch]
    pipe = build_pipeline(components)
    rotary = pipe._prepare_rotary_positional_embeddings(64, 64, latent_frames, torch.device("cpu"))
    prompts = ["a man walking in the park", "a woman smiling"][:batch]
    mask = identity_token_mask(components.tokenizer, prompts, cfg.model.identity_words, None, tconf.max_text_seq_length)
    clip_size = components.transformer.face_encoder.clip_image_size
    face = components.transformer.encode_face(torch.rand(batch, 3, clip_size, clip_size), torch.randn(batch, 128), mask)
    return latents, prompt_embeds, timestep, rotary, face


@pytest.mark.parametrize("experiment", list_experiments())
def test_fresh_adapted_model_equals_plain_diffusers_transformer(experiment):
    cfg = load_config(experiment)
    components = load_components(cfg)
    plain = CogVideoXTransformer3DModel.from_pretrained(cfg.weights.transformer)
    latents, text, t, rotary, face = _inputs(components, cfg)
    assert face.identity_mask.sum() > 0  # the class words were found, so the fusion path runs
    with torch.no_grad():
        expected = plain(latents, text, t, image_rotary_emb=rotary, return_dict=False)[0]
        adapted = components.transformer(latents, text, t, image_rotary_emb=rotary, face=face)[0]
    assert (adapted - expected).abs().max().item() <= 1e-5

    # The adapters are really in the path: non-zero values and modulations change the output.
    with torch.no_grad():
        for p in components.transformer.parameters():
            if p.requires_grad and p.abs().sum() == 0:
                p.normal_(std=0.1)
        perturbed = components.transformer(latents, text, t, image_rotary_emb=rotary, face=face)[0]
    assert (perturbed - expected).abs().max().item() > 1e-3


@pytest.mark.parametrize("experiment", list_experiments())
def test_only_adapter_and_encoder_parameters_get_gradients(experiment):
    cfg = load_config(experiment)
    components = load_components(cfg)
    latents, text, t, rotary, face = _inputs(components, cfg)
    model = components.transformer
    # Zero-init outputs block the gradient to everything upstream; give them a value first.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.abs().sum() == 0:
                p.normal_(std=0.1)
    face = model.encode_face(*_face_args(components, cfg))
    model(latents, text, t, image_rotary_emb=rotary, face=face)[0].pow(2).mean().backward()
    base_names = {f"base.{n}" for n, _ in CogVideoXTransformer3DModel.from_pretrained(cfg.weights.transformer).named_parameters()}
    for name, p in model.named_parameters():
        is_base = name.replace(".block.", ".") in base_names or name.startswith("face_encoder.clip.")
        if is_base:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad, name
    trainable_with_grad = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert trainable_with_grad
    # every flagged component exists and only those
    names = " ".join(n for n, _ in model.named_parameters())
    assert ("id_perceiver" in names) == ("identity" in cfg.model.branches)
    assert ("face_perceiver" in names) == ("structural" in cfg.model.branches)
    assert ("to_k_face" in names) == ("structural" in cfg.model.branches)
    assert ("face_modulation" in names) == cfg.model.face_modality
    assert (".can." in names) == cfg.model.can


def _face_args(components, cfg, batch=2):
    tconf = components.transformer.config
    prompts = ["a man walking in the park", "a woman smiling"][:batch]
    mask = identity_token_mask(components.tokenizer, prompts, cfg.model.identity_words, None, tconf.max_text_seq_length)
    size = components.transformer.face_encoder.clip_image_size
    return torch.rand(batch, 3, size, size), torch.randn(batch, 128), mask


def test_adapters_sit_in_even_blocks_only():
    model = load_components(load_config("full")).transformer
    kinds = [type(b).__name__ for b in model.base.transformer_blocks]
    assert kinds == ["MagicMirrorBlock", "CogVideoXBlock"] * (len(kinds) // 2)


def test_identity_token_mask_marks_class_words_and_trigger_word():
    components = load_components(load_config("full"))
    tok = components.tokenizer
    mask = identity_token_mask(tok, ["a woman walking", "a photo of a park"], ["man", "woman"], None, 16)
    assert mask[0].sum() >= 1 and mask[1].sum() == 0
    ids = tok("a woman walking", max_length=16, padding="max_length").input_ids
    marked = [tok.decode([ids[j]]).strip() for j in range(16) if mask[0, j]]
    assert "".join(marked) == "woman"
    trig = identity_token_mask(tok, ["a man walking"], ["man"], "walking", 16)
    assert "".join(tok.decode([ids]).strip() for ids, m in zip(tok("a man walking", max_length=16, padding="max_length").input_ids, trig[0]) if m) == "walking"


def test_missing_weights_name_path_files_and_origin(tmp_path):
    cfg = load_config("full", "cogvideox-5b", [f"weights.transformer={tmp_path}/nope/transformer"])
    with pytest.raises(MissingWeightsError) as err:
        check_weight_paths(cfg.weights)
    message = str(err.value)
    assert f"{tmp_path}/nope/transformer" in message
    assert "diffusion_pytorch_model" in message and "CogVideoX" in message
    assert "weights.image_encoder" in message
