"""The adapter's Triton kernels (`mm_lightning/models/fused_*.py`) against their eager forms: on CUDA in bf16,
and anywhere Triton is installed under its interpreter in fp32. The CPU CI has no Triton: these skip there."""

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.version import Version


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernels: CUDA only")
@pytest.mark.parametrize("face_tokens", [32, 20])  # 20: padded to the kernels' 32-wide key block
def test_fused_face_key_merge_matches_eager_on_cuda(face_tokens):
    """The Triton merge's output and gradients are as close to the fp64 truth as the eager merge's in bf16,
    and exactly the base attention where the gate is 0 or the face is dropped."""
    from mm_lightning.models import adapter

    assert adapter.fused_face_key_merge is not None, "Triton is installed beside CUDA torch"
    gen = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, 64, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
    k_face = torch.randn(2, 4, face_tokens, 64, device="cuda", generator=gen, dtype=torch.bfloat16)
    # v_face as the adapter's head split leaves it: a transposed view of [B, Nf, H, d]
    v_face = torch.randn(2, face_tokens, 4, 64, device="cuda", generator=gen, dtype=torch.bfloat16).transpose(1, 2)
    out_base, lse = adapter.attention_with_lse(q, k, v)
    gate = torch.tensor([0.0, 0.5, 2.0, 0.01], device="cuda")
    keep = torch.tensor([1.0, 0.0], device="cuda", dtype=torch.bfloat16).view(2, 1, 1, 1)
    grad_out = torch.randn(out_base.shape, device="cuda", generator=gen, dtype=torch.bfloat16)

    def run(inputs):
        inputs = [t.detach().requires_grad_() for t in inputs]
        merged = adapter.merge_face_keys(inputs[0], lse, *inputs[1:], keep.to(inputs[0].dtype))
        return merged.detach(), torch.autograd.grad(merged, inputs, grad_out.to(merged.dtype))

    inputs = [out_base, q, k_face, v_face, gate]
    fused = run(inputs)
    truth = run([t.double() for t in inputs])  # fp64 takes the eager path
    with adapter.eager_forms():
        eager = run(inputs)
    assert torch.equal(fused[0][:, 0], out_base[:, 0]) and torch.equal(fused[0][1], out_base[1])
    names = ["output", "out_base", "q", "k_face", "v_face", "gate"]
    for name, got, ref, want in zip(names, [fused[0], *fused[1]], [eager[0], *eager[1]], [truth[0], *truth[1]]):
        got_error, eager_error = _relative_error(got, want), _relative_error(ref, want)
        assert got_error <= 2 * eager_error + 1e-3, (name, got_error, eager_error)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernels: CUDA only")
@pytest.mark.parametrize("affine", [True, False])
def test_fused_modulated_norms_match_eager_on_cuda(affine):
    """The Triton modulated norms (three streams joined, as the feed-forward's input) are as close to the fp64
    truth as eager bf16, in the output and in the gradients of x, scale and shift."""
    from mm_lightning.models import adapter

    assert adapter.fused_modulated_norms is not None, "Triton is installed beside CUDA torch"
    gen = torch.Generator("cuda").manual_seed(0)
    norm = (
        torch.nn.LayerNorm(3072, eps=1e-5, elementwise_affine=affine).to("cuda", torch.bfloat16).requires_grad_(False)
    )
    if affine:
        norm.weight.normal_(1.0, 0.2, generator=gen), norm.bias.normal_(0.0, 0.2, generator=gen)
    rand = lambda *shape: torch.randn(*shape, device="cuda", generator=gen, dtype=torch.bfloat16)  # noqa: E731
    streams = [(rand(2, n, 3072) * 3 + 1, rand(2, 1, 3072) * 0.3, rand(2, 1, 3072)) for n in (37, 300, 20)]
    grad_out = rand(2, 357, 3072)

    def run(norm, streams):
        flat = [t.detach().requires_grad_() for stream in streams for t in stream]
        out = adapter.modulated_norms(norm, *zip(flat[0::3], flat[1::3], flat[2::3], strict=True))
        return [out.detach(), *torch.autograd.grad(out, flat, grad_out.to(out.dtype))]

    fused = run(norm, streams)
    truth = run(copy.deepcopy(norm).double(), [[t.double() for t in stream] for stream in streams])
    with adapter.eager_forms():
        eager = run(norm, streams)
    names = ["output"] + [f"{what} {i}" for i in range(3) for what in ("x", "scale", "shift")]
    for name, got, ref, want in zip(names, fused, eager, truth, strict=True):
        got_error, eager_error = _relative_error(got, want), _relative_error(ref, want)
        assert got_error <= 2 * eager_error + 1e-3, (name, got_error, eager_error)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernels: CUDA only")
