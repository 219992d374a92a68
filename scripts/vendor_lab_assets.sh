#!/usr/bin/env bash
# Vendor the /lab page's chart library (uPlot) into the Python package, by pinned version,
# from the npm registry: its minified browser build (a classic script defining the global uPlot), its stylesheet and its licence. The files
# are committed (service/http/lab_assets/vendor/), so nothing is fetched or built at install
# time; run this script only to move to another version (change UPLOT_VERSION and the
# integrity below together, then rerun tests/test_lab_page.py).
set -euo pipefail

UPLOT_VERSION=1.6.32
# sha512 of the npm tarball, as the registry publishes it (npm view uplot@VERSION dist.integrity)
UPLOT_INTEGRITY="sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw=="

root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/service/http/lab_assets/vendor"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cd "$work"
tarball=$(npm pack "uplot@$UPLOT_VERSION" --silent)
got="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
if [ "$got" != "$UPLOT_INTEGRITY" ]; then
    echo "uplot@$UPLOT_VERSION: integrity $got, expected $UPLOT_INTEGRITY" >&2
    exit 1
fi
tar -xzf "$tarball"
mkdir -p "$dest"
cp package/dist/uPlot.iife.min.js "$dest/uPlot.iife.min.js"
cp package/dist/uPlot.min.css "$dest/uPlot.min.css"
cp package/LICENSE "$dest/uPlot.LICENSE"
echo "uplot $UPLOT_VERSION $UPLOT_INTEGRITY" > "$dest/VERSION"
ls -l "$dest"
