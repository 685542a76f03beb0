#!/usr/bin/env bash
# Install the Debian packages the tests use when they are missing. As root it runs
# apt-get; otherwise it only reports what is missing (those tests then say why they skip).
set -euo pipefail

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v useradd >/dev/null 2>&1 || need+=(passwd)
command -v tmux >/dev/null 2>&1 || need+=(tmux)
command -v zsh >/dev/null 2>&1 || need+=(zsh)  # checks the generated zsh completion
# A real sshd (and ssh) for `xpuctl run --pool` across nodes (tests/test_run_pool.py).
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
# Building and checking the Debian package (tests/test_deb.py, `make deb`).
deb_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }
for pkg in dpkg-dev debhelper dh-virtualenv lintian build-essential python3-venv python3-dev man-db; do
  deb_installed "$pkg" || need+=("$pkg")
done

if [ ${#need[@]} -eq 0 ]; then
  echo "test dependencies: all present"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "test dependencies missing (not root, not installing): ${need[*]}"
  exit 0
fi
echo "installing test dependencies: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The tests start their own brokers; a packaged one left running is not needed.
