"""`python benchmarks/real_scale/compiled_gradients/compare_gradients.py` (CUDA): the largest difference of each
adapter parameter's gradient from eager, for one adapted block at local batch 1 and video length (fp32, 1024 wide),
under torch.compile with inductor (mix-order reduction on and off) and with aot_eager. Each compiled pass runs
after one on other inputs; memory is not poisoned (the test in tests/test_model.py poisons it)."""

import copy

import torch
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

from mm_lightning.models.adapter import MagicMirrorBlock

dim, heads, time_dim, video, text, face = 1024, 16, 512, 17550, 226, 32
torch.manual_seed(0)
bare = CogVideoXBlock(dim, heads, dim // heads, time_dim, norm_elementwise_affine=True).requires_grad_(False)
eager = MagicMirrorBlock(bare, time_dim, True, True, True, can_hidden_dim=256).cuda()
for name, param in eager.named_parameters():
    if not name.startswith("block."):
        torch.nn.init.normal_(param, std=0.02)


def gradients(block, seed):
    gen = torch.Generator("cuda").manual_seed(seed)
    x, txt, fc = (torch.randn(1, n, dim, device="cuda", generator=gen) for n in (video, text, face))
    temb, id_cond = (torch.randn(1, time_dim, device="cuda", generator=gen) for _ in range(2))
    rope = tuple(torch.randn(video, dim // heads, device="cuda", generator=gen) for _ in range(2))
    outputs = block(x, txt, fc, temb, id_cond, rope)
    sum(out.square().mean() for out in outputs).backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    block.zero_grad(set_to_none=True)
    return grads


want = gradients(eager, 2)
variants = {"eager again": (None, None)}
variants["inductor, mix-order on"] = ("inductor", {"triton.mix_order_reduction": True})
variants["inductor, mix-order off"] = ("inductor", {"triton.mix_order_reduction": False})
variants["aot_eager"] = ("aot_eager", None)
results = {}
for label, (backend, options) in variants.items():
    torch._dynamo.reset()
    block = copy.deepcopy(eager)
    if backend:
        block.compile(dynamic=False, backend=backend, options=options)
    gradients(block, 1)
    got = gradients(block, 2)
    results[label] = {n: ((got[n] - g).abs().max().item(), (~got[n].isfinite()).sum().item()) for n, g in want.items()}
print(f"{'parameter':32s} {'max|g|':>9s} " + " ".join(f"{k[:22]:>24s}" for k in variants))
for n, g in want.items():
    row = " ".join(f"{results[k][n][0]:>16.2e} nf={results[k][n][1]:<5d}" for k in variants)
    print(f"{n:32s} {g.abs().max().item():9.2e} {row}")
