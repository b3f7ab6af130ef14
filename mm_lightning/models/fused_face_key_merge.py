"""`merge_face_keys` as two Triton kernels (forward, backward) for CUDA: MagicMirror's face-key merge, fused.

Hand-written because the merge is MagicMirror's own (see `adapter.merge_face_keys` for the math). Eager PyTorch
runs it as ~10 kernels forward and ~20 backward over [B, H, S, Nf] and [B, H, S, d] tensors. At the image
stage's shapes that was 2 ms of a 27 ms adapted-block training pass, the largest part of the adapter's cost
(`benchmarks/real_scale/h100x1/block_step_image_parts*.log`). torch.compile would fuse it, but its CUDA
gradients for this block are wrong on torch 2.11 (`benchmarks/real_scale/compiled_gradients/`); the kernels are
custom ops (`torch.library.triton_op`), which compiled blocks launch as they are.

Each program takes BLOCK_M queries of one (batch, head): the face scores [BLOCK_M, Nf], their softmax and
log-sum-exp, the face output and the merge weight stay in registers. Forward reads q and out_base and writes
the merged output; backward recomputes those and writes the gradients of q and out_base, and adds the face
keys', face values' and gate's into fp32 buffers. Only imported where Triton is (the GPU image's torch ships it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_M = 64


# fmt: off
@triton.jit
def _recompute(
    out_base_ptr, q_ptr, k_ptr, v_ptr, lse_b_ptr, gate_ptr, keep_ptr,
    stride_rb, stride_rh, stride_rs, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    H, S, NF, D, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """What both kernels compute for their program's BLOCK_M queries of one (batch, head): the offsets of its rows
    in out_base's layout, q [M, D], the face keys and values [N, D], probs [M, N], out_base and the face output
    [M, D] (fp32), the merge weight before keep w0 [M], keep, the gate, and e^(d - m), e^(-m) [M] (for the gate's
    gradient)."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    mask_m, mask_n = offs_m < S, offs_n < NF
    mask = mask_m[:, None] & (offs_d < D)[None, :]
    q_offsets = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptr + q_offsets, mask=mask, other=0.0)
    kv_offsets = b * stride_kb + h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :]
    kv_mask = mask_n[:, None] & (offs_d < D)[None, :]
    k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
    scores = tl.dot(q, tl.trans(k)) * scale  # [M, N] fp32
    scores = tl.where(mask_n[None, :], scores, float("-inf"))
    row_max = tl.max(scores, axis=1)
    exp_scores = tl.exp(scores - row_max[:, None])
    row_sum = tl.sum(exp_scores, axis=1)
    probs = exp_scores / row_sum[:, None]
    lse_face = row_max + tl.log(row_sum)
    out_face = tl.dot(probs.to(v.dtype), v)  # [M, D] fp32
    row_offsets = b * stride_rb + h * stride_rh + offs_m[:, None] * stride_rs + offs_d[None, :]
    out_base = tl.load(out_base_ptr + row_offsets, mask=mask, other=0.0).to(tl.float32)
    lse_base = tl.load(lse_b_ptr + pid_bh * S + offs_m, mask=mask_m, other=0.0)
    # w0 = g e^d / (1 + g e^d), d = lse_f - lse_b, with m = max(d, 0) so nothing overflows (as the eager merge).
    d = lse_face - lse_base
    m = tl.maximum(d, 0.0)
    gate = tl.load(gate_ptr + h).to(tl.float32)
    exp_d = tl.exp(d - m)
    exp_neg_m = tl.exp(-m)
    w0 = gate * exp_d / (exp_neg_m + gate * exp_d)
    keep = tl.load(keep_ptr + b).to(tl.float32)
    return (h, mask_m, mask_n, mask, row_offsets, q_offsets, kv_offsets, kv_mask,
            q, k, v, probs, out_base, out_face, w0, keep, gate, exp_d, exp_neg_m)


