#!/usr/bin/env bash
# Build the xpu-agent Debian package (Debian 12, dh-virtualenv) from the working tree.
#
#   packaging/build-deb.sh [--lint] [OUTDIR]      (default OUTDIR: build/deb, git-ignored)
#
# The source tree is copied to OUTDIR/src — the files git tracks plus new files git does
# not ignore, so work in progress is packaged but .venv/, .run/ and caches are not — and
# packaging/debian becomes its debian/. The repository itself is never written to.
# Python dependencies come from PyPI through pip (honouring pip.conf and PIP_*).
# --lint runs lintian on the result and fails on any error or warning not overridden.
set -euo pipefail

lint=0
if [ "${1:-}" = "--lint" ]; then
  lint=1
  shift
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(realpath -m "${1:-$root/build/deb}")"
stage="$out/src"

missing=()
for tool in dpkg-buildpackage dh dh_virtualenv; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "$lint" = 1 ] && ! command -v lintian >/dev/null 2>&1; then missing+=(lintian); fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "build-deb: missing ${missing[*]}: as root run scripts/install-test-deps.sh" >&2
  exit 3
fi

rm -rf "$stage"
mkdir -p "$stage"
rm -f "$out"/xpu-agent_*.deb "$out"/xpu-agent_*.changes "$out"/xpu-agent_*.buildinfo
if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$root" && git ls-files -z --cached --others --exclude-standard) |
    while IFS= read -r -d '' f; do
      # Tracked files deleted in the working tree are not part of it any more.
      if [ -e "$root/$f" ]; then printf '%s\0' "$f"; fi
    done |
    tar -C "$root" --null -T - -cf - | tar -C "$stage" -xf -
else
  tar -C "$root" --exclude=./.git --exclude=./.venv --exclude=./.run --exclude=./build \
    -cf - . | tar -C "$stage" -xf -
fi
cp -r "$stage/packaging/debian" "$stage/debian"
chmod 0755 "$stage/debian/rules"

# Debian's python3 builds the venv: no pyenv shims or caller's virtualenv may leak in
# (dh_virtualenv refuses to run inside a virtualenv).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset VIRTUAL_ENV PYTHONPATH PYTHONHOME
export LC_ALL=C.UTF-8
start=$(date +%s)
(cd "$stage" && dpkg-buildpackage -b -us -uc -j"$(nproc)")
deb="$(ls "$out"/xpu-agent_*.deb)"
echo "build-deb: built $deb in $(($(date +%s) - start))s"

if [ "$lint" = 1 ]; then
  # The binary package only: the source here is a throw-away copy of the working tree.
  lintian --fail-on error,warning --display-info --suppress-tags-from-file /dev/null "$deb"
  echo "build-deb: lintian clean (overrides: packaging/debian/xpu-agent.lintian-overrides)"
fi
