"""The adapted block's modulated LayerNorms, LayerNorm(x) * (1 + scale) + shift, as Triton kernels for CUDA.

Hand-written because CAN makes the block's modulation trainable: eager PyTorch then runs each modulated norm as
three kernels forward (norm, scale, shift) and, backward, the norm's gradient, the scale's product and two
reductions over the tokens for the gradients of scale and shift that the frozen bare block never computes
(`benchmarks/real_scale/h100x1/block_step_image_parts.log`: CAN was 1.2 ms of a 26 ms training pass at the
image stage's shapes). Here one kernel writes each stream's modulated norm straight into its place in the joint
[text, video, face] sequence (no concatenation afterwards), and one kernel computes the input's gradient with
per-sample partial sums for scale and shift. torch.compile would fuse this too, but its CUDA gradients for the
adapted block are wrong on torch 2.11 (`benchmarks/real_scale/compiled_gradients/`); the kernels are custom ops
(`torch.library.triton_op`), which compiled blocks launch as they are.
Only imported where Triton is (the GPU image's torch ships it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

ROWS_PER_PROGRAM = 16  # backward: rows of one sample whose scale/shift gradients one program sums


# fmt: off
@triton.jit
def _norm_forward(
    x_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, out_ptr, mean_ptr, rstd_ptr,
    S, D, stride_xb, stride_xs, stride_mb, stride_ob, stride_os, out_offset, eps,
    AFFINE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # fmt: on
    row = tl.program_id(0)  # one token: sample b, position t
    b, t = row // S, row % S
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + b * stride_xb + t * stride_xs + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    centered = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / D + eps)
    normed = centered * rstd
    if AFFINE:  # the block's own (frozen) LayerNorm weight and bias
        weight = tl.load(weight_ptr + offs, mask=mask).to(tl.float32)
        normed = normed * weight + tl.load(bias_ptr + offs, mask=mask).to(tl.float32)
    scale = tl.load(scale_ptr + b * stride_mb + offs, mask=mask).to(tl.float32)
    shift = tl.load(shift_ptr + b * stride_mb + offs, mask=mask).to(tl.float32)
    out = normed * (1.0 + scale) + shift
    tl.store(out_ptr + b * stride_ob + (out_offset + t) * stride_os + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


# fmt: off
@triton.jit
def _norm_backward(
    grad_ptr, x_ptr, weight_ptr, bias_ptr, scale_ptr, mean_ptr, rstd_ptr,
    grad_x_ptr, partial_scale_ptr, partial_shift_ptr,
    S, D, stride_gb, stride_gs, grad_offset, stride_xb, stride_xs, stride_mb,
    AFFINE: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # fmt: on
    group, b = tl.program_id(0), tl.program_id(1)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    one_plus_scale = 1.0 + tl.load(scale_ptr + b * stride_mb + offs, mask=mask, other=0.0).to(tl.float32)
    weight = tl.full((BLOCK_D,), 1.0, tl.float32)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if AFFINE:
        weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sum_scale = tl.zeros((BLOCK_D,), tl.float32)
    sum_shift = tl.zeros((BLOCK_D,), tl.float32)
    for r in range(ROWS):
        t = group * ROWS + r
        row_mask = mask & (t < S)
        grad = tl.load(grad_ptr + b * stride_gb + (grad_offset + t) * stride_gs + offs, mask=row_mask, other=0.0)
        grad = grad.to(tl.float32)
        x = tl.load(x_ptr + b * stride_xb + t * stride_xs + offs, mask=row_mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + b * S + t, mask=t < S, other=0.0)
        rstd = tl.load(rstd_ptr + b * S + t, mask=t < S, other=0.0)
        normed = tl.where(row_mask, (x - mean) * rstd, 0.0)
        # out = (normed w + bias)(1 + scale) + shift
        sum_scale += grad * (normed * weight + bias)
        sum_shift += grad
        grad_normed = grad * one_plus_scale * weight
        c1 = tl.sum(grad_normed * normed, axis=0) / D
        c2 = tl.sum(grad_normed, axis=0) / D
        grad_x = (grad_normed - (normed * c1 + c2)) * rstd
        tl.store(grad_x_ptr + (b * S + t) * D + offs, grad_x.to(grad_x_ptr.dtype.element_ty), mask=row_mask)
    partial = (b * tl.num_programs(0) + group) * D + offs
    tl.store(partial_scale_ptr + partial, sum_scale, mask=mask)
    tl.store(partial_shift_ptr + partial, sum_shift, mask=mask)


# Custom ops (torch.library.triton_op), so that torch.compile keeps each kernel as one opaque launch inside a
# compiled block instead of tracing the eager norms: inductor's own backward of CAN's modulation was wrong on
# torch 2.11.
@torch.library.triton_op("mm_lightning::modulated_norms", mutates_args=())
def _norms(
    xs: list[Tensor], scales: list[Tensor], shifts: list[Tensor], weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, list[Tensor]]:
    """The joined output [B, sum S_i, D], and each stream's mean and 1/std [B, S_i] (fp32) for the backward."""
    B, D = xs[0].shape[0], xs[0].shape[-1]
    out = torch.empty(B, sum(x.shape[1] for x in xs), D, device=xs[0].device, dtype=xs[0].dtype)
    stats, offset = [], 0
    for x, scale, shift in zip(xs, scales, shifts, strict=True):
        mean, rstd = (torch.empty(B, x.shape[1], device=x.device, dtype=torch.float32) for _ in range(2))
        # fmt: off
        torch.library.wrap_triton(_norm_forward)[(B * x.shape[1],)](
            x, x if weight is None else weight, x if bias is None else bias, scale, shift, out, mean, rstd,
            x.shape[1], D, x.stride(0), x.stride(1), scale.stride(0), out.stride(0), out.stride(1), offset, eps,
            AFFINE=weight is not None, BLOCK_D=triton.next_power_of_2(D), num_warps=8,
        )
        # fmt: on
        stats += [mean, rstd]
        offset += x.shape[1]
    return out, stats


