#!/usr/bin/env bash
# Installs the Debian packages among PKG... that are not installed yet (with
# sudo when not root), saying so under LABEL; nothing when all are there.
# A package named PKG:ARCH (e.g. libfmt-dev:arm64) adds that architecture to
# dpkg first if it is foreign and missing.
#
# usage: scripts/install-debs.sh LABEL PKG...
set -euo pipefail

label=$1
shift
missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]})) || exit 0
echo "kvq: installing $label: ${missing[*]}"
sudo_cmd=""
[ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
for p in "${missing[@]}"; do
  [[ $p == *:* ]] || continue
  arch=${p##*:}
  [[ $arch == "$(dpkg --print-architecture)" ]] && continue
  dpkg --print-foreign-architectures | grep -qx "$arch" || $sudo_cmd dpkg --add-architecture "$arch"
done
$sudo_cmd apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
