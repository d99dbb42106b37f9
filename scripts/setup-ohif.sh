#!/usr/bin/env bash
# Fetch what tests/test_ohif.py needs: the OHIF Viewer's prebuilt dist/ (npm package @ohif/app,
# pinned) and puppeteer-core (tests/ohif/package-lock.json). No browser is downloaded: the test
# drives Debian's chromium (apt-get install chromium).
#
#   scripts/setup-ohif.sh          prints the path of OHIF's dist/ on its last line
#
# Both are cached and reused when present: dist/ under .cache/ohif/<version>/ (git-ignored;
# PACSBRIDGE_OHIF_CACHE moves it), node_modules/ under tests/ohif/.
set -euo pipefail
cd "$(dirname "$0")/.."

OHIF_VERSION=${OHIF_VERSION:-3.13.2}
cache=${PACSBRIDGE_OHIF_CACHE:-$PWD/.cache/ohif}
target="$cache/$OHIF_VERSION"

if ! command -v npm >/dev/null 2>&1; then
    echo "npm is missing: apt-get install -y nodejs npm" >&2
    exit 1
fi

if [ ! -f "$target/dist/index.html" ] || [ ! -f "$target/dist/app-config.js" ]; then
    echo "fetching @ohif/app@$OHIF_VERSION (prebuilt dist/, ~50 MB)" >&2
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
    mkdir -p "$work/unpacked"
    tar -xzf "$work"/ohif-app-"$OHIF_VERSION".tgz -C "$work/unpacked"
    if [ ! -f "$work/unpacked/package/dist/index.html" ]; then
        echo "@ohif/app@$OHIF_VERSION has no dist/index.html" >&2
        exit 1
    fi
    rm -rf "$target"
    mkdir -p "$cache"
    mv "$work/unpacked/package" "$target"
fi

lock=tests/ohif/package-lock.json
stamp=tests/ohif/node_modules/.installed-lock
if [ ! -f "$stamp" ] || ! cmp -s "$lock" "$stamp"; then
    echo "installing puppeteer-core (tests/ohif)" >&2
    (cd tests/ohif && PUPPETEER_SKIP_DOWNLOAD=1 npm ci --silent --no-audit --no-fund)
    cp "$lock" "$stamp"
fi

echo "$target/dist"
