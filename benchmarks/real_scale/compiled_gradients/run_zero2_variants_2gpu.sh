# From the repository root on a 2-GPU machine (the device tool), with the wheels installed as in benchmarks/real_scale.sh;
# OUT names the folder for the logs. Written when trainer.compile_blocks was the 5B profile's default (blocks compiled).
# 2 GPUs: ZeRO-2 non-finite CAN gradients: overlap_comm off (blocks compiled), then blocks eager (overlap_comm on).
set -o pipefail
T0=$(date +%s)
export RUNS=/tmp/mm_runs SNAP=/tmp/snap5b MLFLOW_TRACKING_URI=sqlite:////tmp/mm_mlflow.db
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
bash benchmarks/real_scale.sh snapshot > /dev/null 2>&1 || { echo snapshot failed; tail -20 $OUT/snapshot.log; exit 1; }
echo "snapshot done $(( $(date +%s) - T0 )) s"
OV=$(python -c "from pathlib import Path; from mm_lightning.commands.snapshot import snapshot_overrides as o; print(' '.join(o(Path('$SNAP'))))")
COMMON="--profile cogvideox-5b $OV faces.backend=insightface curriculum.order=[video_finetune] eval.enabled=false loss.identity_weight=0 trainer.devices=2 trainer.strategy=deepspeed_stage_2 curriculum.stages.video_finetune.max_steps=3 trainer.checkpoint_every_n_steps=1000"
REPO=$PWD
mkdir -p /tmp/dz && cd /tmp/dz
one() {  # name, env, extra overrides: until both ranks reported 2 optimizer steps (8 micro-batches each)
  log=$OUT/$1.log
  (env $2 setsid python $REPO/benchmarks/real_scale/compiled_gradients/nonfinite_gradients.py fit $COMMON output_dir=$RUNS/$1 $3 2>&1 | tr '\r' '\n' \
    | grep --line-buffered -v -E "Writing model shards|Loading weights|it/s\]$|^Training|^stage video" > $log) &
  for i in $(seq 1 60); do sleep 5; [ "$(grep -c 'params had grads' $log)" -ge 16 ] && break; done
  pkill -9 -f nonfinite_gradients.py; sleep 3
  echo "== $1 ($2 $3) at $(( $(date +%s) - T0 )) s"
  grep -E "params had grads|OVERFLOW|zero config|Error" $log | sed -E 's/: \[\(.*//' | head -24
  grep "can.2.bias: channels" $log | head -4 | cut -c1-500
}
one zero2_no_overlap "DS_OVERLAP=0" ""
one zero2_eager "DS_OVERLAP=1" "trainer.compile_blocks=false"
