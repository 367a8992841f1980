#!/usr/bin/env bash
# Installs what the test suite needs beyond the Python packages. Idempotent: run it
# as often as you like; each section installs only what is missing.
set -euo pipefail

# --- Prometheus (tests/test_prometheus_e2e.py runs a real server) -------------------
if ! command -v prometheus >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends prometheus
fi
prometheus --version 2>&1 | head -n 1

# --- Vulkan: the loader and Mesa's lavapipe, a software Vulkan driver, so the GPU backend's
# kernels and whole-model tests run on machines without a GPU ---------------------------
if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || ! ldconfig -p | grep -q libvulkan.so.1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends mesa-vulkan-drivers libvulkan1
fi
ls /usr/share/vulkan/icd.d/
