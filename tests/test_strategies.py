"""What the distributed strategies and the 8-bit optimiser change in the training step (issue 13), on the tiny
profile. Lightning's FSDP and DeepSpeed need CUDA, so these tests rebuild what each does to the model;
the real runs on 2 and 4 GPUs are in benchmarks/real_scale/ (h200x2/multi_2gpu*.log, h200x4/multi_4gpu*.log)."""

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import nn

from mm_lightning.config import ConfigError, load_config
from mm_lightning.evaluation.eval_set import demo_eval_set
from mm_lightning.models.loading import load_components, write_random_weights
from mm_lightning.module import MagicMirrorModule
from tests.helpers import REPO, free_port, open_adapters
from tests.test_dtype_policy import _image_batch
from tests.test_model import _inputs


class _Wrapper(nn.Module):
    """What FSDP's auto-wrapping makes of each block: another module, forwarding the same arguments."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_adapted_blocks_keep_the_face_stream_when_every_block_is_wrapped():
    cfg = load_config("full")
    components = load_components(cfg)
    model = components.transformer
    latents, text, t, rotary, face = _inputs(components, cfg)
    open_adapters(model)  # so the face stream counts
    with torch.no_grad():
        expected = model(latents, text, t, image_rotary_emb=rotary, face=face)[0]
        blocks = model.base.transformer_blocks
        for i in range(len(blocks)):
            blocks[i] = _Wrapper(blocks[i])
        wrapped = model(latents, text, t, image_rotary_emb=rotary, face=face)[0]
    assert torch.equal(wrapped, expected)


def test_a_step_runs_with_every_weight_and_input_in_bf16_and_no_autocast():
    # DeepSpeed's bf16 mode: the engine casts the whole model to bf16, Lightning casts the batch's floats to
    # bf16, and nothing autocasts (fp32 master weights live in the ZeRO optimiser). A cached batch, as at 5B.
    cfg = load_config("full", overrides=["eval.enabled=false"])
    module = MagicMirrorModule(cfg, stage="video_finetune", text_encoder=False, vae=False).to(torch.bfloat16)
    tconf, size = module.transformer.config, module.transformer.face_encoder.clip_image_size
    batch = {
        "latents": torch.randn(2, 2, tconf.in_channels, 8, 8),  # [B, F', C, h, w]
        "prompt_embeds": torch.randn(2, tconf.max_text_seq_length, tconf.text_embed_dim),
        "caption": ["a man walking in the park", "a woman smiling"],
        "ref_pixels": torch.rand(2, 3, size, size),
        "id_embedding": torch.randn(2, 128),
        "face_mask": torch.ones(2, 5, 1, 64, 64),
    }
    batch = apply_to_collection(batch, torch.Tensor, lambda t: t.to(torch.bfloat16))
    loss = module.compute_loss(batch, generator=torch.Generator().manual_seed(0))["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.dtype == torch.bfloat16 for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_adamw8bit_without_torchao_is_a_config_error(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a)
    )
    with pytest.raises(ConfigError, match="optim.name=adamw8bit needs torchao"):
        load_config("full", overrides=["optim.name=adamw8bit"])
    with pytest.raises(ConfigError, match="optim.name must be adamw or adamw8bit"):
        load_config("full", overrides=["optim.name=sgd"])


@pytest.mark.slow  # torchao compiles its update for every parameter shape: about 2 minutes on CPU
@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
def test_adamw8bit_keeps_8bit_states_and_trains():
    from torchao.optim import AdamW8bit
    from torchao.optim.subclass_8bit import OptimState8bit

    cfg = load_config("full", overrides=["eval.enabled=false", "optim.name=adamw8bit"])
    module = MagicMirrorModule(cfg, stage="image_pretrain", text_encoder=True, vae=True)
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, AdamW8bit)
    loss = module.compute_loss(_image_batch(cfg), generator=torch.Generator().manual_seed(0))["loss"]
    loss.backward()
    trained = [p for p in module.parameters() if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0]
    before = [p.detach().clone() for p in trained]
    optimizer.step()
    scheduler.step()  # the LR schedule drives torchao's tensor learning rate
    assert all(not torch.equal(b, p) for b, p in zip(before, trained, strict=True))
    big = [p for p in trained if p.numel() >= 4096 and p.numel() % 256 == 0]  # torchao quantises these
    assert big and all(isinstance(optimizer.state[p]["exp_avg"], OptimState8bit) for p in big)
    # 2 bytes of state per parameter instead of AdamW's 8: what --resume restores too.
    fresh = type(optimizer)(optimizer.param_groups)
    fresh.load_state_dict(optimizer.state_dict())
    assert isinstance(fresh.state[big[0]]["exp_avg_sq"], OptimState8bit)


def test_fsdp_units_are_whole_blocks_with_the_block_an_adapter_holds():
    # MagicMirrorBlock calls its CogVideoX block's layers itself: a unit of their own would stay sharded.
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
    from torch.distributed.fsdp.wrap import _recursive_wrap

    from mm_lightning.models.adapter import MagicMirrorBlock
    from mm_lightning.strategies import BlockUnits

    model = load_components(load_config("full"), text_encoder=False, vae=False).transformer
    units = []
    _recursive_wrap(
        model, BlockUnits(CogVideoXBlock, MagicMirrorBlock), lambda m, **_: units.append(m) or m, set(), set()
    )
    assert units == list(model.base.transformer_blocks)  # each adapted block and each plain one, nothing inside


# Two ZeRO-3 steps of the tiny model on the CPU (DeepSpeed's CPU accelerator, one process, gloo), in a process
# of their own: every parameter partitioned (no persistence threshold), gradient checkpointing on, the engine
# calling forward as Lightning's wrapper does; then one video sampled as the evaluation callback samples it.
# The face encoder's own parameters are tied to the transformer as MagicMirrorModule.on_train_start does under
# Lightning's deepspeed_stage_3 (which itself needs CUDA).
_ZERO3_STEPS = """
import torch, deepspeed
from mm_lightning.config import load_config
from mm_lightning.module import MagicMirrorModule, gather_face_encoder_with_transformer
from tests.test_dtype_policy import _image_batch

