# Sourced by tests/helm/check.sh and deploy/generate.sh: makes the project-local .venv with the
# pinned packages of tests/helm/requirements.txt, installing only what is missing.
# (scripts/lib.sh's ensure_venv keeps the same stamp file, so the two never fight.)
trackgate_venv() {
  local req=tests/helm/requirements.txt
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv || {
      echo "python3 -m venv failed: install Debian's python3-venv" >&2
      return 1
    }
  fi
  if ! cmp -s "$req" .venv/.requirements 2>/dev/null; then
    echo "installing $req into .venv" >&2
    .venv/bin/pip install --quiet --disable-pip-version-check -r "$req" >&2
    cp "$req" .venv/.requirements
  fi
}
