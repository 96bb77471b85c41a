#!/usr/bin/env bash
# One command: install with test extras, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# Reference for the Gemma 4 assistant tests: transformers 5.23 cannot build
# Gemma4AssistantForCausalLM, 5.10.4 can. It goes into its own directory (with the
# tokenizers/hub/kernels versions it imports with) and reuses the venv's torch. kernels:
# newer transformers pull kernels 0.19, whose API 5.10.4 fails to import with (0.12.3 works).
ref=${MTPDRAFT_TF_REFERENCE:-$PWD/.tf-reference}
if [ ! -d "$ref/transformers" ] || [ ! -d "$ref/kernels" ]; then
  .venv/bin/python -m pip install -q --no-deps --target "$ref" transformers==5.10.4 tokenizers==0.22.2 \
    "huggingface_hub>=1.5.0,<2.0" kernels==0.12.3
fi
export MTPDRAFT_TF_REFERENCE=$ref
exec .venv/bin/python -m pytest -q "$@"