class Module(MagicMirrorModule):
    def forward(self, batch):
        return self.compute_loss(batch, generator=torch.Generator().manual_seed(0))["loss"]

deepspeed.init_distributed("gloo")
# As the 5B profile trains: the face encoder's own parameters (the learned face queries) trained, the backbone frozen.
overrides = ["model.train_face_encoder=true", "model.train_backbone=false", "trainer.gradient_checkpointing=true"]
cfg = load_config("full", overrides=["eval.enabled=false", "sampling.num_inference_steps=2", *overrides])
module = Module(cfg, stage="image_pretrain")
assert module.transformer.face_encoder.face_queries.requires_grad
trained = [p for p in module.parameters() if p.requires_grad]
zero3 = {"stage": 3, "stage3_param_persistence_threshold": 0}
config = {"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True, "zero_optimization": zero3}
engine, *_ = deepspeed.initialize(
    model=module, optimizer=torch.optim.AdamW(trained, lr=1e-3), model_parameters=trained, config=config
)
gather_face_encoder_with_transformer(module.transformer)
batch = _image_batch(cfg)
for step in range(2):
    loss = engine(batch)
    engine.backward(loss)
    engine.step()
    print("loss", loss.item())
# A checkpoint as Lightning's DeepSpeedStrategy writes it, without the frozen weights as fit's strategy sets it:
# --resume finds it, and Lightning's converter joins it into one file of the trained weights (save_stage_weights).
import sys
from pathlib import Path
from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
from mm_lightning.checkpoints import checkpoint_step, latest_checkpoint
out = Path(sys.argv[1])
engine.save_checkpoint(out / "step=2.ckpt", client_state={"global_step": 2}, tag="checkpoint",
                       exclude_frozen_parameters=True)
found = latest_checkpoint(out)
print("resume", found.name, checkpoint_step(found))
convert_zero_checkpoint_to_fp32_state_dict(out / "step=2.ckpt", out / "final.ckpt")
weights = torch.load(out / "final.ckpt", weights_only=False)["state_dict"]
names = [n for n, p in module.named_parameters() if p.requires_grad]
with deepspeed.zero.GatheredParameters(trained):
    same = all(torch.equal(weights[n], p.detach().float()) for n, p in module.named_parameters() if p.requires_grad)
print("joined", len(names), len(weights), same)
# Evaluation samples through the module's own pipeline while every weight stays partitioned: each module's
# forward gathers its parameters, as it does in training.
from mm_lightning.pipeline import sample_video
size = module.transformer.face_encoder.clip_image_size
frames = sample_video(module.sampling_pipeline(), cfg, "a man smiling", torch.rand(1, 3, size, size),
                      batch["id_embedding"][0].float(), seed=0)
print("frames", *frames.shape, frames.std())
"""


@pytest.mark.slow  # DeepSpeed builds its CPU communication op on first use: about a minute
def test_zero3_trains_then_checkpoints_then_samples(tmp_path):
    pytest.importorskip("deepspeed")
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", _ZERO3_STEPS, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines() if line.strip()}
    assert lines["resume"] == ["step=2.ckpt", "2"]  # the shard folder, and its step
    trained, joined, same = lines["joined"]
    assert int(trained) > 0 and int(joined) <= 2 * int(trained) and same == "True"  # the trained weights only
    losses = [float(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("loss ")]
    assert len(losses) == 2 and all(map(math.isfinite, losses))
    assert losses[1] != losses[0]  # same batch, noise and timesteps: the weights moved
    s = load_config("full").sampling
    shape = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("frames ")]
    assert shape and shape[0][:4] == [str(s.num_frames), str(s.height), str(s.width), "3"]
    assert float(shape[0][4]) > 0  # not a blank video


# FSDP on the CPU (torch's own, gloo, two processes; Lightning's FSDP needs CUDA), wrapped as trainer.strategy=fsdp
# has Lightning wrap the module under bf16-mixed (FSDP's bf16 mixed precision, autocast around the forwards): the
# evaluation callback's reliance probe at the start of training and after each step, training going on between
# (the shards untouched), one video sampled as the evaluation samples it, then a checkpoint saved and loaded into
# a fresh FSDP module as --resume loads it.
_FSDP_EVALUATION = """
import sys
from types import SimpleNamespace
from unittest import mock
import torch, torch.distributed as dist
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
from mm_lightning.callbacks.evaluation import MLflowEvaluationCallback
from mm_lightning.config import load_config
from mm_lightning.models.adapter import MagicMirrorBlock
from mm_lightning.module import MagicMirrorModule
from mm_lightning.pipeline import sample_video
from mm_lightning.strategies import BlockUnits, evaluation_weights
from tests.test_dtype_policy import _image_batch

class Module(MagicMirrorModule):
    def forward(self, batch):  # Lightning's FSDP runs training_step inside the root's forward
        return self.compute_loss(batch, generator=torch.Generator().manual_seed(0))["loss"]

dist.init_process_group("gloo")
rank = dist.get_rank()
def say(*words):  # one file per rank: the ranks' prints would interleave in one pipe
    with open(f"{sys.argv[1]}/rank{rank}.txt", "a") as out:
        print(rank, *words, file=out)
probe = ["eval.reliance_identities=2", "eval.reliance_timesteps=2", "eval.reliance_every_n_steps=1"]
cfg = load_config("full", overrides=[*probe, "sampling.num_inference_steps=2"])
module = Module(cfg, stage="image_pretrain")
# Lightning's FSDP under bf16-mixed: FSDP's mixed precision (bf16 compute copies) and autocast around forwards.
bf16 = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16)
def wrap(module):
    return FullyShardedDataParallel(module, auto_wrap_policy=BlockUnits(CogVideoXBlock, MagicMirrorBlock),
                                    use_orig_params=True, device_id=torch.device("cpu"), mixed_precision=bf16)
