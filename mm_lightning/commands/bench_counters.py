"""What `bench` measures with: timed steps, a measured bf16 matmul peak, FLOPs (counted and analytic)
and the costliest GPU kernels of a step."""

from __future__ import annotations

import statistics
import time


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_tflops(device) -> float:
    import torch

    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = timed(lambda: a @ b, steps=20, warmup=5, device=device)
    return 2 * n**3 / seconds / 1e12


def analytic_bare_flops(tconf: dict, batch: int, frames: int, height: int, width: int, checkpointing: bool) -> dict:
    """Matmul FLOPs of the bare backbone's blocks (embeddings and output layers left out).

    Per layer and sample, the forward costs 24*D^2*S in the projections and the feed-forward,
    and 4*S^2*D in attention (S = text + video tokens). A training step with frozen weights
    runs the linear part 3 times (forward, recomputed forward, input gradient) and the
    attention 4 times (forward, recomputed forward, and a backward of twice the forward),
    one recompute less without checkpointing. Inference with CFG is one forward at 2x batch.
    """
    p = tconf["patch_size"]
    dim = tconf["num_attention_heads"] * tconf["attention_head_dim"]
    tokens_per_frame = (height // p) * (width // p) // (tconf.get("patch_size_t") or 1)  # 1.5: 2 frames a patch
    seq = tconf["max_text_seq_length"] + frames * tokens_per_frame
    linear = tconf["num_layers"] * 24 * dim**2 * seq
    attention = tconf["num_layers"] * 4 * seq**2 * dim
    passes = 3 if checkpointing else 2
    return {
        "train": batch * (passes * linear + (passes + 1) * attention),
        "infer_cfg": 2 * batch * (linear + attention),
    }


def count_flops(fn) -> int:
    """Matmul and attention FLOPs of one call of fn, from torch.utils.flop_counter's formulas.

    A bare dispatch mode over those formulas: FlopCounterMode's module tracker fails on
    views of trainable parameters taken under no_grad (the face queries at inference)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class FlopCount(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func.overloadpacket)
            if formula is not None:
                self.total += formula(*args, **kwargs, out_val=out)
            return out

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        with FlopCount() as counter:
            fn()
    return counter.total


def top_kernels(fn, n: int, device) -> list[dict]:
    """The n GPU kernels with the most total time over one call of fn (after one warm call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        fn()
        sync(device)
    rows = []
    for event in prof.key_averages():
        if device.type != "cuda":
            total = event.self_cpu_time_total
        else:  # torch renamed cuda_time_total to device_time_total
            total = getattr(event, "device_time_total", None)
            if total is None:
                total = getattr(event, "cuda_time_total", 0)
        if total > 0:
            rows.append({"kernel": event.key, "ms": total / 1e3, "calls": event.count})
    rows.sort(key=lambda r: -r["ms"])
    all_ms = sum(r["ms"] for r in rows)
    for r in rows:
        r["share"] = r["ms"] / all_ms
    return [{"total_ms": all_ms}] + rows[:n]


def print_kernels(title: str, rows: list[dict]) -> None:
    print(f"  {title}: {rows[0]['total_ms']:.1f} ms of GPU kernels; costliest:")
    for r in rows[1:]:
        print(f"    {r['ms']:9.2f} ms {r['share']:6.1%} {r['calls']:5d}x  {r['kernel'][:110]}")
