"""PhotoMakerV2's ID encoder checkpoint loads into the ID branch, key for key."""

import math

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from mm_lightning.config import ConfigError, load_config
from mm_lightning.models.loading import load_components
from tests.helpers import PAPER_TRAINING


def photomaker_v2_id_encoder(clip_state: dict, id_dim: int, clip_dim: int, dim: int, tokens: int, depth: int) -> dict:
    """A random state dict laid out as PhotoMakerV2's `PhotoMakerIDEncoder_CLIPInsightfaceExtendtoken`
    (TencentARC/PhotoMaker, photomaker/model_v2.py and resampler.py), names and shapes written out here."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    p = "qformer_perceiver."
    sd = {
        f"{p}token_proj.0.weight": r(id_dim * 4, id_dim),
        f"{p}token_proj.0.bias": r(id_dim * 4),
        f"{p}token_proj.2.weight": r(dim * tokens, id_dim * 4),
        f"{p}token_proj.2.bias": r(dim * tokens),
        f"{p}token_norm.weight": 1 + r(dim),
        f"{p}token_norm.bias": r(dim),
        f"{p}perceiver_resampler.proj_in.weight": r(dim, clip_dim),
        f"{p}perceiver_resampler.proj_in.bias": r(dim),
        f"{p}perceiver_resampler.proj_out.weight": r(dim, dim),
        f"{p}perceiver_resampler.proj_out.bias": r(dim),
        f"{p}perceiver_resampler.norm_out.weight": 1 + r(dim),
        f"{p}perceiver_resampler.norm_out.bias": r(dim),
    }
    for i in range(depth):
        layer = f"{p}perceiver_resampler.layers.{i}."
        sd |= {
            f"{layer}0.norm1.weight": 1 + r(dim),
            f"{layer}0.norm1.bias": r(dim),
            f"{layer}0.norm2.weight": 1 + r(dim),
            f"{layer}0.norm2.bias": r(dim),
            f"{layer}0.to_q.weight": r(dim, dim),
            f"{layer}0.to_kv.weight": r(2 * dim, dim),
            f"{layer}0.to_out.weight": r(dim, dim),
            f"{layer}1.0.weight": 1 + r(dim),
            f"{layer}1.0.bias": r(dim),
            f"{layer}1.1.weight": r(4 * dim, dim),
            f"{layer}1.3.weight": r(dim, 4 * dim),
        }
    # SDXL-only parts MagicMirror does not use, and the CLIP ViT.
    sd |= {
        "fuse_module.mlp1.fc1.weight": r(8, 8),
        "visual_projection.weight": r(8, clip_dim),
        "visual_projection_2.weight": r(8, clip_dim),
    }
    # PhotoMaker's CLIPVisionModelWithProjection (transformers 4) nests the ViT under vision_model.
    sd |= {"vision_model." + k.removeprefix("vision_model."): v + r(*v.shape) for k, v in clip_state.items()}
    return sd


def photomaker_forward(sd: dict, id_embeds, features, tokens: int, dim: int, depth: int, head_dim: int):
    """PhotoMakerV2's QFormerPerceiver.forward, transcribed from its source, on a raw state dict."""
    p = lambda name: sd[f"qformer_perceiver.{name}"]  # noqa: E731
    ln = lambda x, name: F.layer_norm(x, x.shape[-1:], p(f"{name}.weight"), p(f"{name}.bias"))  # noqa: E731
    x = F.linear(
        F.gelu(F.linear(id_embeds, p("token_proj.0.weight"), p("token_proj.0.bias"))),
        p("token_proj.2.weight"),
        p("token_proj.2.bias"),
    ).reshape(-1, tokens, dim)
    x = ln(x, "token_norm")
    feats = F.linear(features, p("perceiver_resampler.proj_in.weight"), p("perceiver_resampler.proj_in.bias"))
    latents, heads = x, dim // head_dim
    for i in range(depth):
        pre = f"perceiver_resampler.layers.{i}."
        f_n, l_n = ln(feats, pre + "0.norm1"), ln(latents, pre + "0.norm2")
        q = F.linear(l_n, p(pre + "0.to_q.weight"))
        k, v = F.linear(torch.cat([f_n, l_n], 1), p(pre + "0.to_kv.weight")).chunk(2, -1)
        q, k, v = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        scale = 1 / math.sqrt(math.sqrt(head_dim))
        out = torch.softmax((q * scale) @ (k * scale).transpose(-2, -1), -1) @ v
        latents = F.linear(out.permute(0, 2, 1, 3).flatten(2), p(pre + "0.to_out.weight")) + latents
        h = ln(latents, pre + "1.0")
        latents = F.linear(F.gelu(F.linear(h, p(pre + "1.1.weight"))), p(pre + "1.3.weight")) + latents
    out = F.linear(latents, p("perceiver_resampler.proj_out.weight"), p("perceiver_resampler.proj_out.bias"))
    return x + ln(out, "perceiver_resampler.norm_out")


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_photomaker_v2_checkpoint_loads_key_for_key(tmp_path, suffix):
    cfg = load_config("full")
    m = cfg.model
    clip_state = load_components(cfg).transformer.face_encoder.clip.state_dict()
    clip_dim = next(v for k, v in clip_state.items() if k.endswith("pre_layrnorm.weight")).shape[0]
    sd = photomaker_v2_id_encoder(clip_state, 128, clip_dim, m.id_encoder_dim, m.num_id_tokens, m.id_encoder_depth)
    path = tmp_path / f"photomaker-v2{suffix}"
    if suffix == ".bin":
        torch.save({"id_encoder": sd, "lora_weights": {}}, path)
    else:
        save_file({f"id_encoder.{k}": v.contiguous() for k, v in sd.items()}, str(path))
    encoder = load_components(load_config("full", overrides=[f"weights.photomaker_v2={path}"])).transformer.face_encoder

    for key, value in encoder.clip.state_dict().items():
        expected = sd["vision_model." + key.removeprefix("vision_model.")]
        assert torch.equal(value, expected.to(value.dtype)), key  # F_feat is PhotoMakerV2's CLIP
    features, id_embeds = torch.randn(2, 5, clip_dim), torch.randn(2, 128)
    perceiver = encoder.id_perceiver
    with torch.no_grad():
        tokens = perceiver.token_norm(perceiver.token_proj(id_embeds).unflatten(-1, (m.num_id_tokens, -1)))
        ours = tokens + perceiver.perceiver_resampler(tokens, features)
        theirs = photomaker_forward(
            sd, id_embeds, features, m.num_id_tokens, m.id_encoder_dim, m.id_encoder_depth, m.id_encoder_head_dim
        )
    assert torch.allclose(ours, theirs, atol=1e-5)

    overrides = [f"weights.photomaker_v2={path}", "model.freeze_id_perceiver=true", *PAPER_TRAINING]
    frozen = load_components(load_config("full", overrides=overrides))
    trainable = {n for n, p in frozen.transformer.face_encoder.id_perceiver.named_parameters() if p.requires_grad}
    assert trainable == {"proj.weight", "proj.bias"}  # PhotoMakerV2's part frozen, the new projection trains


def test_mismatched_checkpoint_and_freezing_random_weights_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="freeze_id_perceiver=true .* weights.photomaker_v2 is not set"):
        load_config("full", overrides=["model.freeze_id_perceiver=true"])
    cfg = load_config("full")
    clip_state = load_components(cfg).transformer.face_encoder.clip.state_dict()
    sd = photomaker_v2_id_encoder(clip_state, 512, 32, 64, 2, 1)  # ArcFace-sized, but the tiny model has dlib's 128
    torch.save({"id_encoder": sd, "lora_weights": {}}, tmp_path / "pm.bin")
    with pytest.raises(ValueError, match="does not fit this model's"):
        load_components(load_config("full", overrides=[f"weights.photomaker_v2={tmp_path}/pm.bin"]))
    with pytest.raises(FileNotFoundError, match="weights.photomaker_v2: no file"):
        load_components(load_config("full", overrides=[f"weights.photomaker_v2={tmp_path}/nope.bin"]))
