#!/bin/bash
# The real-scale runs of issue 13, exactly as sent to the GPU machines, from the repository root:
#   bash benchmarks/real_scale.sh fit      # 1 GPU: random 5B snapshot, fit both stages + checkpoint + kill + --resume
#   bash benchmarks/real_scale.sh evalfit  # 1 GPU: fit with evaluation (one video per stage, the stand-in face pack)
#   bash benchmarks/real_scale.sh step     # 1 GPU: fit's step (with and without identity loss), bench on the same GPU
#   bash benchmarks/real_scale.sh sample   # 1 GPU: one 49x480x720 video, MagicMirror vs the bare pipeline
#                                          # (COMPILE=1: both with their blocks under torch.compile)
#   bash benchmarks/real_scale.sh optim    # 1 GPU: fit's step with 8-bit AdamW (torchao; carry its wheel)
#   bash benchmarks/real_scale.sh generate # 1 GPU: generate's memory modes, MODES="none model sequential int8"
#   bash benchmarks/real_scale.sh multi    # fit's step under MULTI="ddp 1,ddp 2,fsdp 2,deepspeed_stage_2 2"
#                                          # (4 GPUs: MULTI="deepspeed_stage_3 4,deepspeed_stage_2 4,fsdp 4")
#   bash benchmarks/real_scale.sh sequence # every GPU (or DEVICES), STRATEGY=deepspeed_stage_2 (default), _3, ddp or
#                                          # fsdp: fit's video stage + checkpoint + kill + --resume + evaluation
#                                          # (PHASE=first|resume: one half, for two calls on one warm machine when
#                                          # both do not fit one call's 10 minutes)
#   bash benchmarks/real_scale.sh snapshot # only the snapshot (before running modes side by side, one per GPU)
# PROFILE=tiny runs the same commands on CPU-sized models (the dry run). Logs and JSON go to $OUT.
# `python -P`: the installed mm_lightning, not the repository folder's (installing maps callbacks/ and evaluation/
# into the package; from the repository root the bare folder would shadow it).
# The GPU image lacks diffusers, MLflow, insightface, ffmpeg and more: `bash benchmarks/gpu_wheels.sh download` here,
# carry .gpu_wheels/core, and `source benchmarks/gpu_wheels.sh install` there first. Use
# EXTRA=faces.backend=insightface for evalfit, step, sample and sequence (the reliance probe at the start of training
# writes the demo evaluation set's clips through ffmpeg and scores them).
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:////tmp/mm_mlflow.db}
PROFILE=${PROFILE:-cogvideox-5b}
OUT=${OUT:-/tmp/real_scale_out}
SNAP=${SNAP:-/tmp/snap5b}
# 20 GB checkpoints (trainable weights + AdamW) beside a 22 GB snapshot: in RAM when /dev/shm has room
RUNS=${RUNS:-$( [ "$(df --output=avail -B1G /dev/shm 2>/dev/null | tail -1)" -gt 40 ] 2>/dev/null && echo /dev/shm/mm_runs || echo /tmp/mm_runs)}
DEVICE=$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
EXTRA=${EXTRA:-}  # e.g. faces.backend=insightface for the tiny dry run
mkdir -p "$OUT"
quiet() { grep --line-buffered -v -E "Writing model shards|Loading weights|it/s\]$"; }

snapshot() {
  [ -f "$SNAP/data/.mm_latents/video_finetune/index.json" ] && return
  python -P -m mm_lightning snapshot --profile "$PROFILE" \
    --out "$SNAP" --device "$DEVICE" --samples 8 $EXTRA 2>&1 | quiet | tee "$OUT/snapshot.log"
}
overrides() { python -c "from pathlib import Path; from mm_lightning.commands.snapshot import snapshot_overrides as o; print(' '.join(o(Path('$SNAP'))))"; }

