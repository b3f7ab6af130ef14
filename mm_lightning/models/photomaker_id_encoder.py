"""MagicMirror's ID perceiver tau_id, in PhotoMakerV2's ID-encoder layout (paper Sec. 4.1:
"We adopt the feature extractor F_feat and ID perceiver tau_id from a pre-trained PhotoMakerV2").

PhotoMakerV2's `QFormerPerceiver` (TencentARC/PhotoMaker, photomaker/model_v2.py), written
here anew with the same parameter names:
- token_proj: the ArcFace embedding (512-d) -> num_tokens query tokens (MLP with ratio 4);
- token_norm: LayerNorm of those tokens;
- perceiver_resampler: the tokens read CLIP's last hidden state (dim_head 128);
- a residual: x_id = tokens + resampler(tokens, f).
Then a new projection (`proj`, not in PhotoMakerV2) maps its width (2048, SDXL's text
width) to this model's x_id width (model.perceiver_dim).

PhotoMakerV2's checkpoint (photomaker-v2.bin: {"id_encoder": ..., "lora_weights": ...}, or
its .safetensors with "id_encoder." prefixes) holds the whole ID encoder: CLIP ViT-L/14
(`vision_model.*`), which becomes F_feat, and `qformer_perceiver.*`, which becomes tau_id.
Its SDXL-specific parts (fuse_module, visual projections, LoRA) are not used.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from mm_lightning.models.perceiver import PerceiverResampler

PERCEIVER_PREFIX = "qformer_perceiver."
CLIP_PREFIX = "vision_model."


class PhotoMakerIDPerceiver(nn.Module):
    """id_embeds [B, id_embed_dim] + CLIP features [B, N, clip_dim] -> x_id [B, num_tokens, output_dim]."""

    def __init__(
        self, id_embed_dim: int, clip_dim: int, dim: int, num_tokens: int, depth: int, head_dim: int, output_dim: int
    ):
        super().__init__()
        self.num_tokens, self.dim = num_tokens, dim
        self.token_proj = nn.Sequential(
            nn.Linear(id_embed_dim, id_embed_dim * 4), nn.GELU(), nn.Linear(id_embed_dim * 4, dim * num_tokens)
        )
        self.token_norm = nn.LayerNorm(dim)
        self.perceiver_resampler = PerceiverResampler(clip_dim, dim, dim, depth, num_heads=dim // head_dim)
        self.proj = nn.Linear(dim, output_dim)  # new: PhotoMakerV2's width -> this model's

    def pretrained(self) -> list[nn.Module]:
        """The parts PhotoMakerV2's checkpoint provides."""
        return [self.token_proj, self.token_norm, self.perceiver_resampler]

    def forward(self, id_embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        tokens = self.token_norm(self.token_proj(id_embeds).unflatten(-1, (self.num_tokens, self.dim)))
        return self.proj(tokens + self.perceiver_resampler(tokens, features))


def read_photomaker_v2(path: str | Path) -> dict[str, torch.Tensor]:
    """The "id_encoder" state dict of a PhotoMakerV2 checkpoint file (.bin or .safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights.photomaker_v2: no file at {path} (PhotoMakerV2's photomaker-v2.bin from TencentARC/PhotoMaker-V2)"
        )
    if path.suffix == ".safetensors":
        flat = load_file(str(path))
        return {k[len("id_encoder.") :]: v for k, v in flat.items() if k.startswith("id_encoder.")}
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "id_encoder" not in checkpoint:
        raise ValueError(f"{path} is not a PhotoMaker checkpoint: no 'id_encoder' (keys: {list(checkpoint)[:5]})")
    return checkpoint["id_encoder"]


def split_photomaker_v2(id_encoder: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """PhotoMakerV2's id_encoder state dict -> (PhotoMakerIDPerceiver keys, CLIPVisionModel keys)."""
    perceiver = {k[len(PERCEIVER_PREFIX) :]: v for k, v in id_encoder.items() if k.startswith(PERCEIVER_PREFIX)}
    clip = {k: v for k, v in id_encoder.items() if k.startswith(CLIP_PREFIX)}
    if not perceiver:
        raise ValueError("the PhotoMaker checkpoint has no qformer_perceiver.* weights: it is PhotoMaker V1, not V2")
    return perceiver, clip


def load_photomaker_v2(id_perceiver: PhotoMakerIDPerceiver, clip: nn.Module, path: str | Path) -> None:
    """PhotoMakerV2's ID perceiver into `id_perceiver` (all but the new `proj`) and its CLIP into `clip`."""
    perceiver, clip_weights = split_photomaker_v2(read_photomaker_v2(path))
    expected = {k: v.shape for k, v in id_perceiver.state_dict().items() if not k.startswith("proj.")}
    if {k: v.shape for k, v in perceiver.items()} != expected:
        raise ValueError(
            f"{path}: PhotoMakerV2's ID perceiver does not fit this model's: it needs faces.backend=insightface "
            "(512-d ArcFace), model.id_encoder_dim=2048, id_encoder_depth=4, id_encoder_head_dim=128, num_id_tokens=2"
        )
    id_perceiver.load_state_dict(perceiver, strict=False)  # all but the new proj
    if clip_weights:
        clip_keys = clip.state_dict().keys()
        if not any(k.startswith(CLIP_PREFIX) for k in clip_keys):  # transformers 5 dropped CLIPVisionModel.vision_model
            clip_weights = {k[len(CLIP_PREFIX) :]: v for k, v in clip_weights.items()}
        if set(clip_keys) - set(clip_weights):
            raise ValueError(f"{path}: PhotoMakerV2's CLIP does not fit weights.image_encoder's (a ViT-L/14 is needed)")
        clip.load_state_dict({k: clip_weights[k] for k in clip_keys})
