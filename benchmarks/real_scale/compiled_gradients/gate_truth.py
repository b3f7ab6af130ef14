"""`python benchmarks/real_scale/compiled_gradients/gate_truth.py` (CUDA): the face-key gate's and CAN's gradients
of one adapted block, eager fp32 and compiled fp32 (inductor, mix-order reduction off) against eager fp64 with a
plain-matmul attention as the truth, at 2000, 8000 and 17550 video tokens (fp64 up to 8000)."""

import copy

import torch
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

from mm_lightning.models import adapter
from mm_lightning.models.adapter import MagicMirrorBlock

dim, heads, time_dim, text, face = 1024, 16, 512, 226, 32
fused_lse = adapter.attention_with_lse


def math_lse(q, k, v):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = scores.logsumexp(-1)
    return (scores - lse[..., None]).exp() @ v, lse


def gradients(block, seed, video, dtype):
    gen = torch.Generator("cuda").manual_seed(seed)
    x, txt, fc = (torch.randn(1, n, dim, device="cuda", generator=gen).to(dtype) for n in (video, text, face))
    temb, id_cond = (torch.randn(1, time_dim, device="cuda", generator=gen).to(dtype) for _ in range(2))
    rope = tuple(torch.randn(video, dim // heads, device="cuda", generator=gen).to(dtype) for _ in range(2))
    outputs = block(x, txt, fc, temb, id_cond, rope)
    sum(out.square().mean() for out in outputs).backward()
    grads = {n: p.grad.clone().double() for n, p in block.named_parameters() if p.grad is not None}
    block.zero_grad(set_to_none=True)
    return grads


torch.manual_seed(0)
bare = CogVideoXBlock(dim, heads, dim // heads, time_dim, norm_elementwise_affine=True).requires_grad_(False)
eager = MagicMirrorBlock(bare, time_dim, True, True, True, can_hidden_dim=256).cuda()
for name, param in eager.named_parameters():
    if not name.startswith("block."):
        torch.nn.init.normal_(param, std=0.02)
print("gate:", [round(v, 3) for v in eager.face_key_gate.tolist()])
for video in (2000, 8000, 17550):
    torch._dynamo.reset()
    compiled = copy.deepcopy(eager)
    compiled.compile(dynamic=False, options={"triton.mix_order_reduction": False})
    gradients(compiled, 1, video, torch.float32)
    results = {
        "eager fp32": gradients(eager, 2, video, torch.float32),
        "compiled fp32": gradients(compiled, 2, video, torch.float32),
    }
    if video <= 8000:
        adapter.attention_with_lse = math_lse
        results["eager fp64 (truth)"] = gradients(copy.deepcopy(eager).double(), 2, video, torch.float64)
        adapter.attention_with_lse = fused_lse
    print(f"== video tokens {video}")
    for label, grads in results.items():
        print(f"  {label:20s} face_key_gate grad x1e7: {[round(v * 1e7, 2) for v in grads['face_key_gate'].tolist()]}")
    for name in ("face_key_gate", "can.2.bias", "to_v_face.weight"):
        ref = results.get("eager fp64 (truth)", results["eager fp32"])[name]
        errs = {k: f"{((g[name] - ref).norm() / ref.norm()).item():.2e}" for k, g in results.items()}
        print(f"  relative error of {name}: {errs}")
