#!/usr/bin/env bash
# Delete the TPU VM (or the queued resource with QUEUED=1). Checkpoints in a bucket survive.
source "$(dirname "$0")/env.sh"
if [[ "${QUEUED:-0}" == 1 ]]; then
  "$GCLOUD" compute tpus queued-resources delete "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --force --quiet
else
  "$GCLOUD" compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --quiet
fi
