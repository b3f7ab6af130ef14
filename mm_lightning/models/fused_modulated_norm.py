"""The adapted block's modulated LayerNorms, LayerNorm(x) * (1 + scale) + shift, as Triton kernels for CUDA.

Hand-written because CAN makes the block's modulation trainable: eager PyTorch then runs each modulated norm as
three kernels forward (norm, scale, shift) and, backward, the norm's gradient, the scale's product and two
reductions over the tokens for the gradients of scale and shift that the frozen bare block never computes
(`benchmarks/real_scale/h100x1/block_step_image_parts.log`: CAN was 1.2 ms of a 26 ms training pass at the
image stage's shapes). Here one kernel writes each stream's modulated norm straight into its place in the joint
[text, video, face] sequence (no concatenation afterwards), and one kernel computes the input's gradient with
per-sample partial sums for scale and shift. torch.compile would fuse this too, but its CUDA gradients for the
adapted block are wrong on torch 2.11 (`benchmarks/real_scale/compiled_gradients/`).
Only imported where Triton is (the GPU image's torch ships it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
    AFFINE: tl.constexpr, GRAD_X: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
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
        if GRAD_X:
            grad_normed = grad * one_plus_scale * weight
            c1 = tl.sum(grad_normed * normed, axis=0) / D
            c2 = tl.sum(grad_normed, axis=0) / D
            grad_x = (grad_normed - (normed * c1 + c2)) * rstd
            tl.store(grad_x_ptr + (b * S + t) * D + offs, grad_x.to(grad_x_ptr.dtype.element_ty), mask=row_mask)
    partial = (b * tl.num_programs(0) + group) * D + offs
    tl.store(partial_scale_ptr + partial, sum_scale, mask=mask)
    tl.store(partial_shift_ptr + partial, sum_shift, mask=mask)


class FusedModulatedNorms(torch.autograd.Function):
    """[LayerNorm(x_i) (1 + scale_i) + shift_i for each stream i], joined along the tokens: [B, sum S_i, D].

    Inputs: the LayerNorm's weight and bias (None without affine; frozen: they get no gradient) and eps, then
    x [B, S_i, D], scale [B, 1, D], shift [B, 1, D] per stream. Gradients for every x, scale and shift."""

    @staticmethod
    def forward(ctx, weight, bias, eps, *streams):
        xs, scales, shifts = streams[0::3], streams[1::3], streams[2::3]
        B, D = xs[0].shape[0], xs[0].shape[-1]
        lengths = [x.shape[1] for x in xs]
        out = torch.empty(B, sum(lengths), D, device=xs[0].device, dtype=xs[0].dtype)
        xs = [x if x.stride(-1) == 1 else x.contiguous() for x in xs]
        stats, used_scales, offset = [], [], 0
        for x, scale, shift in zip(xs, scales, shifts, strict=True):
            scale, shift = scale.expand(B, 1, D), shift.expand(B, 1, D)  # chunks of one modulation: one stride
            if not scale.stride(-1) == shift.stride(-1) == 1 or scale.stride(0) != shift.stride(0):
                scale, shift = scale.contiguous(), shift.contiguous()
            mean, rstd = (torch.empty(B, x.shape[1], device=x.device, dtype=torch.float32) for _ in range(2))
            # fmt: off
            _norm_forward[(B * x.shape[1],)](
                x, x if weight is None else weight, x if bias is None else bias, scale, shift, out, mean, rstd,
                x.shape[1], D, x.stride(0), x.stride(1), scale.stride(0), out.stride(0), out.stride(1), offset, eps,
                AFFINE=weight is not None, BLOCK_D=triton.next_power_of_2(D), num_warps=8,
            )
            # fmt: on
            stats += [mean, rstd]
            used_scales.append(scale)
            offset += x.shape[1]
        ctx.save_for_backward(*xs, *used_scales, *stats, *([weight, bias] if weight is not None else []))
        ctx.lengths, ctx.affine = lengths, weight is not None
        ctx.modulation_shapes = [
            (scale.shape, scale.dtype, shift.shape, shift.dtype) for scale, shift in zip(scales, shifts)
        ]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        n = len(ctx.lengths)
        saved = ctx.saved_tensors
        xs, scales, stats = saved[:n], saved[n : 2 * n], saved[2 * n : 4 * n]
        weight, bias = saved[4 * n :] if ctx.affine else (xs[0], xs[0])  # unused without affine
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        B, _, D = grad_out.shape
        grads, offset = [], 0
        for i, (x, scale, length) in enumerate(zip(xs, scales, ctx.lengths, strict=True)):
            want_x = ctx.needs_input_grad[3 + 3 * i]
            grad_x = torch.empty(B, length, D, device=x.device, dtype=x.dtype) if want_x else grad_out  # unused
            groups = triton.cdiv(length, ROWS_PER_PROGRAM)
            partial_scale, partial_shift = (torch.empty(B, groups, D, device=x.device) for _ in range(2))
            # fmt: off
            _norm_backward[(groups, B)](
                grad_out, x, weight, bias, scale, stats[2 * i], stats[2 * i + 1], grad_x, partial_scale, partial_shift,
                length, D, grad_out.stride(0), grad_out.stride(1), offset, x.stride(0), x.stride(1), scale.stride(0),
                AFFINE=ctx.affine, GRAD_X=want_x, ROWS=ROWS_PER_PROGRAM, BLOCK_D=triton.next_power_of_2(D), num_warps=8,
            )
            # fmt: on
            scale_shape, scale_dtype, shift_shape, shift_dtype = ctx.modulation_shapes[i]
            grads += [
                grad_x if want_x else None,
                partial_scale.sum(1, keepdim=True).sum_to_size(scale_shape).to(scale_dtype),
                partial_shift.sum(1, keepdim=True).sum_to_size(shift_shape).to(shift_dtype),
            ]
            offset += length
        return None, None, None, *grads
