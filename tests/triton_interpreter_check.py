"""Runs the adapter's Triton kernels on the CPU under Triton's interpreter (TRITON_INTERPRET=1, set by the
caller, tests/test_triton_kernels.py) in fp32, and prints as JSON the relative error of the output and of every gradient
against the eager forms in fp64."""

import copy
import json

import torch

from mm_lightning.models import adapter
from mm_lightning.models.fused_face_key_merge import fused_face_key_merge
from mm_lightning.models.fused_modulated_norm import fused_modulated_norms

torch.manual_seed(0)
errors = {}


def compare(name, got, want):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        errors[f"{name} {i}"] = ((g.double() - w).norm() / w.norm()).item()


def with_gradients(fn, inputs, grad, dtype):
    inputs = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(*inputs)
    return [out, *torch.autograd.grad(out, inputs, grad.to(dtype))]


# The merge: a gate at 0, a dropped face, 20 face keys (padded to 32), v strided as the head split leaves it.
q, k, v = (torch.randn(2, 3, 150, 64) for _ in range(3))
k_face, v_face = torch.randn(2, 3, 20, 64), torch.randn(2, 20, 3, 64).transpose(1, 2)
out_base, lse = adapter.attention_with_lse(q, k, v)
out_base = out_base.transpose(1, 2).contiguous().transpose(1, 2)  # strided, as cuDNN's output
gate, keep = torch.tensor([0.0, 0.5, 2.0]), torch.tensor([1.0, 0.0]).view(2, 1, 1, 1)
grad = torch.randn(2, 3, 150, 64)
inputs = [out_base, q, k_face, v_face, gate]
fused = with_gradients(lambda o, *rest: fused_face_key_merge(o, lse, *rest, keep), inputs, grad, torch.float32)
eager = lambda o, *rest: adapter.merge_face_keys(o, lse.double(), *rest, keep.double())  # noqa: E731
compare("merge", fused, with_gradients(eager, inputs, grad, torch.float64))

# The modulated norms: three streams joined, the LayerNorm with its own weight and bias.
norm = torch.nn.LayerNorm(256).requires_grad_(False)
norm.weight.normal_(1.0, 0.2), norm.bias.normal_(0.0, 0.2)
streams = [(torch.randn(2, n, 256) * 3 + 1, torch.randn(2, 1, 256), torch.randn(2, 1, 256)) for n in (37, 50, 20)]
inputs, grad = [t for stream in streams for t in stream], torch.randn(2, 107, 256)
fused = with_gradients(
    lambda *f: fused_modulated_norms(norm.weight, norm.bias, norm.eps, *zip(f[0::3], f[1::3], f[2::3], strict=True)),
    inputs,
    grad,
    torch.float32,
)
norm64 = copy.deepcopy(norm).double()
eager = lambda *f: adapter.modulated_norms(norm64, *zip(f[0::3], f[1::3], f[2::3], strict=True))  # noqa: E731
compare("norms", fused, with_gradients(eager, inputs, grad, torch.float64))
print(json.dumps(errors))
