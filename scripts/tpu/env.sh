# Settings shared by the TPU scripts; override any of them in the environment.
#   TPU_NAME     name of the TPU VM / queued resource        (default opd-jax)
#   ZONE         e.g. us-east5-a                              (required)
#   PROJECT      GCP project                                   (default: gcloud's configured project)
#   ACCELERATOR  e.g. v5p-32, v6e-16, v4-32                    (default v5p-32)
#   RUNTIME      TPU software version                          (default v2-alpha-tpuv5)
set -euo pipefail
TPU_NAME=${TPU_NAME:-opd-jax}
ZONE=${ZONE:?set ZONE, for example ZONE=us-east5-a}
ACCELERATOR=${ACCELERATOR:-v5p-32}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
GCLOUD=${GCLOUD:-gcloud}
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project "$PROJECT"); fi

# run a command on every worker of the TPU VM
on_all_workers() {
  "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command "$1"
}