def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)
model = wrap(module)
say("vae_conv_dims", module.vae.encoder.conv_in.conv.weight.dim())  # a flat shard outside a forward
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
experiment = mock.Mock()  # the MLflow client

def broadcast(obj):  # as Lightning's strategy broadcasts rank 0's run id
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

trainer = SimpleNamespace(
    strategy=SimpleNamespace(model=model, broadcast=broadcast),
    logger=SimpleNamespace(run_id="run", experiment=experiment),
    precision_plugin=SimpleNamespace(forward_context=autocast),
    callbacks=[], global_step=0, max_steps=3, is_global_zero=rank == 0,
)
callback = MLflowEvaluationCallback(cfg, "image_pretrain")
callback.on_train_start(trainer, module)
batch = _image_batch(cfg)
for step in range(2):
    with autocast():
        loss = model(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    trainer.global_step = step + 1
    callback.on_train_batch_end(trainer, module, None, batch, 0)
    say("loss", loss.item())
for call in experiment.log_metric.call_args_list:
    run, key, value = call.args
    if key.endswith("/id_reliance"):
        say("id_reliance", call.kwargs["step"], value)
size = module.transformer.face_encoder.clip_image_size
with evaluation_weights(model), autocast():
    # The root unit's weights whole, a block unit's still a flat shard: blocks gather one at a time in their forward.
    block = module.transformer.base.transformer_blocks[0].block
    say("inside", module.vae.encoder.conv_in.conv.weight.dim(), block.attn1.to_q.weight.dim())
    frames = sample_video(module.sampling_pipeline(), cfg, "a man smiling", torch.rand(1, 3, size, size),
                          batch["id_embedding"][0].float(), seed=0)
say("frames", *frames.shape, frames.std())

# A checkpoint as Lightning's FSDPStrategy writes it: FSDP's full state dict (on rank 0), then the module's hook.
# Lightning also offloads it to the CPU, which crashes FSDP on a CPU device; that is all it does differently.
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
def full_state_dict(model, rank0_only):
    return FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                                    FullStateDictConfig(rank0_only=rank0_only))
