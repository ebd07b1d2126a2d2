#!/usr/bin/env bash
# `make demo`: run the agent on the example manifests and show what it serves.
set -euo pipefail
cd "$(dirname "$0")/.."
KPR=.venv/bin/kpr
CFG=examples/demo.yaml
LOG=/run/kpr-demo/agent.log
mkdir -p /run/kpr-demo

$KPR check-config --config $CFG
$KPR run --config $CFG 2>"$LOG" &
agent=$!
trap 'kill -TERM $agent 2>/dev/null; wait $agent 2>/dev/null || true' EXIT

for _ in $(seq 1 100); do
  if $KPR status --config $CFG --json 2>/dev/null | grep -q '"ready": true'; then break; fi
  kill -0 $agent 2>/dev/null || { echo "the agent exited; its log:"; cat "$LOG"; exit 1; }
  sleep 0.1
done

echo
echo "== kpr plugins"
$KPR plugins --config $CFG
echo
echo "== kpr status"
$KPR status --config $CFG || true
echo
echo "== kpr service list"
$KPR service list --config $CFG
echo
echo "(agent log: $LOG)"
