"""MagicMirror's cross-modal adapter around one diffusers `CogVideoXBlock` (paper Sec. 3.3).

The block itself (norms, attention projections, feed-forward) is used as is and stays
frozen. What is hand-written here is only what MagicMirror adds, and the orchestration
that lets it in:

- CAN: a zero-initialised residual on the block's own modulation,
  (m_vid, m_txt) = phi(t) + phi_cond([proj(x_id), t, mu1_vid]), for the shift/scale/gate of
  both sub-blocks and both modalities; mu1_vid is the block's first video shift.
- m_face: x_face is a third stream of the joint attention with its own adaptive norm
  phi_face(t) (shift/scale/gate for attention and feed-forward). Each adapted block has
  its own phi_face, so the layer index l of phi_face(t, l) is carried by the weights.
  The face stream queries [text, video, face]; text and video queries read the face keys
  inside the joint softmax (paper Eq. 8's T_SA(W_q x_full, W_kv x_face)), see below.
- Decoupled cross-attention (as IP-Adapter): the block's text+video queries also attend
  to the face tokens through new K/V projections, and both results share the block's
  output projection: out = W_o (SA(x) + CA(W_q x, W'_kv x_face)). The cross-attention
  query is taken before RoPE (the face keys carry no position; as diffusers' IP-Adapter
  for Flux), so a face feature reads the same at every video position.

Zero initialisation and exact equivalence: the new value projection and every new
modulation predictor start at zero. Face keys inside the frozen softmax would change the
base output whatever the zero-init, so the joint softmax over [text, video, face] keys is
computed as the base attention merged with a face-key attention through their
log-sum-exps, the face logits shifted by log g_h for a non-negative per-head gate
g_h = max(w_h, 0) that starts at 0 (its gradient passes straight through, so a head pushed
below 0 can reopen):
    out = out_base + w (out_face - out_base),   w = g e^{lse_f} / (e^{lse_b} + g e^{lse_f}),
which is exactly softmax([s_base, s_face + log g]) V. At g = 0, w = 0 and out = out_base bit
for bit (on CUDA out_base comes from the flash kernel, which the base block's SDPA may not
pick: equal there up to kernel rounding), while dw/dg = e^{lse_f - lse_b} != 0, so the gate
learns from the first step.
The base log-sum-exp comes from PyTorch's fused attention kernels, which do not
differentiate it: the gradient through lse_b (zero at init, of order w (1 - w) after) is
dropped. `face_attention="cross_only"` keeps the earlier design (text/video read the face
only through the cross-attention) for comparison.

Cost: the three streams share one Q/K/V projection call, and the cross-attention adds no
output projection of its own (see benchmarks/).
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
from torch import nn
from torch.nn import functional as F


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention [B, H, S, d] plus each query's log-sum-exp of scores [B, H, S] (fp32).

    PyTorch's public SDPA does not return the log-sum-exp; its fused kernels' aten ops do
    (cuDNN for half precision on CUDA, as the base block's SDPA picks on Hopper, flash where cuDNN
    refuses the shapes, memory-efficient for fp32, flash on CPU)."""
    if q.device.type == "cuda":
        if torch.is_autocast_enabled("cuda"):  # raw aten ops skip autocast: cast as autocast casts SDPA's inputs
            q, k, v = (t.to(torch.get_autocast_dtype("cuda")) for t in (q, k, v))
        if q.dtype in (torch.float16, torch.bfloat16):
            if torch.backends.cuda.cudnn_sdp_enabled():
                try:
                    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
                    return out, lse.reshape(q.shape[:3])  # cuDNN gives [B, H, S, 1]
                except RuntimeError:  # a head size or layout cuDNN does not support
                    pass
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
        return out, lse[..., : q.shape[2]]  # the efficient kernel pads the sequence of lse
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)