@triton.jit
def _merge_forward(
    out_ptr, out_base_ptr, q_ptr, k_ptr, v_ptr, lse_b_ptr, gate_ptr, keep_ptr,
    stride_rb, stride_rh, stride_rs, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    H, S, NF, D, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    _, _, _, mask, row_offsets, _, _, _, _, _, _, _, out_base, out_face, w0, keep, _, _, _ = _recompute(
        out_base_ptr, q_ptr, k_ptr, v_ptr, lse_b_ptr, gate_ptr, keep_ptr,
        stride_rb, stride_rh, stride_rs, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
        H, S, NF, D, scale, BLOCK_M, BLOCK_N, BLOCK_D,
    )
    out = out_base + (w0 * keep)[:, None] * (out_face - out_base)  # exactly out_base where w == 0
    tl.store(out_ptr + row_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _merge_backward(
    grad_out_ptr, grad_base_ptr, grad_q_ptr, grad_k_ptr, grad_v_ptr, grad_gate_ptr,
    out_base_ptr, q_ptr, k_ptr, v_ptr, lse_b_ptr, gate_ptr, keep_ptr,
    stride_rb, stride_rh, stride_rs, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    H, S, NF, D, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    (h, mask_m, mask_n, mask, row_offsets, q_offsets, kv_offsets, kv_mask,
     q, k, v, probs, out_base, out_face, w0, keep, gate, exp_d, exp_neg_m) = _recompute(
        out_base_ptr, q_ptr, k_ptr, v_ptr, lse_b_ptr, gate_ptr, keep_ptr,
        stride_rb, stride_rh, stride_rs, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
        H, S, NF, D, scale, BLOCK_M, BLOCK_N, BLOCK_D,
    )
    # fmt: on
    w = w0 * keep
    grad = tl.load(grad_out_ptr + row_offsets, mask=mask, other=0.0).to(tl.float32)  # [M, D]
    # out = out_base + w (out_face - out_base)
    tl.store(grad_base_ptr + row_offsets, (grad * (1.0 - w[:, None])).to(grad_base_ptr.dtype.element_ty), mask=mask)
    grad_w = tl.sum(grad * (out_face - out_base), axis=1)  # [M]
    grad_face = (grad * w[:, None]).to(v.dtype)  # d out / d out_face, in v's dtype as the eager matmul
    # w = keep w0: d w0 / d lse_f = w0 (1 - w0); d w0 / d g = e^d (1 - w0)^2 = e^(d-m) (1 - w0) / (e^-m + g e^(d-m)).
    grad_lse = grad_w * keep * w0 * (1.0 - w0)
    grad_g = grad_w * keep * exp_d * (1.0 - w0) / (exp_neg_m + gate * exp_d)
    tl.atomic_add(grad_gate_ptr + h, tl.sum(tl.where(mask_m, grad_g, 0.0), axis=0))
    # softmax and log-sum-exp: d scores = probs (d probs - <probs, d probs>) + probs d lse
    grad_probs = tl.dot(grad_face, tl.trans(v))  # [M, N]
    grad_scores = probs * (grad_probs - tl.sum(probs * grad_probs, axis=1)[:, None] + grad_lse[:, None])
    grad_scores = tl.where(mask_m[:, None] & mask_n[None, :], grad_scores, 0.0).to(q.dtype)
    grad_q = tl.dot(grad_scores, k) * scale  # [M, D]
    tl.store(grad_q_ptr + q_offsets, grad_q.to(grad_q_ptr.dtype.element_ty), mask=mask)
    tl.atomic_add(grad_k_ptr + kv_offsets, tl.dot(tl.trans(grad_scores), q) * scale, mask=kv_mask)
    weighted_probs = tl.where(mask_m[:, None], probs * w[:, None], 0.0).to(v.dtype)
    tl.atomic_add(grad_v_ptr + kv_offsets, tl.dot(tl.trans(weighted_probs), grad.to(v.dtype)), mask=kv_mask)


def _launch(kernel, *pointers, out_base, q, k_face):
    """One program per BLOCK_M queries of one (batch, head). The tensors indexed like out_base share its
    strides, those like q share q's and those like k_face (face keys and values, their gradients) share k_face's."""
    B, H, S, D = q.shape
    NF = k_face.shape[2]
    torch.library.wrap_triton(kernel)[(triton.cdiv(S, BLOCK_M), B * H)](
        *pointers,
        *out_base.stride()[:3],
        *q.stride()[:3],
        *k_face.stride()[:3],
        H,
        S,
        NF,
        D,
        D**-0.5,
        BLOCK_M=BLOCK_M,
        BLOCK_N=max(16, triton.next_power_of_2(NF)),
        BLOCK_D=max(16, triton.next_power_of_2(D)),
    )


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy where its layout has gaps: empty_like must give the gradients t's strides."""
    return t if t.stride(-1) == 1 and torch.empty_like(t).stride() == t.stride() else t.contiguous()


# Custom ops (torch.library.triton_op), so that torch.compile keeps each kernel as one opaque launch inside a
# compiled block instead of tracing the eager merge: inductor's own backward of that region was wrong on torch 2.11.
@torch.library.triton_op("mm_lightning::face_key_merge", mutates_args=())
def _merge(
    out_base: Tensor, lse_base: Tensor, q: Tensor, k_face: Tensor, v_face: Tensor, gate: Tensor, keep: Tensor
) -> Tensor:
    out = torch.empty_like(out_base)  # out_base's strides
    pointers = (out, out_base, q, k_face, v_face, lse_base, gate, keep)
    _launch(_merge_forward, *pointers, out_base=out_base, q=q, k_face=k_face)
    return out


@torch.library.triton_op("mm_lightning::face_key_merge_backward", mutates_args=())
def _merge_grads(
    grad_out: Tensor,
    out_base: Tensor,
    lse_base: Tensor,
    q: Tensor,
    k_face: Tensor,
    v_face: Tensor,
    gate: Tensor,
    keep: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if grad_out.stride() != out_base.stride():
        grad_out = torch.empty_like(out_base).copy_(grad_out)
    grad_base, grad_q = torch.empty_like(out_base), torch.empty_like(q)  # out_base's and q's strides
    grad_k, grad_v = (torch.zeros_like(k_face, dtype=torch.float32) for _ in range(2))  # summed across programs
    grad_gate = torch.zeros_like(gate)
    pointers = (grad_out, grad_base, grad_q, grad_k, grad_v, grad_gate)
    pointers += (out_base, q, k_face, v_face, lse_base, gate, keep)
    _launch(_merge_backward, *pointers, out_base=out_base, q=q, k_face=k_face)
    return grad_base, grad_q, grad_k.to(k_face.dtype), grad_v.to(v_face.dtype), grad_gate


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    """The same gradients as the eager merge: none through lse_base (whose kernels do not differentiate it),
    none for keep."""
    out_base, lse_base, q, k_face, v_face, gate, keep = ctx.saved_tensors
    grads = _merge_grads(grad_out, out_base, lse_base, q, k_face, v_face, gate, keep)
    grad_base, grad_q, grad_k, grad_v, grad_gate = grads
    return grad_base, None, grad_q, grad_k, grad_v, grad_gate, None


torch.library.register_autograd("mm_lightning::face_key_merge", _backward, setup_context=_save_inputs)


def fused_face_key_merge(
    out_base: Tensor, lse_base: Tensor, q: Tensor, k_face: Tensor, v_face: Tensor, gate: Tensor, keep: Tensor | None
) -> Tensor:
    """merge_face_keys(out_base, lse_base, q, k_face, v_face, gate, keep) on CUDA, with its arguments laid out as
    the kernels read them (the layout changes are differentiable, and free where they are already so)."""
    B = q.shape[0]
    keep = torch.ones(B, device=q.device) if keep is None else keep.detach().float().reshape(B)
    return _merge(
        _dense(out_base),
        lse_base.detach().float().contiguous(),  # [B, H, S]
        _dense(q),
        k_face.contiguous(),  # [B, H, Nf, d], few: one set of strides for the face keys, values and gradients
        v_face.contiguous(),
        gate.float().contiguous(),
        keep.contiguous(),
    )
