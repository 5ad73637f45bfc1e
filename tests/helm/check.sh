#!/usr/bin/env bash
# The chart, manifest, alert and dashboard checks (`make helm`). Installs what it needs when
# missing: the pinned PyPI packages into .venv, and Debian's prometheus (promtool + server).
# Closes with `N passed, M failed, K skipped`; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/helm/venv.sh
trackgate_venv
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing Debian's prometheus (promtool and server)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "promtool/prometheus missing: install Debian's prometheus package" >&2
  fi
fi
exec .venv/bin/python tests/helm/check.py "$@"
