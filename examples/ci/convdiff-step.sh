#!/usr/bin/env bash
# A CI step: run convdiff on a model, leave a JUnit report (and the JSON report) for the CI
# system to publish, and fail the step when a layer diverges (a difference beyond its rigorous
# rounding bound: that holds on any CPU for a correct model), errors, or goes over an optional
# ULP budget.
#
# Usage:  convdiff-step.sh MODEL [INPUT]
#         (without INPUT: a seeded standard-normal input of the model's shape)
#
# Environment, all optional:
#   CONVDIFF_MAX_ULP   global raw ULP budget per layer (default: none, the bound decides);
#                      raw ULP figures depend on the CPU, so pin a budget to one machine
#   CONVDIFF_ARGS      more convdiff options, split on whitespace, never glob-expanded, e.g.
#                      "--max-ulp block*=16 --quantile 0.999 --no-onednn"
#   CONVDIFF_OUT       directory for report.xml and report.json (default convdiff-report)
#   CONVDIFF_INSTALL   pip requirement to install first (e.g. "convdiff==0.2.0", a wheel, a
#                      git URL); empty: use the convdiff already on PATH
#
# Exit status is convdiff's: 0 every layer passed, 1 a layer is divergent, error or over budget,
# 2 the run could not be made (bad model, input or option; one "Error:" line says why).
set -euo pipefail

if [ "$#" -lt 1 ] || [ "$#" -gt 2 ]; then
  echo "usage: $0 MODEL [INPUT]" >&2
  exit 2
fi
model=$1
input=${2:-}
out=${CONVDIFF_OUT:-convdiff-report}
mkdir -p "$out"

if [ -n "${CONVDIFF_INSTALL:-}" ]; then
  python -m pip install --quiet "$CONVDIFF_INSTALL"
fi

cmd=(convdiff "$model")
if [ -n "$input" ]; then
  cmd+=("$input")
else
  cmd+=(--random-input --seed 0)
fi
if [ -n "${CONVDIFF_MAX_ULP:-}" ]; then
  cmd+=(--max-ulp "$CONVDIFF_MAX_ULP")
fi
cmd+=(--json "$out/report.json" --junit "$out/report.xml")
# Split CONVDIFF_ARGS on whitespace; `read -a` does no pathname expansion, so a pattern such as
# block*=16 reaches convdiff as written.
extra=()
read -r -a extra <<< "${CONVDIFF_ARGS:-}" || true
cmd+=(${extra[@]+"${extra[@]}"})

echo "+ ${cmd[*]}"
status=0
"${cmd[@]}" || status=$?

case "$status" in
  0) echo "convdiff: every layer passed; JUnit report in $out/report.xml" ;;
  1) echo "convdiff: a layer is divergent, error or over budget; see $out/report.xml" >&2 ;;
  *) echo "convdiff: the run could not be made (exit $status); see the Error: line above" >&2 ;;
esac
exit "$status"
