#!/usr/bin/env bash
# The nightly loop: score tonight's images, write the morning report, and queue images for a person to label.
#
#   jobs/nightly_loop.sh MODEL_DIR INPUT SCORES WORK
#
#   MODEL_DIR  the model artifact (runs/<name>/model)
#   INPUT      tonight's images: a folder, glob or manifest, local, s3:// or gs://
#   SCORES     the scores folder (local, s3:// or gs://), the same every night
#   WORK       a local folder; each night gets WORK/<date>/ with score.json, report/ and review/
#
# Exit codes: 0 fine; 3 the report raised an alarm (drift or a defect-rate jump: the review set is still written, so
# the morning has images to look at); anything else a failed step (1 a user error, one line on stderr). cron mails a
# job's output when it exits non-zero; a Kubernetes Job fails and alerts. See docs/nightly.md.
set -uo pipefail

if [ $# -ne 4 ]; then
    echo "usage: $0 MODEL_DIR INPUT SCORES WORK" >&2
    exit 2
fi
model=$1 input=$2 scores=$3 work=$4
night="$work/$(date -u +%Y-%m-%d)"
mkdir -p "$night" || exit 1

raydefect score --model "$model" --input "$input" --out "$scores" --json "$night/score.json" || exit $?

raydefect scores report "$scores" --out "$night/report" --reference "$model"
report=$?
if [ "$report" -ne 0 ] && [ "$report" -ne 3 ]; then
    exit "$report"
fi

raydefect review "$scores" --out "$night/review" --n 200 --reference "$model" || exit $?
exit "$report"