def trained_weights(module):
    return {f"transformer.{n.replace('_fsdp_wrapped_module.', '')}": p.detach().clone()
            for n, p in module.transformer.named_parameters() if p.requires_grad}
def whole_weights(model):  # every unit gathered at once, as Lightning's FSDP checkpoints see the weights
    return FullyShardedDataParallel.summon_full_params(model, writeback=False)
with whole_weights(model):
    expected = trained_weights(module)
with full_state_dict(model, rank0_only=True):
    checkpoint = {"state_dict": model.state_dict()}
module.trainer = SimpleNamespace(callbacks=[])  # the hook looks for an EMA callback
module.on_save_checkpoint(checkpoint)
path = sys.argv[1] + "/step=2.ckpt"
if rank == 0:
    saved = checkpoint["state_dict"]
    same = saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    say("saved", len(saved), same)
    torch.save(checkpoint, path)
dist.barrier()
# --resume: every rank loads the file into a fresh FSDP module, as FSDPStrategy.load_checkpoint does.
fresh = Module(cfg, stage="image_pretrain")
fresh_model = wrap(fresh)
with full_state_dict(fresh_model, rank0_only=False):
    fresh_model.load_state_dict(torch.load(path, weights_only=False)["state_dict"], strict=fresh.strict_loading)
with whole_weights(fresh_model):
    resumed = trained_weights(fresh)
