#!/usr/bin/env bash
# Side-by-side gateway benchmark on loopback: nginx as a fake OpenAI upstream (CPU 0, with the load
# generator), each proxy under test pinned to CPU 1. Systems: direct (nginx itself), litellm (the LiteLLM
# proxy), minproxy (a 60-line aiohttp proxy: what plain Python reaches), synapse (this project's CLI).
#
# Run from the project root:
#   bench/harness/run.sh                                   full run (~30-60 min; LiteLLM is the slow part)
#   ANCHOR_DURATION=5 ANCHOR_ROUNDS=1 ANCHOR_CONNS=1,64 ANCHOR_PHASES=load,stream bench/harness/run.sh   quick
#   ANCHOR_SYSTEMS=direct,minproxy,synapse ...               leave LiteLLM out
# SYNAPSE_BIN (default .venv/bin/synapse) is started as: synapse serve --config litellm_config.yaml --host 127.0.0.1 --port 4005
# and must answer GET /health/ready. Knobs: the ANCHOR_* variables at the top of bench.py.
# Output: RESULTS.md in ANCHOR_OUT (default ./bench-results), raw JSON in ANCHOR_RUN_DIR (default /tmp/anchor-run).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
RUN_DIR=${ANCHOR_RUN_DIR:-/tmp/anchor-run}
OUT=${ANCHOR_OUT:-bench-results}
export ANCHOR_RUN_DIR=$RUN_DIR
mkdir -p "$RUN_DIR" "$OUT"
bash "$HERE/setup.sh"
python3 "$HERE/bench.py" 2>&1 | tee "$RUN_DIR.log"
python3 "$HERE/report.py" "$RUN_DIR/results.json" "$OUT/RESULTS.md"
echo "wrote $OUT/RESULTS.md (raw: $RUN_DIR/results.json)"
