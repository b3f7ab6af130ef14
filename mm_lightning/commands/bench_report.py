"""bench's report: the ratios between the timed models, printed and written as
<out-dir>/<profile>_<stage>_b<batch>[_compiled].{json,md}."""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mm_lightning.commands.bench import BenchSetup


def _ratios(numerator: dict, denominator: dict) -> dict:
    return {
        "train": numerator["train_step_s"] / denominator["train_step_s"],
        "infer_cfg": numerator["infer_cfg_step_s"] / denominator["infer_cfg_step_s"],
        "train_flops": numerator["train_flops"] / denominator["train_flops"],
    }


def report(s: BenchSetup, args, bare: dict, adapted: dict, consisid: dict | None) -> None:
    """Prints the ratios; writes <out-dir>/<profile>_<stage>_b<batch>[_compiled].{json,md}."""
    import diffusers
    import torch

    adapted_bare = _ratios(adapted, bare)
    ratios = {
        "train_ratio": adapted_bare["train"],
        "infer_cfg_ratio": adapted_bare["infer_cfg"],
        "train_flops_ratio": adapted_bare["train_flops"],
    }
    print(
        f"adapted/bare: training step {ratios['train_ratio']:.3f} (FLOPs {ratios['train_flops_ratio']:.3f}), "
        f"inference step with CFG {ratios['infer_cfg_ratio']:.3f}"
    )
    if consisid is not None:
        ratios["consisid_over_bare"] = _ratios(consisid, bare)
        ratios["adapted_over_consisid"] = _ratios(adapted, consisid)
        for name, r in (
            ("ConsisID/bare", ratios["consisid_over_bare"]),
            ("adapted/ConsisID", ratios["adapted_over_consisid"]),
        ):
            print(
                f"{name}: training step {r['train']:.3f} (FLOPs {r['train_flops']:.3f}), "
                f"inference step with CFG {r['infer_cfg']:.3f}"
            )
    bare = dict(bare)
    result = {
        "date": datetime.date.today().isoformat(),
        "device": s.device_name,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "experiment": s.cfg.experiment,
        "profile": s.cfg.profile,
        "stage": args.stage,
        "batch_size": s.batch,
        "compiled": args.compile,
        "gradient_checkpointing": s.checkpointing,
        "latents": s.latent_shape,
        "matmul_peak_tflops": s.peak_tflops,
        "analytic_bare_flops": bare.pop("analytic_flops"),
        "bare": bare,
        "adapted": adapted,
        "consisid": consisid,
        **ratios,
    }
    if args.compile:
        result["compile_counters"] = _compile_counters()
    name = f"{s.cfg.profile}_{args.stage}_b{s.batch}{'_compiled' if args.compile else ''}"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(_markdown(result))
    print(f"wrote {out / name}.json and .md")


def _compile_counters() -> dict:
    from torch._dynamo.utils import counters

    return {"frames_compiled": counters["stats"]["unique_graphs"], "recompiles": sum(counters["recompiles"].values())}


def _markdown(r: dict) -> str:
    a = r["analytic_bare_flops"]
    lines = [
        f"# bench {r['profile']} {r['stage']} stage, batch {r['batch_size']}{', compiled' if r['compiled'] else ''}",
        "",
        f"{r['device']}, torch {r['torch']}, diffusers {r['diffusers']}, {r['date']}; latents {r['latents']}; "
        f"gradient checkpointing {'on' if r['gradient_checkpointing'] else 'off'}; "
        f"bf16 matmul peak {r['matmul_peak_tflops']:.0f} TFLOP/s (measured, 8192^3)",
        "",
        "| model | train step (s) | peak (GiB) | train FLOPs | TFLOP/s | MFU | inference+CFG step (s) | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in ("bare", "adapted", "consisid"):
        m = r[key]
        if m is None:
            continue
        lines.append(
            f"| {key} | {m['train_step_s']:.3f} | {m['train_peak_gib']:.1f} | {m['train_flops']:.3e} | "
            f"{m['train_tflops']:.0f} | {m['train_mfu']:.1%} | {m['infer_cfg_step_s']:.3f} | {m['infer_mfu']:.1%} |"
        )
    lines += [
        "",
        f"adapted / bare: training step **{r['train_ratio']:.3f}** (FLOPs {r['train_flops_ratio']:.3f}), "
        f"inference step with CFG **{r['infer_cfg_ratio']:.3f}**",
        "",
    ]
    if r["consisid"] is not None:
        for label, key in (("ConsisID / bare", "consisid_over_bare"), ("adapted / ConsisID", "adapted_over_consisid")):
            x = r[key]
            lines += [
                f"{label}: training step **{x['train']:.3f}** (FLOPs {x['train_flops']:.3f}), "
                f"inference step with CFG **{x['infer_cfg']:.3f}**",
                "",
            ]
        lines += [
            "ConsisID: diffusers' `ConsisIDTransformer3DModel` on this backbone (latent channels doubled for the "
            "reference image, learned positional embeddings, its face modules trained, the backbone frozen); its "
            "EVA-CLIP face tower stood in by the CLIP ViT-L/14 tower that the adapted model runs.",
            "",
        ]
    lines += [
        f"FLOPs from torch.utils.flop_counter on one eager step; bare-model analytic check: training "
        f"{a['train']:.3e}, inference+CFG {a['infer_cfg']:.3e}.",
        "",
    ]
    for key in ("bare", "adapted", "consisid"):
        for kind in ("train", "infer_cfg"):
            rows = (r[key] or {}).get(f"kernels_{kind}")
            if rows:
                lines += [
                    f"Costliest GPU kernels, {key}, {kind} step ({rows[0]['total_ms']:.0f} ms in all):",
                    "",
                    "| ms | share | calls | kernel |",
                    "|---|---|---|---|",
                ]
                lines += [
                    f"| {x['ms']:.1f} | {x['share']:.1%} | {x['calls']} | `{x['kernel'][:100]}` |" for x in rows[1:]
                ]
                lines.append("")
    return "\n".join(lines)
