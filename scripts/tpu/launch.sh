#!/usr/bin/env bash
# Start `opd-jax train` with the same config on every worker (JAX's multi-controller runtime finds the
# other workers by itself on TPU VMs). Output goes to ~/opd_jax/train.log on each worker; process 0
# writes metrics; every process writes its checkpoint shards, so train.out_dir must be one folder that all
# workers see (a shared disk, Filestore or a gcsfuse-mounted bucket).
#   ZONE=us-east5-a bash scripts/tpu/launch.sh configs/recipes/qwen3_1p7b_from_8b.yaml [key=value ...]
#   RESUME=1 ... continues from the newest checkpoint
source "$(dirname "$0")/env.sh"
config=${1:?usage: launch.sh CONFIG [key.sub=value ...]}
shift
resume=""
if [[ "${RESUME:-0}" == 1 ]]; then resume="--resume"; fi
args="$*"
on_all_workers "cd ~/opd_jax && . .venv/bin/activate && \
  nohup opd-jax train --config $config $resume $args > ~/opd_jax/train.log 2>&1 &"
echo "started on all workers; follow with: $GCLOUD compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=0 --command 'tail -f ~/opd_jax/train.log'"
