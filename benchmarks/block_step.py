"""One adapted block against diffusers' bare CogVideoXBlock at CogVideoX-5B shapes (issue 11).

    python benchmarks/block_step.py [--stage image] [--parts] [--eager-kernels] [--compiled-merge]
                                    [--kernels 40] [--ops 40]

Times a training pass (forward + backward to the block's inputs; the block's own weights frozen, the
adapter's trained, no gradient checkpointing) and an inference pass at twice the batch (classifier-free
guidance) of both blocks, on 3072 wide, 48 heads, 226 text tokens and 32 face tokens, and the stage's video
tokens: 17550 at batch 1 (video, 49x480x720) or 1350 at batch 8 (image, one 480x720 frame).
`bench` gives the whole model's ratio; this isolates one adapted block, where the adapter's cost is 2x the
model's (half the 5B blocks are adapted), and shows which kernels it adds:
--kernels N prints the top N GPU kernels of each block's training pass (torch.profiler).
--ops N prints the top N operators (by GPU time, grouped by input shapes) of each block's training pass.
--eager-kernels also times the adapted block with the face-key merge, the modulated norms, and both, in eager
PyTorch instead of their Triton kernels (`mm_lightning/models/fused_*.py`).
--compiled-merge also times the adapted block with the eager `merge_face_keys` under torch.compile.
--parts also times the adapted block with one part of the adapter left out at a time (CAN, the decoupled
cross-attention, the face-key merge, the whole face stream), to attribute its cost. Needs a GPU.
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

from mm_lightning.commands.bench_counters import print_kernels, timed, top_kernels
from mm_lightning.models import adapter

DIM, HEADS, TIME_DIM, TEXT, FACE = 3072, 48, 512, 226, 32
STAGES = {"video": (1, 17550), "image": (8, 1350)}  # training batch, video tokens
CUDA = torch.device("cuda")


def bare_block() -> CogVideoXBlock:
    block = CogVideoXBlock(
        dim=DIM,
        num_attention_heads=HEADS,
        attention_head_dim=DIM // HEADS,
        time_embed_dim=TIME_DIM,
        norm_elementwise_affine=True,  # as CogVideoX-5B's blocks
    )
    return block.to("cuda", torch.bfloat16).requires_grad_(False)


def adapted_block(cross_attention=True, face_modality=True, can=True, face_attention="joint"):
    block = adapter.MagicMirrorBlock(
        bare_block(), TIME_DIM, cross_attention, face_modality, can, can_hidden_dim=1024, face_attention=face_attention
    ).to("cuda")
    block.to(torch.bfloat16)
    for name, param in block.named_parameters():  # open the zero-initialised adapter, as after training
        if not name.startswith("block."):
            torch.nn.init.normal_(param, std=0.02) if param.dim() > 1 else torch.nn.init.constant_(param, 0.1)
    return block


def pass_fn(block, adapted: bool, batch: int, video_tokens: int, train: bool):
    """A closure running one pass: forward + backward when training, else forward without autograd."""
    shapes = (video_tokens, TEXT, FACE)
    video, text, face = (torch.randn(batch, n, DIM, device="cuda", dtype=torch.bfloat16) for n in shapes)
    for x in (video, text, face):
        x.requires_grad_(train)
    temb, id_cond = (torch.randn(batch, TIME_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    rope = tuple(torch.randn(video_tokens, DIM // HEADS, device="cuda") for _ in range(2))

    def forward():
        if adapted:
            return block(video, text, face, temb, id_cond, rope)
        return block(video, text, temb, image_rotary_emb=rope)

    def one_pass():
        if not train:
            with torch.no_grad():
                return forward()
        sum(out.float().pow(2).mean() for out in forward() if out is not None).backward()

    return one_pass


def print_ops(title: str, fn, n: int) -> None:
    """The n operators with the most GPU time of their own over one call of fn, per input shapes."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_device_time_total > 0]
    events.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events) / 1e3
    print(f"  {title}: {total:.1f} ms on the GPU; costliest operators:")
    for e in events[:n]:
        ms = e.self_device_time_total / 1e3
        print(f"    {ms:8.2f} ms {e.count:4d}x  {e.key[:48]:48s} {str(e.input_shapes)[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=sorted(STAGES), default="video", help="the stage's shapes (default: video)")
    parser.add_argument("--eager-kernels", action="store_true", help="also time the adapter without its Triton kernels")
    parser.add_argument("--compiled-merge", action="store_true", help="also time the eager merge under torch.compile")
    parser.add_argument("--parts", action="store_true", help="also time the adapter with each part left out")
    parser.add_argument("--kernels", type=int, default=0, help="print the top N GPU kernels of each training pass")
    parser.add_argument("--ops", type=int, default=0, help="print the top N operators of each training pass")
    args = parser.parse_args()
    torch.manual_seed(0)
    batch, video_tokens = STAGES[args.stage]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.stage} stage, {video_tokens} video tokens")
    variants = [("bare", bare_block(), False), ("adapted", adapted_block(), True)]
    parts = [
        ("adapted, no CAN", adapted_block(can=False)),
        ("adapted, no cross-attention", adapted_block(cross_attention=False)),
        ("adapted, no face-key merge", adapted_block(face_attention="cross_only")),
        ("adapted, no face stream", adapted_block(face_modality=False)),  # nor its merge
        ("adapted, no adapter at all", adapted_block(False, False, False)),  # the rewritten forward alone
    ]
    variants += [(label, block, True) for label, block in parts] if args.parts else []
    # The adapted block again with its Triton kernels swapped for eager PyTorch, or the eager merge compiled.
    swaps = [
        ("adapted, merge eager", lambda: mock.patch.object(adapter, "fused_face_key_merge", None)),
        ("adapted, norms eager", lambda: mock.patch.object(adapter, "fused_modulated_norms", None)),
        ("adapted, both eager", adapter.eager_forms),
    ]
    swaps = swaps if args.eager_kernels else []
    if args.compiled_merge:  # the eager form traced (no kernel to launch): inductor's fusion in the kernel's place
        compiled = torch.compile(adapter.merge_face_keys)
        swaps.append(
            (
                "adapted, merge compiled",
                lambda: mock.patch.multiple(adapter, merge_face_keys=compiled, fused_face_key_merge=None),
            )
        )
    for train, passes in ((True, batch), (False, 2 * batch)):
        what = f"{'training' if train else 'inference'} pass, batch {passes}"
        base = None
        for label, block, adapted in variants:
            ms = 1000 * timed(pass_fn(block, adapted, passes, video_tokens, train), steps=10, warmup=3, device=CUDA)
            base = base or ms
            print(f"{what}: {label:30s} {ms:8.2f} ms  x{ms / base:.4f}", flush=True)
        for label, swapped in swaps:
            with swapped():
                one_pass = pass_fn(variants[1][1], True, passes, video_tokens, train)
                ms = 1000 * timed(one_pass, steps=10, warmup=3, device=CUDA)
            print(f"{what}: {label:30s} {ms:8.2f} ms  x{ms / base:.4f}", flush=True)
    for label, block, adapted in variants if args.kernels or args.ops else ():
        one_pass = pass_fn(block, adapted, batch, video_tokens, train=True)
        if args.kernels:
            print_kernels(f"{label} block, training pass", top_kernels(one_pass, args.kernels, CUDA))
        if args.ops:
            print_ops(f"{label} block, training pass", one_pass, args.ops)


if __name__ == "__main__":
    main()
