"""generate's options on the tiny profile: negative prompts (sampling and eval sets), diffusers' CPU
offloading (run here with the CPU as the execution device), and the clear errors for what needs a
GPU or torchao. Peak memory and time per mode need a GPU: see benchmarks/ and the README."""

import importlib.util

import pytest
import torch
import yaml

from mm_lightning.cli import build_parser, main
from mm_lightning.config import load_config
from mm_lightning.evaluation.eval_set import load_eval_set
from mm_lightning.models.loading import load_components
from mm_lightning.pipeline import build_pipeline, encode_prompts_then_load, offload, sample_video
from tests.helpers import PAPER_TRAINING, open_adapters


def _sample(cfg, pipe, negative_prompt=None):
    clip_size = pipe.transformer.face_encoder.clip_image_size
    gen = torch.Generator().manual_seed(0)
    ref_pixels, id_embedding = torch.rand(1, 3, clip_size, clip_size, generator=gen), torch.randn(128, generator=gen)
    return sample_video(pipe, cfg, "a woman talking", ref_pixels, id_embedding, seed=0, negative_prompt=negative_prompt)


@pytest.fixture(scope="module")
def tiny():
    """Config, models with non-zero adapters (so that the face stream matters), and the plain pipeline's video."""
    cfg = load_config("full", overrides=["sampling.num_inference_steps=2", *PAPER_TRAINING])
    components = load_components(cfg)
    open_adapters(components.transformer)
    return cfg, components, _sample(cfg, build_pipeline(components))


def test_negative_prompt_changes_the_guided_video(tiny):
    cfg, components, plain = tiny
    negative = _sample(cfg, build_pipeline(components), "blurry, distorted face")
    assert (negative != plain).any()


def test_model_offload_gives_the_same_video(tiny):
    """diffusers' model offload with the CPU as the execution device: the accelerate hooks really run, and
    the face conditioning (encoded where the transformer's weights wait) reaches the moved transformer."""
    cfg, components, expected = tiny
    pipe = build_pipeline(components)
    offload(pipe, "model", device="cpu")
    try:
        assert pipe._all_hooks and (_sample(cfg, pipe) == expected).all()
    finally:
        pipe.remove_all_hooks()


def test_t5_returns_to_its_own_cpu_tensors_after_encoding(tiny):
    # "meta" stands in for the GPU: T5 encodes there, then its parameters are the very CPU tensors they were
    # before (no copy back), while the transformer and the VAE have moved.
    cfg = tiny[0]
    pipe = build_pipeline(load_components(cfg))
    before = {name: p.data_ptr() for name, p in pipe.text_encoder.named_parameters()}
    embeds, _ = encode_prompts_then_load(pipe, cfg, "a woman talking", device="meta")
    assert embeds.device.type == "meta" and pipe.transformer.device.type == "meta"
    assert {name: p.data_ptr() for name, p in pipe.text_encoder.named_parameters()} == before
    assert all(p.device.type == "cpu" for p in pipe.text_encoder.parameters())


def test_sequential_offload_puts_the_weights_behind_accelerate_hooks(tiny):
    """Only the set-up is checked here. A CPU-side run is not possible: with the CPU as the execution device,
    accelerate's tied-parameter cache hands plain tensors back for the weights (TypeError in
    set_module_tensor_to_device); the GPU run is in benchmarks/ (README, "Generation on small GPUs")."""
    pipe = build_pipeline(load_components(tiny[0]))  # its own models: these stay offloaded
    offload(pipe, "sequential", device="cpu")
    face_encoder = pipe.transformer.face_encoder
    assert all(p.device.type == "meta" for p in face_encoder.parameters())
    assert sum(hasattr(m, "_hf_hook") for m in face_encoder.modules()) > 10  # one per module with weights


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_without_a_gpu_stops_with_a_clear_error(mode, capsys):
    code = main(
        ["generate", "--checkpoint", "missing.ckpt", "--image", "x.jpg", "--prompt", "a man", "--offload", mode]
    )
    assert code == 2
    assert "no GPU is visible" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("torchao") is not None, reason="checks the error without torchao")
def test_int8_without_torchao_stops_with_a_clear_error(capsys):
    code = main(["generate", "--checkpoint", "missing.ckpt", "--image", "x.jpg", "--prompt", "a man", "--int8"])
    assert code == 2
    assert "pip install torchao" in capsys.readouterr().err


def test_generate_help_documents_every_option():
    sub = build_parser()._subparsers._group_actions[0].choices["generate"]
    text = sub.format_help()
    for option in ("--negative-prompt", "--offload", "{none,model,sequential}", "--int8", "--raw-weights", "--seed"):
        assert option in text, option


def test_eval_set_negative_prompt_per_prompt_or_default(tmp_path):
    spec = {
        "identities": [{"name": "a", "class_word": "man", "references": ["a.jpg"]}],
        "prompts": ["{who} running", {"prompt": "{who} singing", "negative_prompt": "blurry"}],
        "negative_prompt": "distorted face",
    }
    (tmp_path / "set.yaml").write_text(yaml.safe_dump(spec))
    items = load_eval_set(tmp_path / "set.yaml")
    assert [(i.prompt, i.negative_prompt) for i in items] == [
        ("a man running", "distorted face"),
        ("a man singing", "blurry"),
    ]
    del spec["negative_prompt"]
    (tmp_path / "set.yaml").write_text(yaml.safe_dump(spec))
    assert load_eval_set(tmp_path / "set.yaml")[0].negative_prompt is None  # -> sampling.negative_prompt


@pytest.mark.slow  # inductor compiles the two block classes on the CPU: about half a minute
def test_compiled_blocks_give_the_same_video(tiny):
    # sampling.compile_blocks: generate runs every transformer block under torch.compile.
    from mm_lightning.models.magicmirror import compile_blocks

    cfg = tiny[0]
    components = load_components(cfg)
    open_adapters(components.transformer)
    eager = _sample(cfg, build_pipeline(components))
    compile_blocks(components.transformer.base.transformer_blocks)
    torch._dynamo.utils.counters.clear()
    compiled = _sample(cfg, build_pipeline(components))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # adapted and plain blocks did compile
    diff = (torch.as_tensor(compiled).int() - torch.as_tensor(eager).int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01  # uint8 frames: rounding apart
