"""MagicMirror's dual-branch facial feature extractor (paper Sec. 3.2).

A frozen CLIP vision model (transformers) gives dense features f of the reference face.
- Identity branch: the identity embedding (ArcFace 512-d, or dlib 128-d in the tiny
  profile) becomes `num_id_tokens` query tokens; an ID perceiver over f gives x_id, in
  PhotoMakerV2's ID-encoder layout so its checkpoint loads (photomaker_id_encoder.py). The
  fusion MLP writes x_id into the T5 tokens selected by the identity-token mask m:
  txt' = m * MLP_fuse(x_id, m * txt) + (1 - m) * txt.
- Structural branch: `num_face_tokens` learnable queries read the penultimate CLIP layer
  through a face perceiver; a projection to the DiT width gives x_face.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPVisionModel

from mm_lightning.models.perceiver import PerceiverResampler
from mm_lightning.models.photomaker_id_encoder import PhotoMakerIDPerceiver

# OpenAI CLIP normalisation; overridden by the image encoder's preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class FaceConditioning:
    """What the adapted transformer needs from the reference face(s)."""

    x_id: torch.Tensor | None  # [B, num_id_tokens, perceiver_dim]
    x_face: torch.Tensor | None  # [B, num_face_tokens, inner_dim]
    identity_mask: torch.Tensor  # [B, L] 1 at the prompt's identity tokens
    # [B, 2] per sample 1 = kept, 0 = dropped: (x_face's reads by text/video, CAN's x_id residual); None: all kept
    keep: torch.Tensor | None = None

    def for_guidance(self, uncond_face: bool = True, uncond_id: bool = True) -> FaceConditioning:
        """Conditioning for diffusers' [uncond, cond] batch under classifier-free guidance.

        Only the conditional prompt carries identity tokens, so x_id is never fused into the
        unconditional prompt. `uncond_face` / `uncond_id`: whether the unconditional half also
        reads x_face (cross-attention and face keys) / gets CAN's x_id residual (sampling.guidance_uncond_*).
        """
        twice = lambda t: None if t is None else torch.cat([t, t])  # noqa: E731
        mask = torch.cat([torch.zeros_like(self.identity_mask), self.identity_mask])
        keep = None
        if not (uncond_face and uncond_id):
            batch = self.identity_mask.shape[0]
            uncond = torch.tensor([float(uncond_face), float(uncond_id)], device=mask.device).expand(batch, 2)
            keep = torch.cat([uncond, torch.ones_like(uncond)])
        return FaceConditioning(twice(self.x_id), twice(self.x_face), mask, keep)


class FusionMLP(nn.Module):
    """MLP_fuse: writes x_id into the identity tokens of the T5 sequence.

    The MLP predicts a residual on the text token (last layer zero-initialised), so a
    freshly built model leaves the prompt embedding unchanged.
    """

    def __init__(self, text_dim: int, id_dim: int, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(text_dim + id_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, text_dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, text: torch.Tensor, x_id: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # text: [B, L, Dt], x_id: [B, Q, P], mask: [B, L] (1 at identity tokens)
        m = mask.to(text.dtype).unsqueeze(-1)  # [B, L, 1]
        masked_text = m * text
        id_flat = x_id.flatten(1).unsqueeze(1).expand(-1, text.shape[1], -1)  # [B, L, Q*P]
        fused = masked_text + self.net(torch.cat([masked_text, id_flat], dim=-1))
        return m * fused + (1 - m) * text


class DualBranchFaceEncoder(nn.Module):
    def __init__(
        self,
        clip: CLIPVisionModel,
        branches: list[str],
        id_embed_dim: int,
        text_dim: int,
        inner_dim: int,
        num_id_tokens: int,
        num_face_tokens: int,
        perceiver_dim: int,
        perceiver_depth: int,
        perceiver_heads: int,
        id_encoder_dim: int,
        id_encoder_depth: int,
        id_encoder_head_dim: int,
        freeze_id_perceiver: bool,
        clip_mean: tuple[float, ...] = CLIP_MEAN,
        clip_std: tuple[float, ...] = CLIP_STD,
    ):
        super().__init__()
        self.clip = clip.requires_grad_(False)
        self.clip_image_size = clip.config.image_size
        self.register_buffer("clip_mean", torch.tensor(clip_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(clip_std).view(1, 3, 1, 1), persistent=False)
        clip_dim = clip.config.hidden_size
        self.num_id_tokens = num_id_tokens
        self.perceiver_dim = perceiver_dim

        self.id_perceiver = self.fusion = None
        if "identity" in branches:
            self.id_perceiver = PhotoMakerIDPerceiver(
                id_embed_dim,
                clip_dim,
                id_encoder_dim,
                num_id_tokens,
                id_encoder_depth,
                id_encoder_head_dim,
                output_dim=perceiver_dim,
            )
            self.fusion = FusionMLP(text_dim, num_id_tokens * perceiver_dim, hidden_dim=max(text_dim, perceiver_dim))
            if freeze_id_perceiver:  # PhotoMakerV2's part; the new projection keeps training
                for module in self.id_perceiver.pretrained():
                    module.requires_grad_(False)

        self.face_queries = self.face_perceiver = self.face_proj = None
        if "structural" in branches:
            self.face_queries = nn.Parameter(torch.randn(1, num_face_tokens, perceiver_dim) * perceiver_dim**-0.5)
            self.face_perceiver = PerceiverResampler(
                clip_dim, perceiver_dim, perceiver_dim, perceiver_depth, perceiver_heads
            )
            self.face_proj = nn.Sequential(nn.Linear(perceiver_dim, inner_dim), nn.LayerNorm(inner_dim))

    def freeze_perceivers(self) -> None:
        """Keeps what turns the face into x_id and x_face as it is (model.train_face_encoder=false)."""
        for part in (self.id_perceiver, self.face_perceiver, self.face_proj):
            if part is not None:
                part.requires_grad_(False)
        if self.face_queries is not None:
            self.face_queries.requires_grad_(False)

    @torch.no_grad()
    def clip_features(self, ref_pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ref_pixels [B, 3, S, S] or [B, R, 3, S, S] in [0, 1] -> (last, penultimate) [B, R*N, C].

        Several reference images of one identity are read as one longer token sequence.
        """
        if ref_pixels.dim() == 4:
            ref_pixels = ref_pixels.unsqueeze(1)
        batch, refs = ref_pixels.shape[:2]
        pixels = ref_pixels.flatten(0, 1).to(self.clip_mean.dtype)
        if pixels.shape[-1] != self.clip_image_size:
            pixels = nn.functional.interpolate(pixels, size=self.clip_image_size, mode="bicubic", align_corners=False)
        pixels = ((pixels - self.clip_mean) / self.clip_std).to(self.clip.dtype)
        hidden = self.clip(pixel_values=pixels, output_hidden_states=True).hidden_states
        last, penultimate = hidden[-1], hidden[-2]  # [B*R, N, C]
        unfold = lambda t: t.unflatten(0, (batch, refs)).flatten(1, 2)  # noqa: E731
        return unfold(last), unfold(penultimate)

    def forward(
        self, ref_pixels: torch.Tensor, id_embeds: torch.Tensor, identity_mask: torch.Tensor
    ) -> FaceConditioning:
        # ref_pixels: [B, (R,) 3, S, S]; id_embeds: [B, id_embed_dim]; identity_mask: [B, L]
        last, penultimate = self.clip_features(ref_pixels)
        x_id = x_face = None
        if self.id_perceiver is not None:
            dtype = self.id_perceiver.proj.weight.dtype
            x_id = self.id_perceiver(id_embeds.to(dtype), last.to(dtype))  # [B, num_id_tokens, P]
        if self.face_perceiver is not None:
            # The perceiver's dtype, not the queries': a bare parameter escapes the dtype policy when frozen.
            dtype = self.face_perceiver.proj_in.weight.dtype
            queries = self.face_queries.to(dtype).expand(penultimate.shape[0], -1, -1)
            x_face = self.face_proj(self.face_perceiver(queries, penultimate.to(dtype)))  # [B, num_face_tokens, D]
        return FaceConditioning(x_id, x_face, identity_mask)

    def fuse_text(
        self, prompt_embeds: torch.Tensor, x_id: torch.Tensor | None, identity_mask: torch.Tensor
    ) -> torch.Tensor:
        """Writes x_id into prompt_embeds [B, L, Dt] at identity_mask [B, L]; identity when the branch is off."""
        if self.fusion is None or x_id is None:
            return prompt_embeds
        return self.fusion(prompt_embeds, x_id.to(prompt_embeds.dtype), identity_mask)
