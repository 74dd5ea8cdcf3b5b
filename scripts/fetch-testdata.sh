#!/usr/bin/env bash
# Real photographs for the tests: the 3840x2400 JPEG and PNG wallpapers of
# Debian's ukui-wallpapers package, unpacked into .cache/testdata.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cache/testdata
pkg=ukui-wallpapers
version=20.04.3-1.1
mkdir -p "$dest"
cd "$dest"
if ! ls ${pkg}_*.deb >/dev/null 2>&1; then
  if ! apt-get download "$pkg=$version" 2>/dev/null; then
    apt-get update -qq
    apt-get download "$pkg=$version"
  fi
fi
dpkg -x ${pkg}_*.deb .
ls usr/share/backgrounds/*.jpg usr/share/backgrounds/*.png >/dev/null
