#!/usr/bin/env bash
# Regenerates everything in charts/ and deploy/ that is derived from another file. Called by
# `make generate` after `trackgate crd > crds/trackerportpools.trackgate.dev.yaml`; CI then fails
# when `git diff` shows a change.
#
# Sources of truth and their copies:
#   crds/trackerportpools.trackgate.dev.yaml -> charts/trackgate/crds/   (Helm installs, never deletes)
#   charts/trackgate/rules/trackgate.rules.yaml -> deploy/alerts/        (plain Prometheus rule_files)
#   charts/trackgate/dashboards/trackgate.json  -> deploy/dashboards/    (import into Grafana by hand)
#   charts/trackgate (defaults)                 -> deploy/rendered/trackgate.yaml (helm template)
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/helm/venv.sh
trackgate_venv

copy() { mkdir -p "$(dirname "$2")"; cp "$1" "$2"; }
copy crds/trackerportpools.trackgate.dev.yaml charts/trackgate/crds/trackerportpools.trackgate.dev.yaml
copy charts/trackgate/rules/trackgate.rules.yaml deploy/alerts/trackgate.rules.yaml
copy charts/trackgate/dashboards/trackgate.json deploy/dashboards/trackgate.json
.venv/bin/python tests/helm/render.py --out deploy/rendered/trackgate.yaml
echo "generated: charts/trackgate/crds deploy/alerts deploy/dashboards deploy/rendered"
