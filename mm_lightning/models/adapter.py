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

Cost: the cross-attention adds no output projection of its own, and a dropped face (keep = 0) is folded
into the merge's weight and the cross-attention's values rather than masking whole outputs. The attentions
over the 32 face keys (or from the 32 face queries) go through PyTorch's SDPA: plain matmuls were no faster
at video shapes and slower at image shapes (benchmarks/real_scale/h100x1/adapter_ab_*.log). On CUDA in half
precision, the face-key merge and the modulated norms run as Triton kernels (fused_face_key_merge.py,
fused_modulated_norm.py); the eager forms here are what they compute, and what the CPU runs.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
from torch import nn
from torch.nn import functional as F


@torch.compiler.assume_constant_result
def _cudnn_attention_enabled() -> bool:
    # A constant to torch.compile: the bare query is a graph break (a torch.* call returning a bool), which split
    # every compiled adapted block in three on CUDA.
    return torch.backends.cuda.cudnn_sdp_enabled()


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention [B, H, S, d] plus each query's log-sum-exp of scores [B, H, S] (fp32).

    PyTorch's public SDPA does not return the log-sum-exp; its fused kernels' aten ops do
    (cuDNN for half precision on CUDA, as the base block's SDPA picks on Hopper, flash where cuDNN
    refuses the shapes, memory-efficient for fp32, flash on CPU)."""
    if q.device.type == "cuda":
        if torch.is_autocast_enabled("cuda"):  # raw aten ops skip autocast: cast as autocast casts SDPA's inputs
            q, k, v = (t.to(torch.get_autocast_dtype("cuda")) for t in (q, k, v))
        if q.dtype in (torch.float16, torch.bfloat16):
            if _cudnn_attention_enabled():
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


class SoftmaxWithLogSumExp(torch.autograd.Function):
    """(softmax(scores), logsumexp(scores)) over the last dim, in fp32 at least, from one log_softmax kernel.

    Hand-written: PyTorch has no op returning both, and taking the log-sum-exp apart costs short-row
    reductions over the [B, H, S, Nf] scores (two maxima were 0.48 ms of a 5B block's training pass).
    log_softmax keeps them inside its fused kernel; the log-sum-exp is then scores - log_probs at any
    key (the first here). Backward: softmax's own, plus probs * grad_lse (logsumexp's gradient)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [..., Nf] -> [..., Nf], [...]
        log_probs = scores.log_softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32))
        probs = log_probs.exp()
        ctx.save_for_backward(probs)
        ctx.scores_dtype = scores.dtype
        return probs, scores[..., 0].to(probs.dtype) - log_probs[..., 0]

    @staticmethod
    def backward(ctx, grad_probs: torch.Tensor, grad_lse: torch.Tensor) -> torch.Tensor:
        (probs,) = ctx.saved_tensors
        grad = torch.ops.aten._softmax_backward_data(grad_probs, probs, -1, probs.dtype)  # probs (g - <probs, g>)
        return grad.addcmul_(probs, grad_lse.unsqueeze(-1)).to(ctx.scores_dtype)


# CUDA builds of torch ship Triton; CPU builds do not, and run the eager forms. Resolved once here: torch.compile
# then sees plain functions (or None) in the blocks it traces.
if importlib.util.find_spec("triton") is not None:
    from mm_lightning.models.fused_face_key_merge import fused_face_key_merge
    from mm_lightning.models.fused_modulated_norm import fused_modulated_norms
else:
    fused_face_key_merge = fused_modulated_norms = None

_eager_forms = False


@contextlib.contextmanager
def eager_forms():
    """Run the adapter's eager PyTorch forms instead of its Triton kernels, e.g. to count FLOPs
    (torch.utils.flop_counter sees no Triton kernel)."""
    global _eager_forms
    previous, _eager_forms = _eager_forms, True
    try:
        yield
    finally:
        _eager_forms = previous