class LogSumExpFromSoftmax(torch.autograd.Function):
    """logsumexp(scores, -1) from probs = softmax(scores) already at hand (hand-written: PyTorch has no such op).

    Forward max(scores) - log(max(probs)): exact and stable (max(probs) >= 1/Nf), two reductions of tensors
    already there. Backward probs * grad, logsumexp's own gradient, in one pass: autograd through the two
    maxima would also recount the argmax ties of both (a long-integer reduction over the scores each)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:  # [..., Nf] each -> [...]
        ctx.save_for_backward(probs)
        ctx.scores_dtype = scores.dtype
        return scores.amax(-1).to(probs.dtype) - probs.amax(-1).log()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (probs,) = ctx.saved_tensors
        return (probs * grad.unsqueeze(-1)).to(ctx.scores_dtype), None  # probs depend on scores: all goes there


def merge_face_keys(
    out_base: torch.Tensor,  # [B, H, S, d] attention over the base keys
    lse_base: torch.Tensor,  # [B, H, S]
    q: torch.Tensor,  # [B, H, S, d]
    k_face: torch.Tensor,  # [B, H, Nf, d]
    v_face: torch.Tensor,  # [B, H, Nf, d]
    gate: torch.Tensor,  # [H] >= 0
) -> torch.Tensor:
    """softmax([s_base, s_face + log gate]) [V_base; V_face], from the base attention's output and
    log-sum-exp; exactly out_base where gate == 0 (see the module docstring)."""
    # Few passes over the [B, H, S, Nf] scores: they are the merge's main cost in eager mode (S is ~17.5K at 5B).
    scores = q @ (k_face * q.shape[-1] ** -0.5).transpose(-1, -2)  # [B, H, S, Nf] in q's dtype: few face keys
    probs = scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32))  # one kernel, fp32 at least
    lse_face = LogSumExpFromSoftmax.apply(scores, probs)  # [B, H, S]
    out_face = (probs.to(v_face.dtype) @ v_face).to(out_base.dtype)
    # w = g e^d / (1 + g e^d), d = lse_f - lse_b, written with m = max(d, 0) so nothing overflows.
    d = lse_face - lse_base.detach().float()
    m = d.clamp(min=0)
    g = gate.float().view(1, -1, 1)
    scaled = g * torch.exp(d - m)
    w = (scaled / (torch.exp(-m) + scaled)).unsqueeze(-1).to(out_base.dtype)
    return torch.lerp(out_base, out_face, w)  # out_base + w (out_face - out_base) in one kernel; out_base at w = 0


def _zero_linear(in_dim: int, out_dim: int) -> nn.Linear:
    layer = nn.Linear(in_dim, out_dim)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class MagicMirrorBlock(nn.Module):
    def __init__(
        self,
        block: CogVideoXBlock,
        time_embed_dim: int,
        use_cross_attention: bool,
        use_face_modality: bool,
        use_can: bool,
        can_hidden_dim: int,
        face_attention: str = "joint",
    ):
        super().__init__()
        self.block = block
        dim = block.norm1.norm.normalized_shape[0]
        heads = block.attn1.heads
        self.dim, self.heads = dim, heads

        self.face_kv_norm = self.to_k_face = self.to_v_face = self.norm_k_face = None
        if use_cross_attention:
            self.face_kv_norm = nn.LayerNorm(dim, eps=1e-6)
            self.to_k_face = nn.Linear(dim, dim)
            self.to_v_face = _zero_linear(dim, dim)
            self.norm_k_face = nn.LayerNorm(dim // heads, eps=1e-6)

        # phi_face(t): shift, scale, gate for the attention and the feed-forward of the face stream.
        self.face_modulation = (
            nn.Sequential(nn.SiLU(), _zero_linear(time_embed_dim, 6 * dim)) if use_face_modality else None
        )
        # g_h: text/video queries read the face stream's keys inside the joint softmax, weighted by g_h >= 0.
        self.face_key_gate = None
        if use_face_modality and face_attention == "joint":
            self.face_key_gate = nn.Parameter(torch.zeros(heads))

        # phi_cond([proj(x_id), t, mu1_vid]) -> residual on the 12 modulation vectors of the block.
        self.can = None
        if use_can:
            self.can = nn.Sequential(
                nn.Linear(2 * time_embed_dim + dim, can_hidden_dim), nn.SiLU(), _zero_linear(can_hidden_dim, 12 * dim)
            )

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, S, D] -> [B, H, S, D/H]

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).flatten(2)  # [B, H, S, D/H] -> [B, S, D]

    def attention(self, video, text, face_stream, face_tokens, image_rotary_emb, keep_face=None):
        """Joint attention of the block (as diffusers' CogVideoXAttnProcessor2_0 computes it),
        plus the decoupled face cross-attention and the face stream's own queries.
        keep_face [B] (1 kept, 0 dropped) masks what text and video read from the face, per sample.
        Returns the attention outputs of (video [B, N, D], text [B, L, D], face stream [B, Nf, D] or None)."""
        attn = self.block.attn1
        text_len, joint_len = text.shape[1], text.shape[1] + video.shape[1]
        streams = [text, video] if face_stream is None else [text, video, face_stream]
        x = torch.cat(streams, dim=1)  # [B, L+N(+Nf), D]: one projection call for all streams
        q, k, v = self._heads(attn.to_q(x)), self._heads(attn.to_k(x)), self._heads(attn.to_v(x))
        q, k = attn.norm_q(q), attn.norm_k(k)
        # The cross-attention reads position-free face keys, so its query is taken before RoPE.
        q_cross = q[:, :, :joint_len].clone() if self.to_v_face is not None else None
        if image_rotary_emb is not None:  # RoPE on the video tokens only, in place as diffusers does
            q[:, :, text_len:joint_len] = apply_rotary_emb(q[:, :, text_len:joint_len], image_rotary_emb)
            k[:, :, text_len:joint_len] = apply_rotary_emb(k[:, :, text_len:joint_len], image_rotary_emb)
        # [text+video | face] parts by split rather than slicing: the backward then joins their gradients in one
        # copy, where each slice's would fill a zero tensor of the whole sequence first.
        face_len = x.shape[1] - joint_len
        (q_joint, q_face), (k_joint, k_face), (v_joint, v_face) = (t.split([joint_len, face_len], 2) for t in (q, k, v))
        if face_stream is not None and self.face_key_gate is not None:
            # Text and video attend to [text, video, face] keys: the base attention, merged with the face keys.
            out, lse = attention_with_lse(q_joint, k_joint, v_joint)
            # g = max(w, 0) forward; the gradient passes as if g = w (straight-through), so a head pushed below 0
            # in the first steps can reopen. With the clamp's own gradient (0 below 0) such a head stays shut for
            # good: 3 of the tiny profile's 4 heads did within 150 steps, and the face barely reached the video.
            gate = self.face_key_gate + (self.face_key_gate.clamp(min=0) - self.face_key_gate).detach()
            merged = merge_face_keys(out, lse, q_joint, k_face, v_face, gate)
            out = merged if keep_face is None else out + keep_face * (merged - out)
        else:  # the base block's own attention over text and video
            out = F.scaled_dot_product_attention(q_joint, k_joint, v_joint)  # [B, H, L+N, D/H]
        if self.to_v_face is not None:
            cross = self.cross_attention(q_cross, face_tokens)
            out = out + (cross if keep_face is None else keep_face * cross)
        # The output projection runs on text+video and on the face stream apart: one call over the concatenation
        # would copy the [B, L+N, D] attention output twice (cat, then the head merge, a view without the cat).
        out = attn.to_out[1](attn.to_out[0](self._merge(out)))  # [B, L+N, D]
        face_out = None
        if face_stream is not None:  # m_face: the face stream queries [text, video, face]
            face_out = self._merge(F.scaled_dot_product_attention(q_face, k, v))  # [B, Nf, D]
            face_out = attn.to_out[1](attn.to_out[0](face_out))
        return out[:, text_len:], out[:, :text_len], face_out

    def cross_attention(self, q: torch.Tensor, face_tokens: torch.Tensor) -> torch.Tensor:
        """CA(W_q x, W'_kv x_face): q [B, H, S, D/H] (without RoPE), face_tokens [B, Nf, D] -> [B, H, S, D/H]."""
        face_kv = self.face_kv_norm(face_tokens)
        k_face = self.norm_k_face(self._heads(self.to_k_face(face_kv)))
        v_face = self._heads(self.to_v_face(face_kv))
        return F.scaled_dot_product_attention(q, k_face, v_face)

    def forward(
        self,
        hidden_states: torch.Tensor,  # video tokens [B, N, D]
        encoder_hidden_states: torch.Tensor,  # text tokens [B, L, D]
        face_tokens: torch.Tensor | None,  # face stream [B, Nf, D]
        temb: torch.Tensor,  # [B, Dt]
        id_cond: torch.Tensor | None,  # proj(x_id) [B, Dt]
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        keep: torch.Tensor | None = None,  # [B, 2]: FaceConditioning.keep
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        block = self.block
        text_len = encoder_hidden_states.shape[1]
        # The block's own modulation phi(t) for both sub-blocks: [B, 6D] each.
        mod_attn = block.norm1.linear(block.norm1.silu(temb))
        mod_ff = block.norm2.linear(block.norm2.silu(temb))
        if self.can is not None:
            mu1_vid = mod_attn[:, : self.dim]  # the block's first video shift: CAN's distribution identifier
            delta = self.can(torch.cat([id_cond.to(temb.dtype), temb, mu1_vid], dim=-1))
            delta_attn, delta_ff = (delta if keep is None else keep[:, 1:].to(delta.dtype) * delta).chunk(2, dim=-1)
            mod_attn, mod_ff = mod_attn + delta_attn, mod_ff + delta_ff
        shift, scale, gate, enc_shift, enc_scale, enc_gate = mod_attn.unsqueeze(1).chunk(6, dim=-1)  # [B, 1, D] each

        use_stream = self.face_modulation is not None and face_tokens is not None
        norm = block.norm1.norm
        norm_video = norm(hidden_states) * (1 + scale) + shift
        norm_text = norm(encoder_hidden_states) * (1 + enc_scale) + enc_shift
        norm_face = None
        if use_stream:
            f_shift, f_scale, f_gate, f_ff_shift, f_ff_scale, f_ff_gate = (
                self.face_modulation(temb).unsqueeze(1).chunk(6, dim=-1)
            )
            norm_face = norm(face_tokens) * (1 + f_scale) + f_shift

        keep_face = None if keep is None else keep[:, 0].to(norm_video.dtype).view(-1, 1, 1, 1)
        attn_video, attn_text, attn_face = self.attention(
            norm_video, norm_text, norm_face, face_tokens, image_rotary_emb, keep_face
        )
        hidden_states = hidden_states + gate * attn_video
        encoder_hidden_states = encoder_hidden_states + enc_gate * attn_text
        if use_stream:
            face_tokens = face_tokens + f_gate * attn_face

        shift, scale, gate, enc_shift, enc_scale, enc_gate = mod_ff.unsqueeze(1).chunk(6, dim=-1)
        norm = block.norm2.norm
        ff_in = [norm(encoder_hidden_states) * (1 + enc_scale) + enc_shift, norm(hidden_states) * (1 + scale) + shift]
        if use_stream:
            ff_in.append(norm(face_tokens) * (1 + f_ff_scale) + f_ff_shift)
        ff_out = block.ff(torch.cat(ff_in, dim=1))  # one feed-forward call over [text, video, face]
        video_len = hidden_states.shape[1]
        hidden_states = hidden_states + gate * ff_out[:, text_len : text_len + video_len]
        encoder_hidden_states = encoder_hidden_states + enc_gate * ff_out[:, :text_len]
        if use_stream:
            face_tokens = face_tokens + f_ff_gate * ff_out[:, text_len + video_len :]
        return hidden_states, encoder_hidden_states, face_tokens
