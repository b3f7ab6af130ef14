"""python -m mm_lightning describe --experiment NAME [--profile P] [key=value ...]

Builds every model on the meta device (no weights, no memory), so it works for the
cogvideox-5b profile on any machine."""

from mm_lightning.commands.common import add_experiment_arguments, config_from_args
from mm_lightning.config import to_yaml

# component -> test on the parameter name (inside MagicMirrorTransformer)
ADAPTER_PARTS = {
    "ID perceiver": lambda n: n.startswith("face_encoder.id_perceiver."),
    "face perceiver": lambda n: n.startswith(("face_encoder.face_queries", "face_encoder.face_perceiver.")),
    "fusion MLP": lambda n: n.startswith("face_encoder.fusion."),
    "CAN": lambda n: ".can." in n or n.startswith("id_proj."),
    "face AdaLN (m_face)": lambda n: ".face_modulation." in n,
    "face keys in joint attention (gate)": lambda n: n.endswith(".face_key_gate"),
    "cross-attention": lambda n: any(k in n for k in (".face_kv_norm.", ".to_k_face.", ".to_v_face.", ".norm_k_face.")),
    "projections (x_face)": lambda n: n.startswith("face_encoder.face_proj."),
}


def parameter_table(models: dict) -> list[tuple[str, int, int]]:
    """[(component, total, trainable)] for the backbone, CLIP, T5, VAE and each MagicMirror part."""
    transformer = models["transformer"]
    rows: dict[str, list[int]] = {"backbone (CogVideoX transformer)": [0, 0], "CLIP image encoder": [0, 0]}
    rows.update({name: [0, 0] for name in ADAPTER_PARTS})
    for name, p in transformer.named_parameters():
        part = next((k for k, test in ADAPTER_PARTS.items() if test(name)), None)
        if part is None:
            part = "CLIP image encoder" if name.startswith("face_encoder.clip.") else "backbone (CogVideoX transformer)"
        rows[part][0] += p.numel()
        rows[part][1] += p.numel() if p.requires_grad else 0
    rows["T5 text encoder"] = [sum(p.numel() for p in models["text_encoder"].parameters()), 0]
    rows["VAE"] = [sum(p.numel() for p in models["vae"].parameters()), 0]
    return [(k, total, trainable) for k, (total, trainable) in rows.items()]


def format_table(rows: list[tuple[str, int, int]]) -> str:
    lines = [f"{'component':34} {'total':>16} {'trainable':>16}", "-" * 68]
    lines += [f"{name:34} {total:>16,} {trainable:>16,}" for name, total, trainable in rows]
    new = sum(total for name, total, _ in rows if name in ADAPTER_PARTS)
    lines += [
        "-" * 68,
        f"{'all':34} {sum(r[1] for r in rows):>16,} {sum(r[2] for r in rows):>16,}",
        f"{'added by MagicMirror (+ CLIP)':34} {new + dict((r[0], r[1]) for r in rows)['CLIP image encoder']:>16,}",
    ]
    return "\n".join(lines)


def add_arguments(parser):
    add_experiment_arguments(parser)


def run(args) -> int:
    from mm_lightning.models.loading import build_from_architecture

    cfg = config_from_args(args)
    print(to_yaml(cfg))
    print(format_table(parameter_table(build_from_architecture(cfg, device="meta"))))
    return 0