def _fusable(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels take these: CUDA and one half-precision dtype (compiled blocks too: the
    kernels are custom ops, which torch.compile launches as they are, where its own backward of these regions
    was wrong on torch 2.11)."""
    dtype = tensors[0].dtype
    return (
        not _eager_forms
        and tensors[0].is_cuda
        and dtype in (torch.float16, torch.bfloat16)
        and all(t.dtype == dtype for t in tensors)
    )


def modulated_norms(norm: nn.LayerNorm, *streams: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """norm(x) * (1 + scale) + shift for each stream (x [B, S_i, D], scale and shift [B, 1, D]), joined along
    the tokens: [B, sum S_i, D]. On CUDA in half precision, two Triton kernels (forward, backward) with the
    scale's and shift's gradients summed inside (CAN trains them) and no concatenation afterwards."""
    flat = [t for stream in streams for t in stream]
    # The kernels read the LayerNorm's own weight and bias: only where they are frozen (a trained backbone needs
    # their gradients) and whole. DeepSpeed ZeRO-3 gathers a module's partitioned weights in hooks around that
    # module's own call, which the kernels never make: outside it they are empty tensors.
    affine = [p for p in (norm.weight, norm.bias) if p is not None]
    usable_affine = len(affine) in (0, 2) and all(
        not p.requires_grad and p.shape == norm.normalized_shape for p in affine
    )
    if fused_modulated_norms is not None and usable_affine and _fusable(*flat):
        return fused_modulated_norms(norm.weight, norm.bias, norm.eps, *streams)
    normed = [norm(x) * (1 + scale) + shift for x, scale, shift in streams]
    return normed[0] if len(normed) == 1 else torch.cat(normed, dim=1)


def merge_face_keys(
    out_base: torch.Tensor,  # [B, H, S, d] attention over the base keys
    lse_base: torch.Tensor,  # [B, H, S]
    q: torch.Tensor,  # [B, H, S, d]
    k_face: torch.Tensor,  # [B, H, Nf, d]
    v_face: torch.Tensor,  # [B, H, Nf, d]
    gate: torch.Tensor,  # [H] >= 0
    keep: torch.Tensor | None = None,  # [B, 1, 1, 1]: 0 where a sample's face is dropped
) -> torch.Tensor:
    """softmax([s_base, s_face + log gate]) [V_base; V_face], from the base attention's output and
    log-sum-exp; exactly out_base where gate == 0 or keep == 0 (see the module docstring).
    On CUDA in half precision it runs as two fused Triton kernels, unless deterministic algorithms are asked
    for (their backward sums the face keys' gradients with atomic adds)."""
    if q.is_cuda and torch.is_autocast_enabled("cuda"):
        # Its matmuls run in autocast's dtype; k_face comes out of a LayerNorm, which autocast leaves in fp32.
        # Cast as autocast would, so that the kernel takes the merge under bf16-mixed too.
        q, k_face, v_face, out_base = (t.to(torch.get_autocast_dtype("cuda")) for t in (q, k_face, v_face, out_base))
    fusable = _fusable(q, out_base, k_face, v_face) and not torch.are_deterministic_algorithms_enabled()
    if fused_face_key_merge is not None and fusable:
        return fused_face_key_merge(out_base, lse_base, q, k_face, v_face, gate, keep)
    # Few passes over the [B, H, S, Nf] scores: they are the merge's main cost in eager mode (S is ~17.5K at 5B).
    scores = q @ (k_face * q.shape[-1] ** -0.5).transpose(-1, -2)  # [B, H, S, Nf] in q's dtype: few face keys
    probs, lse_face = SoftmaxWithLogSumExp.apply(scores)  # fp32 at least: [B, H, S, Nf], [B, H, S]
    out_face = (probs.to(v_face.dtype) @ v_face).to(out_base.dtype)
    # w = g e^d / (1 + g e^d), d = lse_f - lse_b, written with m = max(d, 0) so nothing overflows.
    d = lse_face - lse_base.detach().float()
    m = d.clamp(min=0)
    g = gate.float().view(1, -1, 1)
    scaled = g * torch.exp(d - m)
    w = (scaled / (torch.exp(-m) + scaled)).unsqueeze(-1).to(out_base.dtype)  # [B, H, S, 1]
    if keep is not None:
        w = w * keep
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

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block's own query and key (normed) and value heads of x [B, S, D]: [B, H, S, D/H] each."""
        attn = self.block.attn1
        q, k, v = self._heads(attn.to_q(x)), self._heads(attn.to_k(x)), self._heads(attn.to_v(x))
        return attn.norm_q(q), attn.norm_k(k), v

    def attention(self, joint, text_len, face_stream, face_tokens, image_rotary_emb, keep_face=None):
        """Joint attention of the block over joint = [text, video] [B, L+N, D] (as diffusers'
        CogVideoXAttnProcessor2_0 computes it), plus the decoupled face cross-attention and the face stream's
        own queries. keep_face [B, 1, 1, 1] (1 kept, 0 dropped) masks what text and video read from the face,
        per sample. Returns the attention outputs of (video [B, N, D], text [B, L, D], face stream [B, Nf, D]
        or None)."""
        attn = self.block.attn1
        q, k, v = self._qkv(joint)  # [B, H, L+N, D/H]
        q_joint = q
        if image_rotary_emb is not None:
            # RoPE on the video tokens. k in place, as diffusers does. q stays unrotated for the cross-attention:
            # one rotation over text and video into a new tensor, the text rows turned by 0 (cos 1, sin 0: exactly
            # the identity), instead of a clone and the in-place slice.
            cos, sin = image_rotary_emb  # [N, D/H]
            rope = (F.pad(cos, (0, 0, text_len, 0), value=1.0), F.pad(sin, (0, 0, text_len, 0)))  # [L+N, D/H]
            q_joint = apply_rotary_emb(q, rope)
            k[:, :, text_len:] = apply_rotary_emb(k[:, :, text_len:], image_rotary_emb)
        if face_stream is not None:
            # Its own projection calls (32 tokens: nothing to share), so that no gradient of the [B, H, L+N, D/H]
            # tensors has to be joined with the face's in the backward (those copies were 0.7 ms at 5B).
            q_face, k_face, v_face = self._qkv(face_stream)  # [B, H, Nf, D/H]
        if face_stream is not None and self.face_key_gate is not None:
            # Text and video attend to [text, video, face] keys: the base attention, merged with the face keys.
            out, lse = attention_with_lse(q_joint, k, v)
            # g = max(w, 0) forward; the gradient passes as if g = w (straight-through), so a head pushed below 0
            # in the first steps can reopen. With the clamp's own gradient (0 below 0) such a head stays shut for
            # good: 3 of the tiny profile's 4 heads did within 150 steps, and the face barely reached the video.
            gate = self.face_key_gate + (self.face_key_gate.clamp(min=0) - self.face_key_gate).detach()
            out = merge_face_keys(out, lse, q_joint, k_face, v_face, gate, keep_face)
        else:  # the base block's own attention over text and video
            out = F.scaled_dot_product_attention(q_joint, k, v)  # [B, H, L+N, D/H]
        if self.to_v_face is not None:
            out = out + self.cross_attention(q, face_tokens, keep_face)
        # The output projection runs on text+video and on the face stream apart: one call over the concatenation
        # would copy the [B, L+N, D] attention output twice (cat, then the head merge, a view without the cat).
        out = attn.to_out[1](attn.to_out[0](self._merge(out)))  # [B, L+N, D]
        face_out = None
        if face_stream is not None:  # m_face: the face stream queries [text, video, face]
            k_all, v_all = torch.cat([k, k_face], dim=2), torch.cat([v, v_face], dim=2)  # [B, H, L+N+Nf, D/H]
            face_out = self._merge(F.scaled_dot_product_attention(q_face, k_all, v_all))  # [B, Nf, D]
            face_out = attn.to_out[1](attn.to_out[0](face_out))
        return out[:, text_len:], out[:, :text_len], face_out

    def cross_attention(self, q: torch.Tensor, face_tokens: torch.Tensor, keep_face=None) -> torch.Tensor:
        """CA(W_q x, W'_kv x_face): q [B, H, S, D/H] (without RoPE), face_tokens [B, Nf, D] -> [B, H, S, D/H];
        zero for samples with keep_face [B, 1, 1, 1] == 0 (their values zeroed: the output is a mix of them)."""
        face_kv = self.face_kv_norm(face_tokens)
        k_face = self.norm_k_face(self._heads(self.to_k_face(face_kv)))
        v_face = self._heads(self.to_v_face(face_kv))
        if keep_face is not None:
            v_face = v_face * keep_face
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
        joint = modulated_norms(norm, (encoder_hidden_states, enc_scale, enc_shift), (hidden_states, scale, shift))
        norm_face = None
        if use_stream:
            f_shift, f_scale, f_gate, f_ff_shift, f_ff_scale, f_ff_gate = (
                self.face_modulation(temb).unsqueeze(1).chunk(6, dim=-1)
            )
            norm_face = modulated_norms(norm, (face_tokens, f_scale, f_shift))

        keep_face = None if keep is None else keep[:, 0].to(joint.dtype).view(-1, 1, 1, 1)
        attn_video, attn_text, attn_face = self.attention(
            joint, text_len, norm_face, face_tokens, image_rotary_emb, keep_face
        )
        hidden_states = hidden_states + gate * attn_video
        encoder_hidden_states = encoder_hidden_states + enc_gate * attn_text
        if use_stream:
            face_tokens = face_tokens + f_gate * attn_face

        shift, scale, gate, enc_shift, enc_scale, enc_gate = mod_ff.unsqueeze(1).chunk(6, dim=-1)
        norm = block.norm2.norm
        ff_in = [(encoder_hidden_states, enc_scale, enc_shift), (hidden_states, scale, shift)]
        if use_stream:
            ff_in.append((face_tokens, f_ff_scale, f_ff_shift))
        ff_out = block.ff(modulated_norms(norm, *ff_in))  # one feed-forward call over [text, video, face]
        video_len = hidden_states.shape[1]
        hidden_states = hidden_states + gate * ff_out[:, text_len : text_len + video_len]
        encoder_hidden_states = encoder_hidden_states + enc_gate * ff_out[:, :text_len]
        if use_stream:
            face_tokens = face_tokens + f_ff_gate * ff_out[:, text_len + video_len :]
        return hidden_states, encoder_hidden_states, face_tokens
