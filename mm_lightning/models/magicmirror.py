"""MagicMirrorTransformer: diffusers' CogVideoXTransformer3DModel with MagicMirror adapters.

Every even-indexed block (0, 2, 4, ...) is wrapped in a `MagicMirrorBlock`; odd blocks
and everything else of the backbone are used as they are, frozen. `forward` follows
`CogVideoXTransformer3DModel.forward` step by step (time embedding, patch embedding,
blocks, output norm, unpatchify); it is rewritten here only because the face stream has
to be threaded through the block loop. It takes the same arguments, so diffusers'
`CogVideoXPipeline` can drive it: the face conditioning rides on `attention_kwargs`,
which the pipeline hands over untouched.
"""

from __future__ import annotations

import torch
from diffusers import CogVideoXTransformer3DModel
from torch import nn
from torch.utils.checkpoint import checkpoint

from mm_lightning.models.adapter import MagicMirrorBlock
from mm_lightning.models.face_encoder import DualBranchFaceEncoder, FaceConditioning


class MagicMirrorTransformer(nn.Module):
    def __init__(
        self,
        base: CogVideoXTransformer3DModel,
        face_encoder: DualBranchFaceEncoder,
        branches: list[str],
        face_modality: bool,
        can: bool,
        can_hidden_dim: int,
        face_attention: str = "joint",
        train_backbone: bool = False,
    ):
        super().__init__()
        self.base = base.requires_grad_(train_backbone)
        self.face_encoder = face_encoder
        self.config = base.config  # what CogVideoXPipeline reads (patch size, sample size, ...)
        time_dim = base.config.time_embed_dim
        structural = "structural" in branches

        # proj(x_id): CAN's identity input, shared by all adapted blocks.
        self.id_proj = None
        if can:
            id_dim = face_encoder.num_id_tokens * face_encoder.perceiver_dim
            self.id_proj = nn.Sequential(nn.Linear(id_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))

        blocks = base.transformer_blocks
        # By index, not by type: FSDP replaces each block with a wrapper that is no MagicMirrorBlock.
        self.adapted_blocks = frozenset(range(0, len(blocks), 2))
        for i in sorted(self.adapted_blocks):
            blocks[i] = MagicMirrorBlock(
                blocks[i],
                time_embed_dim=time_dim,
                use_cross_attention=structural,
                use_face_modality=face_modality,
                use_can=can,
                can_hidden_dim=can_hidden_dim,
                face_attention=face_attention,
            )
        self.gradient_checkpointing = False

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    def cache_context(self, name: str):
        return self.base.cache_context(name)  # CogVideoXPipeline wraps each call in it

    def encode_face(
        self, ref_pixels: torch.Tensor, id_embeds: torch.Tensor, identity_mask: torch.Tensor
    ) -> FaceConditioning:
        return self.face_encoder(ref_pixels, id_embeds, identity_mask)

    def _run(self, fn, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(
        self,
        hidden_states: torch.Tensor,  # noisy latents [B, F, C, H, W]
        encoder_hidden_states: torch.Tensor,  # T5 prompt embeddings [B, L, Dt]
        timestep: torch.Tensor,  # [B]
        timestep_cond: torch.Tensor | None = None,
        ofs: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_kwargs: dict | None = None,
        return_dict: bool = False,
        face: FaceConditioning | None = None,
    ):
        face = face if face is not None else (attention_kwargs or {}).get("face")
        if face is None:
            raise ValueError(
                "MagicMirrorTransformer needs face conditioning (face=... or attention_kwargs={'face': ...})"
            )
        base = self.base
        batch_size, num_frames, _, height, width = hidden_states.shape

        # 1. Identity branch: x_id into the identity tokens of the prompt.
        encoder_hidden_states = self.face_encoder.fuse_text(encoder_hidden_states, face.x_id, face.identity_mask)

        # 2. Time embedding (as in the diffusers model).
        emb = base.time_embedding(base.time_proj(timestep).to(dtype=hidden_states.dtype), timestep_cond)
        if base.ofs_embedding is not None:
            emb = emb + base.ofs_embedding(base.ofs_proj(ofs).to(dtype=hidden_states.dtype))
        id_cond = self.id_proj(face.x_id.flatten(1).to(emb.dtype)) if self.id_proj is not None else None

        # 3. Patch embedding; text tokens first.
        hidden_states = base.embedding_dropout(base.patch_embed(encoder_hidden_states, hidden_states))
        text_len = encoder_hidden_states.shape[1]
        # Copies with standard strides: every block then sees the same input layout (one graph under torch.compile).
        encoder_hidden_states = hidden_states[:, :text_len].clone(memory_format=torch.contiguous_format)
        hidden_states = hidden_states[:, text_len:].clone(memory_format=torch.contiguous_format)
        face_tokens = face.x_face.to(hidden_states.dtype) if face.x_face is not None else None  # [B, Nf, D]

        # 4. Blocks: adapted ones also carry the face stream.
        for i, block in enumerate(base.transformer_blocks):
            if i in self.adapted_blocks:
                hidden_states, encoder_hidden_states, face_tokens = self._run(
                    block, hidden_states, encoder_hidden_states, face_tokens, emb, id_cond, image_rotary_emb, face.keep
                )
            else:
                hidden_states, encoder_hidden_states = self._run(
                    block, hidden_states, encoder_hidden_states, emb, image_rotary_emb
                )

        # 5. Output norm, projection and unpatchify (as in the diffusers model).
        hidden_states = base.norm_out(base.norm_final(hidden_states), temb=emb)
        hidden_states = base.proj_out(hidden_states)
        p, p_t = base.config.patch_size, base.config.patch_size_t
        if p_t is None:
            output = hidden_states.reshape(batch_size, num_frames, height // p, width // p, -1, p, p)
            output = output.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
        else:
            output = hidden_states.reshape(
                batch_size, (num_frames + p_t - 1) // p_t, height // p, width // p, -1, p_t, p, p
            )
            output = output.permute(0, 1, 5, 4, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(1, 2)
        return (output,)

    def trainable_names(self) -> set[str]:
        """The trained parameters' names as state dicts key them: without the prefix FSDP's units add."""
        return {n.replace("_fsdp_wrapped_module.", "") for n, p in self.named_parameters() if p.requires_grad}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the trained weights: checkpoints never hold the frozen backbone, T5, VAE or CLIP."""
        names = self.trainable_names()
        return {k: v for k, v in self.state_dict().items() if k in names}


def compile_blocks(blocks: nn.ModuleList) -> None:
    """torch.compile each transformer block in place (`trainer.compile_blocks`, `bench --compile`).

    One compiled graph serves every block of a class, since weights are graph inputs and the
    forward hands every block inputs of the same layout. Static shapes: each batch shape
    (e.g. training at B and guidance at 2B) gets its own graph."""
    for block in blocks:
        block.compile(dynamic=False)
