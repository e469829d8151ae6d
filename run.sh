#!/usr/bin/env bash
# registryproxy: one entry point for running, debugging and testing the proxy.
#
#   ./run.sh [--workers N] [--stock] [mitmproxy args...]
#                                 run the proxy with config.yaml (or $REGISTRYPROXY_CONFIG)
#   ./run.sh web [mitmweb args]   the same under mitmweb, to debug pulls interactively
#   ./run.sh test [pytest args]   install what the tests need and run the whole suite
#   ./run.sh keygen               print a new secret key
#   ./run.sh capability           print a new capability prefix and the config lines to use it
#   ./run.sh link KEY --expires DURATION [--note TEXT]
#                                 mint a share link for the mapping KEY (expiring, revocable; docs/links.md)
#   ./run.sh demo [--web]         offline demo: a local registry, the proxy, pulls through both mappings
#   ./run.sh bench [--quick|--wan|--cache|--limits]
#                                 the benchmark (see README, "Performance"; --wan, --cache, --limits: one section)
#   ./run.sh screenshot [--out F] refresh the mitmweb screenshot in the README (headless Chromium)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv="$here/.venv"

# Find a Python >= 3.12: python3.13 / python3.12 / python3 on PATH first, then pyenv's versions.
find_python() {
  local c v
  for c in python3.13 python3.12 python3; do
    if command -v "$c" >/dev/null 2>&1 \
      && "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then
      command -v "$c"
      return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])(\.|$)' | sort -V -r); do
      c="$(pyenv root)/versions/$v/bin/python3"
      if [ -x "$c" ] && "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
        echo "$c"
        return 0
      fi
    done
  fi
  echo "run.sh: no Python >= 3.12 found (mitmproxy 12 needs it): install python3.12 or newer" >&2
  return 1
}

# Create .venv and install a requirements file into it, once per change of that file.
ensure_venv() {
  local req="$1" stamp
  if [ ! -x "$venv/bin/python" ]; then
    "$(find_python)" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  fi
  stamp="$venv/.installed-$(cat "$req" "$here/requirements.txt" | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    (cd "$(dirname "$req")" && "$venv/bin/python" -m pip install -q -r "$(basename "$req")")
    touch "$stamp"
  fi
}

# Debian packages the end-to-end tests use (real registry, real clients; Swift and memcached: a real S3 store).
test_packages=(docker-registry skopeo apache2-utils containerd docker.io podman haproxy chromium fonts-noto-color-emoji tinyproxy-bin iproute2 redis-server mmdebstrap
  swift swift-proxy swift-account swift-container swift-object python3-swift memcached)

# Extra Debian packages the benchmark uses (nginx and haproxy as references, wrk as load generator).
bench_packages=(nginx haproxy wrk curl)

install_test_packages() {
  local missing=() p
  for p in "${test_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "run.sh: the tests need these Debian packages: ${missing[*]} (run as root or install them)" >&2
    return 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ./run.sh [--workers N] [--stock] [mitmproxy args]: the proxy, by default under the lean master.
run_proxy() {
  local own=() workers=1
  while [ $# -gt 0 ]; do
    case "$1" in
      --workers) own+=("$1" "${2:-}"); workers="${2:-1}"; shift 2 || shift ;;
      --workers=*) own+=("$1"); workers="${1#--workers=}"; shift ;;
      --stock) own+=("$1"); shift ;;
      *) break ;;
    esac
  done
  ensure_venv "$here/requirements.txt"
  if [ "$workers" != 1 ] && ! command -v haproxy >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy >/dev/null
  fi
  exec env PYTHONPATH="$here/addon" "$venv/bin/python" -m regproxy.run.cli run "${own[@]}" -- "$@"
}

cmd="${1:-run}"
case "$cmd" in
  test)
    shift
    install_test_packages
    ensure_venv "$here/tests/requirements.txt"
    cd "$here"
    "$venv/bin/ruff" check --quiet --line-length 120 addon tests
    "$venv/bin/ruff" format --check --quiet --line-length 120 addon tests
    MYPYPATH="$here/addon:$here/tests" "$venv/bin/mypy" --strict --python-version 3.12 --no-error-summary \
      --untyped-calls-exclude mitmproxy --explicit-package-bases addon tests
    exec "$venv/bin/python" -m pytest -c "$here/tests/pytest.ini" --rootdir "$here" "$@" tests
    ;;
  bench)
    shift
    test_packages+=("${bench_packages[@]}")
    install_test_packages
    ensure_venv "$here/tests/requirements.txt"
    ensure_venv "$here/tests/bench/requirements.txt"
    cd "$here"
    exec env PYTHONPATH="$here/addon:$here/tests" "$venv/bin/python" tests/bench/bench.py "$@"
    ;;
  screenshot)
    shift
    install_test_packages
    ensure_venv "$here/tests/requirements.txt"
    cd "$here"
    exec env PYTHONPATH="$here/addon:$here/tests" "$venv/bin/python" tests/screenshot/shoot.py "$@"
    ;;
  web)
    shift
    ensure_venv "$here/requirements.txt"
    exec env PYTHONPATH="$here/addon" "$venv/bin/python" -m regproxy.run.cli run --web -- "$@"
    ;;
  demo)
    shift
    ensure_venv "$here/requirements.txt"
    exec env PYTHONPATH="$here/addon" "$venv/bin/python" -m regproxy.demo "$@"
    ;;
  keygen | capability | link)
    shift
    ensure_venv "$here/requirements.txt"
    exec env PYTHONPATH="$here/addon" "$venv/bin/python" -m regproxy.run.cli "$cmd" "$@"
    ;;
  run | -*)
    if [ $# -gt 0 ] && [ "$1" = run ]; then shift; fi
    run_proxy "$@"
    ;;
  *)
    echo "run.sh: unknown command '$cmd' (use: run, web, demo, bench, screenshot, test, keygen, capability)" >&2
    exit 2
    ;;
esac