# The newest run under $1: its finished stages, then each checkpoint (a file, or a DeepSpeed folder of shards)
# with its step and size, and what final.ckpt holds.
list_checkpoints() {
  python - "$1" <<'EOF'
import json, sys, torch
from pathlib import Path
from mm_lightning.checkpoints import checkpoint_step
run = sorted(p for p in Path(sys.argv[1]).glob("*") if (p / "run.json").exists())[-1]
print("run.json:", json.loads((run / "run.json").read_text())["finished_stages"])
for f in sorted(run.glob("checkpoints/*/*.ckpt")):
    size = sum(p.stat().st_size for p in f.rglob("*") if p.is_file()) if f.is_dir() else f.stat().st_size
    kind = " (DeepSpeed shards)" if f.is_dir() else ""
    print(f"{f.relative_to(run)}{kind}: global_step {checkpoint_step(f)}, {size / 2**30:.1f} GiB")
    if f.name == "final.ckpt":
        final = torch.load(f, map_location="cpu", weights_only=False, mmap=True)
        print(f"  {len(final['state_dict'])} tensors, stage {final['mm_stage']}")
EOF
}

# What the newest MLflow run whose run folder is under $1 logged per step: the loss, and the gradient checks
# (grad_norm, or under DeepSpeed the steps it skipped for non-finite gradients). A resumed run keeps its start time,
# so the newest run overall may be another strategy's.
list_step_metrics() {
  python - "$1" <<'EOF'
import sys
from pathlib import Path
import mlflow
from mm_lightning.tracking import TAG_RUN_DIR
client = mlflow.MlflowClient()
runs = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time DESC"])
runs_dir = Path(sys.argv[1]).resolve()
run = next(r for r in runs if runs_dir in Path(r.data.tags.get(TAG_RUN_DIR, "/")).parents)
for key in sorted(k for k in run.data.metrics if k.startswith("train/")):
    history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
    print(f"{key}: " + ", ".join(f"step {m.step}: {m.value:.4g}" for m in history))
EOF
}

# Every 5 s into $1 until the script ends: the host's used memory and, on GPUs, each GPU's (nvidia-smi: what the
# allocator holds, its cache included).
sample_memory() {
  while true; do
    echo "$(date -u +%T) host_used_mib $(free -m | awk '/Mem:/{print $3}')" \
      "$(command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | tr '\n' ' ')"
    sleep 5
  done > "$1" 2>&1 < /dev/null &
  trap "kill $! 2> /dev/null" EXIT
}