def test_adapted_block_with_triton_kernels_matches_eager_on_cuda():
    """A whole adapted block in bf16 (image-stage batch, faces dropped for one sample): the adapter's gradients
    with the Triton kernels are as close to an fp32 eager pass as the eager bf16 pass is."""
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

    from mm_lightning.models import adapter

    dim, heads, time_dim, video, text, face = 1024, 16, 512, 1350, 226, 32
    torch.manual_seed(0)
    bare = CogVideoXBlock(dim, heads, dim // heads, time_dim, norm_elementwise_affine=True).requires_grad_(False)
    block = adapter.MagicMirrorBlock(bare, time_dim, True, True, True, can_hidden_dim=256).to("cuda")
    for name, param in block.named_parameters():  # open the zero-initialised adapter, as after training
        if not name.startswith("block."):
            torch.nn.init.normal_(param, std=0.02)
    gen = torch.Generator("cuda").manual_seed(1)
    inputs = [torch.randn(4, n, dim, device="cuda", generator=gen) for n in (video, text, face)]
    inputs += [torch.randn(4, time_dim, device="cuda", generator=gen) for _ in range(2)]
    rope = tuple(torch.randn(video, dim // heads, device="cuda", generator=gen) for _ in range(2))
    keep = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [1.0, 0.0]], device="cuda")

    def gradients(block, dtype):
        outputs = block(*[t.to(dtype) for t in inputs], rope, keep)
        sum(out.float().square().mean() for out in outputs).backward()
        grads = {n: p.grad.double() for n, p in block.named_parameters() if p.grad is not None}
        block.zero_grad(set_to_none=True)
        return grads

    truth = gradients(block, torch.float32)
    half = copy.deepcopy(block).to(torch.bfloat16)
    fused = gradients(half, torch.bfloat16)
    with adapter.eager_forms():
        eager = gradients(half, torch.bfloat16)
    assert set(fused) == set(truth) and {"face_key_gate", "can.2.bias"} <= set(truth)
    for name, want in truth.items():
        if name == "norm_k_face.bias":  # no gradient but rounding (a shift of all face logits changes nothing)
            continue
        fused_error, eager_error = _relative_error(fused[name], want), _relative_error(eager[name], want)
        assert fused_error <= 2 * eager_error + 1e-3, (name, fused_error, eager_error)


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="Triton is not installed (CPU torch); on CUDA see the tests above",
)
@pytest.mark.skipif(
    Version(torch.__version__).release[:2] < (2, 13),
    reason="torch.library.wrap_triton refuses interpreted kernels before torch 2.13; on CUDA see the tests above",
)
def test_triton_kernels_in_triton_interpreter_match_fp64():
    """The kernels run on the CPU under Triton's interpreter, in fp32 (numpy has no bf16): forward and every
    gradient agree with the eager forms in fp64 to rounding. What the CUDA tests check in bf16, this checks
    anywhere Triton is installed."""
    script = Path(__file__).parent / "triton_interpreter_check.py"
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # read when triton is imported: a process of its own
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.splitlines()[-1])
    assert len(errors) == 16 and max(errors.values()) < 1e-5, errors