@torch.library.triton_op("mm_lightning::modulated_norms_backward", mutates_args=())
def _norms_grads(
    grad_out: Tensor,
    xs: list[Tensor],
    scales: list[Tensor],
    stats: list[Tensor],
    weight: Tensor | None,
    bias: Tensor | None,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The gradients of each stream's x, and of its scale and shift summed over the tokens [B, 1, D]."""
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    B, _, D = grad_out.shape
    grad_xs, grad_scales, grad_shifts, offset = [], [], [], 0
    for i, (x, scale) in enumerate(zip(xs, scales, strict=True)):
        length = x.shape[1]
        grad_x = torch.empty(B, length, D, device=x.device, dtype=x.dtype)
        groups = triton.cdiv(length, ROWS_PER_PROGRAM)
        partial_scale, partial_shift = (torch.empty(B, groups, D, device=x.device) for _ in range(2))
        # fmt: off
        torch.library.wrap_triton(_norm_backward)[(groups, B)](
            grad_out, x, x if weight is None else weight, x if bias is None else bias, scale, stats[2 * i],
            stats[2 * i + 1], grad_x, partial_scale, partial_shift,
            length, D, grad_out.stride(0), grad_out.stride(1), offset, x.stride(0), x.stride(1), scale.stride(0),
            AFFINE=weight is not None, ROWS=ROWS_PER_PROGRAM, BLOCK_D=triton.next_power_of_2(D), num_warps=8,
        )
        # fmt: on
        grad_xs.append(grad_x)
        grad_scales.append(partial_scale.sum(1, keepdim=True).to(scale.dtype))
        grad_shifts.append(partial_shift.sum(1, keepdim=True).to(scale.dtype))
        offset += length
    return grad_xs, grad_scales, grad_shifts


def _save_inputs(ctx, inputs, output):
    xs, scales, _, weight, bias, _ = inputs
    ctx.save_for_backward(*xs, *scales, *output[1], weight, bias)
    ctx.streams = len(xs)
    ctx.mark_non_differentiable(*output[1])


def _backward(ctx, grad_out, _):
    """Gradients for every x, scale and shift; none for the (frozen) LayerNorm weight and bias."""
    n, saved = ctx.streams, ctx.saved_tensors
    xs, scales, stats, (weight, bias) = saved[:n], saved[n : 2 * n], saved[2 * n : 4 * n], saved[4 * n :]
    grad_xs, grad_scales, grad_shifts = _norms_grads(grad_out, list(xs), list(scales), list(stats), weight, bias)
    return grad_xs, grad_scales, grad_shifts, None, None, None


torch.library.register_autograd("mm_lightning::modulated_norms", _backward, setup_context=_save_inputs)


def fused_modulated_norms(
    weight: Tensor | None, bias: Tensor | None, eps: float, *streams: tuple[Tensor, Tensor, Tensor]
) -> Tensor:
    """[LayerNorm(x_i) (1 + scale_i) + shift_i for each stream i], joined along the tokens: [B, sum S_i, D].

    weight and bias: the LayerNorm's own (None without affine; frozen: they get no gradient). Each stream is
    x [B, S_i, D], scale [B, 1, D], shift [B, 1, D]. The layouts are made what the kernels read (differentiable
    changes, free where the layout already is so); gradients reach every x, scale and shift."""
    xs, scales, shifts = [], [], []
    for x, scale, shift in streams:
        B, _, D = x.shape
        scale, shift = scale.expand(B, 1, D), shift.expand(B, 1, D)  # chunks of one modulation: one stride
        if not scale.stride(-1) == shift.stride(-1) == 1 or scale.stride(0) != shift.stride(0):
            scale, shift = scale.contiguous(), shift.contiguous()
        xs.append(x if x.stride(-1) == 1 else x.contiguous())
        scales.append(scale)
        shifts.append(shift)
    out, _ = _norms(xs, scales, shifts, weight, bias, eps)
    return out
