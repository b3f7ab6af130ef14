# From the repository root on a 2-GPU machine (the device tool), with the wheels installed as in benchmarks/real_scale.sh;
# OUT names the folder for the logs. Written when trainer.compile_blocks was the 5B profile's default (blocks compiled).
# 2 GPUs: ZeRO-2 fit of the video stage with per-rank non-finite-gradient hooks, final.ckpt joined and read back;
# then FSDP with compiled blocks.
set -o pipefail
T0=$(date +%s)
export RUNS=/tmp/mm_runs SNAP=/tmp/snap5b MLFLOW_TRACKING_URI=sqlite:////tmp/mm_mlflow.db
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
bash benchmarks/real_scale.sh snapshot > /dev/null 2>&1 || { echo snapshot failed; tail -20 $OUT/snapshot.log; exit 1; }
echo "snapshot done $(( $(date +%s) - T0 )) s"
OV=$(python -c "from pathlib import Path; from mm_lightning.commands.snapshot import snapshot_overrides as o; print(' '.join(o(Path('$SNAP'))))")
COMMON="--profile cogvideox-5b $OV faces.backend=insightface curriculum.order=[video_finetune] eval.enabled=false loss.identity_weight=0 trainer.devices=2"
REPO=$PWD
mkdir -p /tmp/dz && cd /tmp/dz
(while sleep 15; do echo "$(date +%T) $(nvidia-smi --query-gpu=memory.used --format=csv,noheader | tr '\n' ' ') shm $(df -h --output=used /dev/shm | tail -1) tmp $(df -h --output=used /tmp | tail -1)"; done) > $OUT/gpu_mem_a.txt &
timeout -k 10 $(( 420 - ($(date +%s) - T0) )) python $REPO/benchmarks/real_scale/compiled_gradients/nonfinite_gradients.py fit $COMMON output_dir=$RUNS/zero2 \
  trainer.strategy=deepspeed_stage_2 curriculum.stages.video_finetune.max_steps=3 trainer.checkpoint_every_n_steps=1000 \
  2>&1 | grep --line-buffered -v -E "Writing model shards|Loading weights|it/s\]$" | tr '\r' '\n' | grep -v "^Training\|^stage video" > $OUT/zero2_diag_2gpu.log
echo "zero2 rc=$? at $(( $(date +%s) - T0 )) s"
grep -E "non-finite|OVERFLOW|Error|error|final" $OUT/zero2_diag_2gpu.log | cut -c1-600 | head -30
cd $REPO && source <(sed -n '/^list_checkpoints()/,/^}/p' benchmarks/real_scale.sh) && (time list_checkpoints $RUNS/zero2) 2>&1 | tee -a $OUT/zero2_diag_2gpu.log
rm -rf $RUNS/zero2
cd /tmp/dz
left=$(( 580 - ($(date +%s) - T0) ))
echo "fsdp with $left s left"
[ $left -gt 60 ] && timeout -k 10 $left python -m mm_lightning fit $COMMON output_dir=$RUNS/fsdp trainer.strategy=fsdp \
  curriculum.stages.video_finetune.max_steps=2 trainer.checkpoint_every_n_steps=1000 2>&1 \
  | grep --line-buffered -v -E "Writing model shards|Loading weights|it/s\]$" | tr '\r' '\n' | grep -v "^Training" > $OUT/fsdp_compiled_2gpu.log
echo "fsdp rc=$? at $(( $(date +%s) - T0 )) s"; tail -5 $OUT/fsdp_compiled_2gpu.log | cut -c1-400
