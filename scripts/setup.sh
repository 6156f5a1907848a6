#!/usr/bin/env bash
# Creates .venv and installs exod into it (editable). --test adds the test
# tools: Python packages, and the system tools the tests use when they are
# missing (iproute2 for network namespaces and token buckets, curl to query
# daemons inside them, chromium for the dashboard tests), through apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "exod needs Python 3.11 or newer ($("$python" --version))" >&2; exit 1; }
extras=""
if [ "${1:-}" = "--test" ]; then
  extras="[test]"
  missing=()
  command -v ip >/dev/null || missing+=(iproute2)
  command -v tc >/dev/null || missing+=(iproute2)
  command -v curl >/dev/null || missing+=(curl)
  command -v chromium >/dev/null || missing+=(chromium)
  if [ ${#missing[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
      echo "the tests need ${missing[*]}: install them (as root, with apt-get) and run this again" >&2; exit 1
    fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extras}"
