#!/usr/bin/env bash
# Copy this checkout to every worker and install it with the `tpu` extra in a venv (~/opd_jax/.venv).
#   ZONE=us-east5-a bash scripts/tpu/install.sh
source "$(dirname "$0")/env.sh"
root="$(cd "$(dirname "$0")/../.." && pwd)"
tarball="$(mktemp -d)/opd_jax.tar.gz"
git -C "$root" archive --format=tar.gz -o "$tarball" HEAD  # committed files only: what CI tested
"$GCLOUD" compute tpus tpu-vm scp "$tarball" "$TPU_NAME":~/opd_jax.tar.gz --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all
on_all_workers "rm -rf ~/opd_jax && mkdir -p ~/opd_jax && tar -xzf ~/opd_jax.tar.gz -C ~/opd_jax && \
  cd ~/opd_jax && python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip && \
  pip install -q -e '.[tpu]' && python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
