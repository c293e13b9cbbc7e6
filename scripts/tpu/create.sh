#!/usr/bin/env bash
# Create a TPU VM (or, with QUEUED=1, a queued resource that starts when capacity frees; SPOT=1 for spot).
#   ZONE=us-east5-a ACCELERATOR=v5p-32 bash scripts/tpu/create.sh
source "$(dirname "$0")/env.sh"
extra=()
if [[ "${SPOT:-0}" == 1 ]]; then extra+=(--spot); fi
if [[ "${QUEUED:-0}" == 1 ]]; then
  "$GCLOUD" compute tpus queued-resources create "$TPU_NAME" --node-id "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
    --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" "${extra[@]}"
  echo "queued; watch it with: $GCLOUD compute tpus queued-resources describe $TPU_NAME --zone $ZONE"
else
  "$GCLOUD" compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
    --accelerator-type "$ACCELERATOR" --version "$RUNTIME" "${extra[@]}"
fi
