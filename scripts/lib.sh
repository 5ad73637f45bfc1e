# Shared by scripts/test.sh and scripts/demo.sh: install what is missing, nothing else.
# Written for root on Debian 12 with the Rust toolchain (rustup) already present.

APT_UPDATED=${APT_UPDATED:-}

# ensure_cmd <command> <debian package>: installs the package when the command is missing.
ensure_cmd() {
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "missing '$1': install the Debian package '$2' (needs root)" >&2
    return 1
  fi
  if [ -z "$APT_UPDATED" ]; then
    apt-get update -qq
    APT_UPDATED=1
  fi
  echo "installing $2 (for $1)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >/dev/null
}

# ensure_cargo_tool <command> <crate>: installs a cargo subcommand from crates.io when missing.
ensure_cargo_tool() {
  command -v "$1" >/dev/null 2>&1 && return 0
  echo "installing $2 from crates.io"
  cargo install --locked --quiet "$2"
}

# ensure_venv: the project-local Python venv (.venv) with the pinned tools of tests/helm.
ensure_venv() {
  local req=tests/helm/requirements.txt
  if [ ! -x .venv/bin/python ]; then
    ensure_cmd python3 python3
    python3 -m venv .venv 2>/dev/null || { ensure_cmd python3 python3-venv && rm -rf .venv && python3 -m venv .venv; }
  fi
  if [ -f "$req" ] && ! cmp -s "$req" .venv/.requirements 2>/dev/null; then
    .venv/bin/pip install --quiet --disable-pip-version-check -r "$req"
    cp "$req" .venv/.requirements
  fi
}