say("resumed", all(torch.equal(resumed[k], expected[k]) for k in expected))
dist.destroy_process_group()
"""


@pytest.mark.slow  # two processes, each building the tiny model twice, training, probing and sampling: about 45 s
def test_fsdp_evaluation_and_checkpoints_see_whole_weights(tmp_path):
    # Evaluation gathers the root unit and lets each block gather itself (86.8 GiB per H200 when it gathered all).
    # On four H200s the reliance probe at the start of training failed on the VAE's flat shard (h200x4/fsdp_4gpu_*);
    # the checkpoint hook took the trained weights from the parameters, which under FSDP are each rank's shards.
    cfg = load_config("full")
    write_random_weights(cfg)  # once, here: the two ranks would race to write them
    demo_eval_set(cfg.cache_dir)
    script = tmp_path / "fsdp_evaluation.py"
    script.write_text(_FSDP_EVALUATION)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    done = subprocess.run(
        [*launch, str(script), str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = [line.split() for rank in (0, 1) for line in (tmp_path / f"rank{rank}.txt").read_text().splitlines()]
    assert ["0", "vae_conv_dims", "1"] in lines and ["1", "vae_conv_dims", "1"] in lines  # sharded, as on the GPUs
    losses = [float(line[2]) for line in lines if line[1] == "loss"]
    assert len(losses) == 4 and all(map(math.isfinite, losses))
    reliance = {int(line[2]): float(line[3]) for line in lines if line[:2] == ["0", "id_reliance"]}
    assert sorted(reliance) == [0, 1, 2] and reliance[0] == 0.0  # every step; exactly 0 on the fresh model
    assert all(map(math.isfinite, reliance.values()))
    s = cfg.sampling
    assert ["0", "inside", "5", "1"] in lines and ["1", "inside", "5", "1"] in lines  # the VAE whole, a block not
    frames = [line[2:] for line in lines if line[1] == "frames"]
    assert len(frames) == 2 and all(f[:4] == [str(s.num_frames), str(s.height), str(s.width), "3"] for f in frames)
    assert all(float(f[4]) > 0 for f in frames)  # not a blank video
    saved = next(line[2:] for line in lines if line[:2] == ["0", "saved"])
    assert int(saved[0]) > 0 and saved[1] == "True"  # every trained weight, whole, and nothing frozen
    assert ["0", "resumed", "True"] in lines and ["1", "resumed", "True"] in lines


def test_ema_is_refused_where_the_weights_are_sharded():
    # Lightning's weight averaging copies whole parameters: under ZeRO-3, as under FSDP, a rank holds a shard.
    with pytest.raises(ConfigError, match="trainer.strategy=deepspeed_stage_3"):
        load_config("full", overrides=["ema.enabled=true", "trainer.strategy=deepspeed_stage_3"])
    load_config("full", overrides=["ema.enabled=true", "trainer.strategy=deepspeed_stage_2"])


def test_compiled_blocks_are_refused_under_zero3():
    zero3 = ["trainer.strategy=deepspeed_stage_3"]
    with pytest.raises(ConfigError, match="add trainer.compile_blocks=false"):
        load_config("full", profile="cogvideox-5b", overrides=[*zero3, "trainer.compile_blocks=true"])
    load_config("full", profile="cogvideox-5b", overrides=zero3)


def test_compiled_training_on_a_gpu_needs_the_triton_kernels_before_torch_2_14(monkeypatch):
    # torch 2.11's compiled CUDA backward gave the adapter wrong gradients, except where the adapter's Triton
    # kernels compute them (tests/test_model.py's CUDA test).
    from mm_lightning.models import adapter
    from mm_lightning.strategies import refuse_compiled_training_on_cuda

    def check(*overrides):
        refuse_compiled_training_on_cuda(load_config("full", profile="cogvideox-5b", overrides=list(overrides)))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    monkeypatch.setattr(adapter, "fused_face_key_merge", None)  # a CPU build of torch: no Triton
    with pytest.raises(ConfigError, match="wrong adapter gradients on CUDA with torch 2.11.0.*Triton is not installed"):
        check("trainer.compile_blocks=true")
    check()  # eager
    check("trainer.compile_blocks=true", "trainer.accelerator=cpu")
    monkeypatch.setattr(adapter, "fused_face_key_merge", lambda *args: None)  # CUDA torch ships Triton
    check("trainer.compile_blocks=true")
    for override, reason in [
        ("trainer.precision=32-true", "trainer.precision=32-true"),
        ("trainer.deterministic=true", "trainer.deterministic=true"),
        ("model.train_backbone=true", "model.train_backbone=true"),
    ]:
        with pytest.raises(ConfigError, match=reason):
            check("trainer.compile_blocks=true", override)
    monkeypatch.setattr(adapter, "fused_face_key_merge", None)
    monkeypatch.setattr(torch, "__version__", "2.14.0")
    check("trainer.compile_blocks=true")


@pytest.mark.parametrize("name", ["deepspeed_stage_2", "fsdp"])
def test_sharded_strategies_without_gpus_are_a_config_error(name):
    # Lightning refuses DeepSpeed and FSDP on the CPU, with a traceback once fit has started: one line, before.
    from mm_lightning.strategies import strategy

    with pytest.raises(ConfigError, match=f"trainer.strategy={name} needs CUDA GPUs"):
        strategy(load_config("full", overrides=[f"trainer.strategy={name}", "trainer.accelerator=cpu"]))