case "$1" in
snapshot) snapshot ;;
fit)
  snapshot || exit 1
  FIT="python -P -m mm_lightning fit --profile $PROFILE $(overrides) $EXTRA eval.enabled=false loss.identity_weight=0
       output_dir=$RUNS curriculum.stages.image_pretrain.max_steps=1 trainer.checkpoint_every_n_steps=2"
  df -h /tmp /dev/shm | tee "$OUT/fit.log"
  # A real interruption: kill -9 once the video stage's step-2 checkpoint is in place, then --resume.
  # The finished image stage's 20 GB last.ckpt goes as soon as the video stage starts (final.ckpt stays).
  $FIT curriculum.stages.video_finetune.max_steps=4 >> "$OUT/fit.log" 2>&1 &
  pid=$!
  until ls "$RUNS"/*/checkpoints/video_finetune/last.ckpt > /dev/null 2>&1 || ! kill -0 $pid 2> /dev/null; do
    ls -d "$RUNS"/*/checkpoints/video_finetune > /dev/null 2>&1 && rm -f "$RUNS"/*/checkpoints/image_pretrain/last.ckpt
    sleep 1
  done
  sleep 3
  kill -9 $pid && echo "=== killed fit (pid $pid) after the video stage's step-2 checkpoint" | tee -a "$OUT/fit.log"
  sleep 2
  rm -f "$RUNS"/*/checkpoints/image_pretrain/last.ckpt "$RUNS"/*/checkpoints/image_pretrain/step=*.ckpt  # stage done: final.ckpt
  $FIT curriculum.stages.video_finetune.max_steps=3 --resume 2>&1 | quiet | grep --line-buffered -v "^  " | tee "$OUT/fit_resume.log" || exit 1
  list_checkpoints "$RUNS" | tee -a "$OUT/fit_resume.log"
  ;;
evalfit)
  snapshot || exit 1
  # Both stages one optimizer step each; each stage ends with an evaluation pass: one 49x480x720 video with the
  # configured sampling steps, scored through the snapshot's stand-in face pack (its face metrics mean nothing),
  # and the identity-reliance probe.
  # STAGES=video_finetune evaluates once (about 5 minutes at 5B with the snapshot: fits one 10-minute device call).
  python -P -m mm_lightning fit --profile "$PROFILE" $(overrides) $EXTRA output_dir="$RUNS/evalfit" eval.max_videos=1 \
    curriculum.order="[${STAGES:-image_pretrain,video_finetune}]" \
    curriculum.stages.image_pretrain.max_steps=1 curriculum.stages.video_finetune.max_steps=1 loss.identity_weight=0 \
    2>&1 | quiet | tee "$OUT/fit_eval.log"
  ;;
step)
  snapshot || exit 1
  # Eager, as the bench it is compared with
  python benchmarks/fit_step.py --profile "$PROFILE" --snapshot "$SNAP" --identity --steps 3 --warmup 2 \
    --name fit_step_1gpu --out-dir "$OUT" $EXTRA trainer.compile_blocks=false 2>&1 | quiet | tee "$OUT/fit_step_1gpu.log" || exit 1
  python -P -m mm_lightning bench --profile "$PROFILE" --stage video --steps 3 --warmup 1 --device "$DEVICE" \
    --out-dir "$OUT" 2>&1 | quiet | tee "$OUT/bench.log"
  ;;
sample)
  snapshot || exit 1
  name=sample_1gpu${COMPILE:+_compiled}
  python benchmarks/fit_step.py --profile "$PROFILE" --snapshot "$SNAP" --steps 0 --sample --name $name \
    --out-dir "$OUT" $EXTRA ${COMPILE:+sampling.compile_blocks=true} 2>&1 | quiet | tee "$OUT/$name.log"
  ;;
optim)
  snapshot || exit 1
  python benchmarks/fit_step.py --profile "$PROFILE" --snapshot "$SNAP" --steps 3 --warmup 2 \
    --name fit_step_1gpu_adamw8bit --out-dir "$OUT" $EXTRA optim.name=adamw8bit trainer.compile_blocks=false 2>&1 | quiet \
    | tee "$OUT/fit_step_1gpu_adamw8bit.log"
  ;;
generate)
  snapshot || exit 1
  for mode in ${MODES:-none model sequential int8}; do  # int8: --offload none --int8
    [ "$mode" = int8 ] && args="--offload none --int8" || args="--offload $mode"
    echo "=== generate_memory $args ${STEPS:+sampling.num_inference_steps=$STEPS}" | tee -a "$OUT/generate.log"
    python benchmarks/generate_memory.py --profile "$PROFILE" --snapshot "$SNAP" $args --out-dir "$OUT" $EXTRA \
      ${STEPS:+sampling.num_inference_steps=$STEPS} 2>&1 | quiet >> "$OUT/generate.log"
    grep -E '"seconds"|"peak_allocated_gib"|Error' "$OUT/generate.log" | tail -n 2
  done
  ;;
multi)
  snapshot || exit 1
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  LOG="$OUT/multi_$(python -c 'import torch; print(torch.cuda.device_count())')gpu.log"
  IFS=, read -ra list <<< "${MULTI:-ddp 1,ddp 2,fsdp 2,deepspeed_stage_2 2}"  # 4 GPUs: ddp 4,fsdp 4,...
  for run in "${list[@]}"; do
    set -- $run
    echo "=== fit_step strategy=$1 devices=$2 $(date -u +%T)" | tee -a "$LOG"
    # ZeRO-3 partitions the 5B weights at start-up: give each run 4 minutes (RUN_TIMEOUT seconds)
    timeout -k 20 "${RUN_TIMEOUT:-240}" python benchmarks/fit_step.py --profile "$PROFILE" --snapshot "$SNAP" \
      --steps 3 --warmup 2 --name "fit_step_${1}_${2}gpu" --out-dir "$OUT" $EXTRA \
      trainer.strategy="$1" trainer.devices="$2" trainer.compile_blocks=false \
      2>&1 | quiet >> "$LOG"
    echo "=== done $(date -u +%T)" >> "$LOG"
    grep -E "s/step|Error" "$LOG" | tail -n 2
  done
  ;;
sequence)
  snapshot || exit 1
  # fit under STRATEGY on every GPU (or DEVICES). The video stage is killed (-9, the whole process group) once its
  # step-1 checkpoint is complete; --resume continues from it to step 2, evaluates (one video of EVAL_STEPS sampling
  # steps; under ZeRO-3 with every weight still partitioned), writes the step-2 checkpoint and the stage's final.ckpt
  # (under DeepSpeed joined from its shards). One checkpoint kept: at 5B each is 20-24 GiB, and in /dev/shm they
  # share the host's memory with the join of the stage's weights. Under FSDP a 20 GiB checkpoint takes about 2
  # minutes and the resume runs past one call's 10 minutes: PHASE=resume once more finishes the stage from its
  # step-2 checkpoint. Memory every 5 s (host, GPUs) goes to $OUT/<strategy>_<N>gpu_<phase>_memory.txt.
  STRATEGY=${STRATEGY:-deepspeed_stage_2} PHASE=${PHASE:-both}
  N=${DEVICES:-$(python -c 'import torch; print(torch.cuda.device_count())')}
  NAME=${STRATEGY}_${N}gpu
  sample_memory "$OUT/${NAME}_${PHASE}_memory.txt"
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  # From /tmp: Lightning starts the other ranks with `python -m mm_lightning`, without -P (see above).
  ARGS="--profile $PROFILE $(overrides) $EXTRA output_dir=$RUNS/$NAME trainer.strategy=$STRATEGY trainer.devices=$N
        curriculum.order=[video_finetune] trainer.checkpoint_every_n_steps=1 trainer.keep_checkpoints=1
        loss.identity_weight=0 eval.max_videos=1 sampling.num_inference_steps=${EVAL_STEPS:-5}"
  # The step-1 checkpoint is complete once its name is there: fit writes `step=1.ckpt.partial` and renames it
  # (AtomicCheckpointIO); DeepSpeed writes a folder of shards and its `latest` file once every shard is saved.
  # The kill comes 5 s later at 5B: Lightning hands a step's metrics to the logger only after its checkpoint
  # callbacks, and step 0's loss and gpu_peak_gib belong in MLflow (the tiny profile's steps are too short to wait:
  # its run would finish first).
  case $STRATEGY in deepspeed*) ready=step=1.ckpt/latest ;; *) ready=step=1.ckpt ;; esac
  settle=$([ "$PROFILE" = tiny ] && echo 0 || echo 5)
  written() { ls -d "$RUNS/$NAME"/*/checkpoints/video_finetune/$ready > /dev/null 2>&1; }
  running() { [ "$(ps -o stat= -p "$1" 2> /dev/null | cut -c1)" != Z ] && kill -0 "$1" 2> /dev/null; }  # not a zombie
  if [ "$PHASE" != resume ]; then
    (cd /tmp && exec setsid python -m mm_lightning fit $ARGS curriculum.stages.video_finetune.max_steps=3) \
      > "$OUT/${NAME}_fit.log" 2>&1 &
    pid=$!  # setsid's session: the leader and the ranks it starts
    until written || ! running $pid; do sleep 0.05; done
    written || { kill -9 -- -$pid 2> /dev/null; echo "=== fit ended before its step-1 checkpoint" | tee -a "$OUT/${NAME}_fit.log"; exit 1; }
    sleep $settle
    kill -9 -- -$pid && echo "=== killed fit's process group $pid after the step-1 checkpoint" | tee -a "$OUT/${NAME}_fit.log"
    sleep 2
  fi
  [ "$PHASE" = first ] && exit 0
  (cd /tmp && python -m mm_lightning fit $ARGS curriculum.stages.video_finetune.max_steps=2 --resume) 2>&1 | quiet \
    | grep --line-buffered -v "^  " | tee "$OUT/${NAME}_resume.log" || exit 1
  list_checkpoints "$RUNS/$NAME" | tee -a "$OUT/${NAME}_resume.log"
  # PHASE=resume: the first run's log is the earlier call's, not in this $OUT
  echo "DeepSpeed's skip messages (OVERFLOW) in $OUT's logs: $(cat "$OUT"/${NAME}_{fit,resume}.log 2> /dev/null | grep -c OVERFLOW)" \
    | tee -a "$OUT/${NAME}_resume.log"
  list_step_metrics "$RUNS/$NAME" | tee -a "$OUT/${NAME}_resume.log"
  ;;
*) echo "usage: $0 snapshot|fit|evalfit|step|sample|optim|generate|multi|sequence"; exit 2 ;;
esac
