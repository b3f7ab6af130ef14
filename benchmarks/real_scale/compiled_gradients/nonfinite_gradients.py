"""`python benchmarks/real_scale/compiled_gradients/nonfinite_gradients.py fit <fit's arguments>`: `fit`, with
each trainable parameter's local gradient checked for non-finite values (a tensor hook, before any reduction),
per rank and micro-batch, and the timestep and loss of each micro-batch printed. For can.2.bias the non-finite
channels are named as (modulation vector, channel): vectors 0-5 are the attention's video shift, scale, gate and
text shift, scale, gate; 6-11 the feed-forward's. DS_OVERLAP=0/1 sets DeepSpeed's overlap_comm.
A diagnostic that patches MagicMirrorModule's hooks in this process (Lightning starts the other ranks with the
same command line, so they are patched too); the logs beside it are its output."""

import os
import sys

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from mm_lightning import cli
from mm_lightning import module as mm

orig_start = mm.MagicMirrorModule.on_train_start
orig_ts = mm.MagicMirrorModule.sample_timesteps
orig_cl = mm.MagicMirrorModule.compute_loss


def on_train_start(self):
    orig_start(self)
    self._diag = {}
    for name, p in self.transformer.named_parameters():
        if p.requires_grad:

            def hook(g, name=name):
                finite = torch.isfinite(g)
                bad = (~finite).sum().item()
                if bad and name.endswith("can.2.bias"):
                    idx = (~finite).nonzero().flatten().tolist()
                    print(
                        f"[rank {self.global_rank}] step {self.global_step} {name}: channels {idx} (of 12 x 3072: "
                        f"{[(i // 3072, i % 3072) for i in idx]}) values {g[~finite].tolist()}",
                        flush=True,
                    )
                amax = g.detach().float().abs().max().item() if bad == 0 else float("nan")
                prev = self._diag.get(name, (0, 0.0))
                self._diag[name] = (prev[0] + bad, max(prev[1], amax))
                return g

            p.register_hook(hook)
    hooked = sum(p.requires_grad for p in self.transformer.parameters())
    print(f"[rank {self.global_rank}] hooks on {hooked} params", flush=True)


def sample_timesteps(self, *a, **k):
    t = orig_ts(self, *a, **k)
    self._diag_t = t.tolist()
    return t


def compute_loss(self, batch, generator=None):
    losses = orig_cl(self, batch, generator)
    print(
        f"[rank {self.global_rank}] step {self.global_step} t={self._diag_t} loss={losses['loss'].item():.4g} "
        f"caption={batch['caption'][0][:30]!r}",
        flush=True,
    )
    return losses


def on_before_optimizer_step(self, optimizer):
    bad = {n: v for n, v in self._diag.items() if v[0]}
    top = sorted(self._diag.items(), key=lambda kv: -kv[1][1])[:5]
    largest = [(n, f"{v[1]:.3g}") for n, v in top]
    print(
        f"[rank {self.global_rank}] step {self.global_step}: {len(self._diag)} params had grads, "
        f"{len(bad)} non-finite: {list(bad.items())[:12]}; largest |g|: {largest}",
        flush=True,
    )
    self._diag = {}


mm.MagicMirrorModule.on_train_start = on_train_start
mm.MagicMirrorModule.sample_timesteps = sample_timesteps
mm.MagicMirrorModule.compute_loss = compute_loss
mm.MagicMirrorModule.on_before_optimizer_step = on_before_optimizer_step
if "DS_OVERLAP" in os.environ:
    ds_init = DeepSpeedStrategy.__init__

    def init(self, *a, **k):
        ds_init(self, *a, overlap_comm=os.environ["DS_OVERLAP"] == "1", **k)
        print("DeepSpeedStrategy zero config:", self.config.get("zero_optimization"), flush=True)

    DeepSpeedStrategy.__init__ = init
sys.exit(cli.main(sys.argv[1:]))
