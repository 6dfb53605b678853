#!/usr/bin/env bash
# Install what the tests need, then run the whole suite (unit, property, integration on real
# Kafka + Redis + Prometheus + Chromium started by the fixtures, and the chaos suite's CI size).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
export PYTHONUNBUFFERED=1
exec .venv/bin/pytest -q -p no:cacheprovider --durations=15 "$@" tests
