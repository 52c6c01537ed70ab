#!/usr/bin/env bash
# One-shot project setup: Python venv, ResNet50 weights and (optionally) Flickr8k;
# with --test, also the test requirements and a headless Chromium for the tests.
# Safe to run again: every step checks what is already there and skips it.
# Run ./setup.sh --help for the options and the environment variables.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: ./setup.sh [--test] [--flickr8k] [--help]

Sets up this project for training (it can be run from any folder, and again at
any time; the second time it takes seconds). Nothing is installed system-wide:
  1. creates the Python virtual environment .venv/ if it is missing and installs
     requirements.txt into it (again only when requirements.txt has changed),
     with the torch build that fits the machine: where no NVIDIA GPU is found,
     the CPU-only build (about a tenth of the default build's size), else the
     default build with CUDA; it says which build it installed;
  2. downloads the ImageNet ResNet50 weights to
     resources/models/resnet50-0676ba61.pth and checks their sha256 (if the
     download fails, e.g. offline, it says so and carries on: the built-in demo
     needs no download);
  3. with --flickr8k, also downloads and unpacks the Flickr8k data set
     (about 1 GB) into resources/input/flickr8k/.

With --test it also sets up what the tests need:
  4. installs tests/requirements.txt (pytest, selenium, ruff) into .venv
     (again only when that file has changed);
  5. installs Debian's chromium and chromium-driver with apt-get when they are
     missing (as root, or with sudo that needs no password), for the tests of
     the results page in a real browser; if that fails, it says so and carries
     on (those tests then skip).

Options:
  --test       also install the test requirements and the tests' browser
  --flickr8k   also fetch Flickr8k into resources/input/flickr8k/
  -h, --help   show this help and exit

Environment variables:
  TORCH_BUILD          which torch build to install: auto (the default: CPU-only
                       where no NVIDIA GPU is found), cpu, or default (PyPI's,
                       with CUDA); to switch an existing .venv, delete .venv
  TORCH_INDEX_URL      where the CPU-only build comes from (default
                       https://download.pytorch.org/whl/cpu); where it cannot be
                       reached, the default build is installed, with a note
  RESNET50_URL         where to get the ResNet50 weights
                       (default https://download.pytorch.org/models/resnet50-0676ba61.pth)
  FLICKR8K_IMAGES_URL  Flickr8k image zip (default
                       https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip)
  FLICKR8K_TEXT_URL    Flickr8k caption/split zip (default
                       https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip)
  SETUP_SKIP_VENV=1    skip steps 1 and 4 (the Python packages)
  SETUP_SKIP_BROWSER=1 skip step 5 (the browser for the tests)

Flickr30k is not downloaded by this script: it has to be fetched by hand from
Kaggle (which needs an account) and unpacked into resources/input/flickr30k/.
EOF
}

say()  { printf 'setup: %s\n' "$*"; }
warn() { printf 'setup: WARNING: %s\n' "$*" >&2; }
die()  { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

WANT_FLICKR8K=0
WANT_TEST=0
while [ "$#" -gt 0 ]; do
    case "$1" in
        --flickr8k) WANT_FLICKR8K=1 ;;
        --test) WANT_TEST=1 ;;
        -h|--help) usage; exit 0 ;;
        *) printf 'setup: unknown option: %s\n\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

# Always work relative to the folder this script lives in.
cd "$(dirname "${BASH_SOURCE[0]}")"

RESNET50_URL="${RESNET50_URL:-https://download.pytorch.org/models/resnet50-0676ba61.pth}"
FLICKR8K_IMAGES_URL="${FLICKR8K_IMAGES_URL:-https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip}"
FLICKR8K_TEXT_URL="${FLICKR8K_TEXT_URL:-https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip}"

# curl: fail on HTTP errors, follow redirects, retry transient errors, give up on a
# transfer that stalls (under 1 kB/s for a minute). TLS certificates are always verified; the hash check comes on top.
CURL_OPTS=(-fL --retry 2 --connect-timeout 20 --speed-limit 1000 --speed-time 60)
if [ -t 2 ]; then CURL_OPTS+=(--progress-bar); else CURL_OPTS+=(-sS); fi

# ---------------------------------------------------------------- helpers

# A Python 3 interpreter for the zip handling (and for hashing as a fallback).
PY=""
find_python() {
    if [ -n "$PY" ]; then return 0; fi
    local c
    for c in python3 python .venv/bin/python; do
        if command -v "$c" >/dev/null 2>&1 \
                && "$c" -c 'import sys; sys.exit(sys.version_info[0] != 3)' >/dev/null 2>&1; then
            PY="$c"
            return 0
        fi
    done
    die "no Python 3 interpreter found (python3); please install Python 3"
}

# sha256 of a file, lowercase hex only.
sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum <"$1" | awk '{print $1}'
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 <"$1" | awk '{print $1}'
    else
        find_python
        "$PY" -c 'import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for b in iter(lambda: f.read(1 << 20), b""):
        h.update(b)
print(h.hexdigest())' "$1"
    fi
}

# zip_ok FILE: true when FILE is a complete zip whose members all pass their CRC.
zip_ok() {
    find_python
    "$PY" - "$1" <<'PYEOF'
import sys, zipfile
path = sys.argv[1]
try:
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
except Exception as e:  # BadZipFile, EOFError, OSError, zlib.error, ...
    print(f"setup: {path} is not a valid zip ({e})", file=sys.stderr)
    sys.exit(1)
if bad is not None:
    print(f"setup: {path} is corrupt (bad member {bad})", file=sys.stderr)
    sys.exit(1)
PYEOF
}

# zip_extract ZIP DEST (zipfile drops absolute paths and '..' components).
zip_extract() {
    find_python
    "$PY" - "$1" "$2" <<'PYEOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2])
PYEOF
}

# ---------------------------------------------------------------- 1. venv (and 4. test requirements)

# stale FILE STAMP: true when .venv/STAMP does not hold FILE's sha256, i.e. FILE changed since installed.
stale() {
    local have=""
    if [ -f ".venv/$2" ]; then have="$(cat ".venv/$2")"; fi
    [ "$(sha256_of "$1")" != "$have" ]
}

# pip_install FILE STAMP: installs FILE into .venv, then records its sha256 in .venv/STAMP.
pip_install() {
    local want
    want="$(sha256_of "$1")"
    say "installing $1 into .venv (this can take a while the first time)"
    .venv/bin/pip install -r "$1" \
        || die "'.venv/bin/pip install -r $1' failed (see the messages above; offline?)"
    printf '%s\n' "$want" >".venv/$2"
    say "Python packages of $1 installed"
}

TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"

# has_nvidia_gpu: true where an NVIDIA driver is loaded, i.e. a GPU the CUDA build could use.
# (SETUP_PROC_NVIDIA lets the tests point the check elsewhere.)
has_nvidia_gpu() {
    [ -d "${SETUP_PROC_NVIDIA:-/proc/driver/nvidia}" ] \
        || { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
}

# install_cpu_torch: where no NVIDIA GPU is found (or TORCH_BUILD=cpu), torch and torchvision as
# requirements.txt pins them, from the CPU-only index, before the rest: pip then takes them as
# given (torch==2.14.1 is met by the index's 2.14.1+cpu). Where that index cannot be reached,
# nothing: requirements.txt then brings the default build.
install_cpu_torch() {
    case "${TORCH_BUILD:-auto}" in
        default) say "TORCH_BUILD=default: torch's default build (with CUDA)"; return 0 ;;
        cpu) say "TORCH_BUILD=cpu: torch's CPU-only build" ;;
        auto)
            if has_nvidia_gpu; then
                say "an NVIDIA GPU is here: torch's default build (with CUDA); TORCH_BUILD=cpu for the CPU-only one"
                return 0
            fi
            say "no NVIDIA GPU found: torch's CPU-only build, a tenth of the size (TORCH_BUILD=default for the CUDA one)" ;;
        *) die "TORCH_BUILD=$TORCH_BUILD: must be auto, cpu or default" ;;
    esac
    local pins
    pins="$(grep -E '^(torch|torchvision)==' requirements.txt | awk '{print $1}' | xargs)" || true
    if [ -z "$pins" ]; then pins="torch torchvision"; fi
    # a quick look first: pip would retry an unreachable index for minutes
    if ! curl -fsS -o /dev/null --connect-timeout 5 --max-time 30 "$TORCH_INDEX_URL/torch/"; then
        warn "$TORCH_INDEX_URL cannot be reached (set TORCH_INDEX_URL to another index):"
        warn "  installing torch's default build instead, which is larger and works on a CPU too"
        return 0
    fi
    say "installing $pins from $TORCH_INDEX_URL"
    # shellcheck disable=SC2086  # the pins are words
    .venv/bin/pip install $pins --index-url "$TORCH_INDEX_URL" \
        || die "'.venv/bin/pip install $pins --index-url $TORCH_INDEX_URL' failed (see the messages above)"
}

# say_torch_build: which torch build .venv holds now.
say_torch_build() {
    local build
    build="$(.venv/bin/python -c 'import torch
print(torch.__version__, f"(CUDA {torch.version.cuda})" if torch.version.cuda else "(CPU-only)")' \
        2>/dev/null)" || true
    say "torch in .venv: ${build:-not importable}"
}

setup_venv() {
    if [ "${SETUP_SKIP_VENV:-0}" = "1" ]; then
        say "SETUP_SKIP_VENV=1: skipping the Python environment"
        return 0
    fi
    [ -f requirements.txt ] || die "requirements.txt not found in $(pwd)"
    if [ ! -x .venv/bin/python ]; then
        command -v python3 >/dev/null 2>&1 || die "python3 not found; please install Python 3"
        say "creating the virtual environment .venv"
        python3 -m venv .venv \
            || die "'python3 -m venv .venv' failed (on Debian/Ubuntu: apt install python3-venv)"
    fi
    if ! stale requirements.txt .requirements.sha256; then
        say "Python packages are up to date with requirements.txt"
        return 0
    fi
    install_cpu_torch
    pip_install requirements.txt .requirements.sha256
    say_torch_build
}

setup_test_requirements() {
    if [ "${SETUP_SKIP_VENV:-0}" = "1" ]; then
        say "SETUP_SKIP_VENV=1: skipping the test requirements"
        return 0
    fi
    [ -f tests/requirements.txt ] || die "tests/requirements.txt not found in $(pwd)"
    if ! stale tests/requirements.txt .test-requirements.sha256; then
        say "Python packages are up to date with tests/requirements.txt"
        return 0
    fi
    pip_install tests/requirements.txt .test-requirements.sha256
}

# ---------------------------------------------------------------- 2. weights

RESNET50_DIR="resources/models"
RESNET50_FILE="resnet50-0676ba61.pth"
RESNET50_SHA256="0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a"  # the whole file's

setup_resnet50() {
    local target="$RESNET50_DIR/$RESNET50_FILE"
    local part="$target.part"
    # The expected sha256 prefix is the hex tag in the file name (torchvision convention).
    local prefix="${RESNET50_FILE##*-}"
    prefix="${prefix%.pth}"
    local sum

    mkdir -p "$RESNET50_DIR"
    if [ -f "$target" ]; then
        sum="$(sha256_of "$target")"
        if [ "${sum:0:${#prefix}}" = "$prefix" ]; then
            say "ResNet50 weights already present and verified ($target)"
            return 0
        fi
        warn "$target is corrupt (sha256 $sum does not start with $prefix); removing it and downloading it again"
        rm -f "$target"
    fi

    rm -f "$part"
    if ! command -v curl >/dev/null 2>&1; then
        resnet50_failed "curl is not installed"
        return 0
    fi
    say "downloading ResNet50 weights from $RESNET50_URL"
    if ! curl "${CURL_OPTS[@]}" -o "$part" "$RESNET50_URL"; then
        rm -f "$part"
        resnet50_failed "curl could not fetch $RESNET50_URL"
        return 0
    fi
    if [ ! -f "$part" ]; then
        resnet50_failed "the download produced no file"
        return 0
    fi
    sum="$(sha256_of "$part")"
    if [ "${sum:0:${#prefix}}" != "$prefix" ]; then
        rm -f "$part"
        resnet50_failed "sha256 hash mismatch (got $sum, expected it to start with $prefix); the file was discarded"
        return 0
    fi
    mv -f "$part" "$target"
    say "ResNet50 weights downloaded and verified ($target)"
}

resnet50_failed() {
    warn "the ResNet50 weights download failed: $1"
    warn "  (you may be offline). Carrying on: the built-in demo needs no download."
    warn "  To fetch the weights by hand, download $RESNET50_URL"
    warn "  to $RESNET50_DIR/$RESNET50_FILE, e.g.:"
    warn "    curl -fL -o $RESNET50_DIR/$RESNET50_FILE $RESNET50_URL"
    warn "  (sha256 $RESNET50_SHA256). Without them, --encoder_weights=random checks the"
    warn "  pipeline on real data: a random frozen ResNet50, whose captions mean nothing."
}

# ---------------------------------------------------------------- 3. Flickr8k

INPUT_DIR="resources/input"
FLICKR8K_DIR="$INPUT_DIR/flickr8k"
FLICKR8K_TMP="$INPUT_DIR/flickr8k.tmp"
DOWNLOADS="$INPUT_DIR/.downloads"

# fetch_zip NAME URL ENVVAR: leaves a validated $DOWNLOADS/NAME.zip or exits non-zero.
fetch_zip() {
    local name="$1" url="$2" var="$3"
    local zip="$DOWNLOADS/$name.zip"
    local part="$zip.part"
    local rc

    if [ -f "$zip" ]; then
        if zip_ok "$zip"; then
            say "reusing the already downloaded $zip"
            return 0
        fi
        warn "$zip is incomplete or corrupt; downloading it again"
        rm -f "$zip"
    fi

    command -v curl >/dev/null 2>&1 || die "curl is not installed; it is needed to download $url"

    # A leftover .part from an interrupted run: try to resume it first.
    if [ -s "$part" ]; then
        if zip_ok "$part" 2>/dev/null; then
            # The previous run was stopped just after the last byte arrived.
            mv -f "$part" "$zip"
            say "the earlier download of $name.zip was already complete"
            return 0
        fi
        say "resuming the interrupted download of $name.zip from $url"
        rc=0
        curl "${CURL_OPTS[@]}" -C - -o "$part" "$url" || rc=$?
        if [ "$rc" -eq 0 ]; then
            if zip_ok "$part"; then
                mv -f "$part" "$zip"
                say "downloaded $zip"
                return 0
            fi
            rc=-1  # resumed onto a stale or foreign partial file
        fi
        case "$rc" in
            6|7|18|28|35|52|55|56)
                # Network trouble: keep the partial file so that the next run can resume.
                die "downloading $name.zip failed (curl exit code $rc; are you offline?).
    URL: $url (set $var to use another URL)
    Run ./setup.sh --flickr8k again to resume the download." ;;
        esac
        if [ "$rc" -eq -1 ]; then
            warn "the resumed $part is not a valid zip; starting that download again"
        else
            warn "could not resume $part (curl exit code $rc); starting that download again"
        fi
    fi

    rm -f "$part"
    say "downloading $name.zip from $url"
    rc=0
    curl "${CURL_OPTS[@]}" -o "$part" "$url" || rc=$?
    if [ "$rc" -ne 0 ]; then
        # Keep a non-empty partial file so that the next run can resume it.
        if [ -f "$part" ] && [ ! -s "$part" ]; then rm -f "$part"; fi
        die "downloading $name.zip failed (curl exit code $rc; are you offline, or is the URL wrong?).
    URL: $url
    Set $var to another URL (file:///path/to/$name.zip works too) and run ./setup.sh --flickr8k again."
    fi
    if [ ! -f "$part" ] || ! zip_ok "$part"; then
        rm -f "$part"
        die "the file downloaded from $url is not a valid zip.
    Set $var to another URL (file:///path/to/$name.zip works too) and run ./setup.sh --flickr8k again."
    fi
    mv -f "$part" "$zip"
    say "downloaded $zip"
}

setup_flickr8k() {
    if [ -d "$FLICKR8K_DIR" ]; then
        say "Flickr8k is already there ($FLICKR8K_DIR); skipping"
        if [ ! -d "$FLICKR8K_DIR/Flicker8k_Dataset" ] || [ ! -f "$FLICKR8K_DIR/Flickr8k.token.txt" ]; then
            warn "$FLICKR8K_DIR lacks Flicker8k_Dataset/ or Flickr8k.token.txt; delete that folder and run ./setup.sh --flickr8k again to re-fetch it"
        fi
        return 0
    fi

    mkdir -p "$DOWNLOADS"
    fetch_zip Flickr8k_Dataset "$FLICKR8K_IMAGES_URL" FLICKR8K_IMAGES_URL
    fetch_zip Flickr8k_text "$FLICKR8K_TEXT_URL" FLICKR8K_TEXT_URL

    say "unpacking Flickr8k into $FLICKR8K_TMP"
    rm -rf "$FLICKR8K_TMP"
    mkdir -p "$FLICKR8K_TMP/.images" "$FLICKR8K_TMP/.text"
    zip_extract "$DOWNLOADS/Flickr8k_Dataset.zip" "$FLICKR8K_TMP/.images" \
        || die "could not unpack $DOWNLOADS/Flickr8k_Dataset.zip"
    zip_extract "$DOWNLOADS/Flickr8k_text.zip" "$FLICKR8K_TMP/.text" \
        || die "could not unpack $DOWNLOADS/Flickr8k_text.zip"
    find "$FLICKR8K_TMP" -depth -type d -name __MACOSX -exec rm -rf {} +

    # Images: keep the zip's Flicker8k_Dataset/ folder (the name the main script expects);
    # otherwise use whichever folder holds the JPEGs.
    local img_dir first tok text_dir
    if [ -d "$FLICKR8K_TMP/.images/Flicker8k_Dataset" ]; then
        img_dir="$FLICKR8K_TMP/.images/Flicker8k_Dataset"
    else
        first="$(find "$FLICKR8K_TMP/.images" -type f \( -iname '*.jpg' -o -iname '*.jpeg' \) -print -quit)"
        [ -n "$first" ] || die "$FLICKR8K_IMAGES_URL holds no JPEG images (set FLICKR8K_IMAGES_URL to the Flickr8k_Dataset.zip URL)"
        img_dir="$(dirname "$first")"
    fi
    mv "$img_dir" "$FLICKR8K_TMP/Flicker8k_Dataset"
    rm -rf "$FLICKR8K_TMP/.images"

    # Text files: move them to the top of flickr8k/, even if the zip had them in a subfolder.
    tok="$(find "$FLICKR8K_TMP/.text" -type f -name Flickr8k.token.txt -print -quit)"
    [ -n "$tok" ] || die "$FLICKR8K_TEXT_URL holds no Flickr8k.token.txt (set FLICKR8K_TEXT_URL to the Flickr8k_text.zip URL)"
    text_dir="$(dirname "$tok")"
    find "$text_dir" -mindepth 1 -maxdepth 1 -exec mv -f {} "$FLICKR8K_TMP/" \;
    rm -rf "$FLICKR8K_TMP/.text"

    local n_images
    n_images="$(find "$FLICKR8K_TMP/Flicker8k_Dataset" -type f \( -iname '*.jpg' -o -iname '*.jpeg' \) | wc -l | tr -d ' ')"
    [ "$n_images" -gt 0 ] || die "no JPEG images found in $FLICKR8K_TMP/Flicker8k_Dataset"

    [ ! -e "$FLICKR8K_DIR" ] || die "$FLICKR8K_DIR appeared while unpacking (another setup.sh running?)"
    mv "$FLICKR8K_TMP" "$FLICKR8K_DIR"
    rm -f "$DOWNLOADS/Flickr8k_Dataset.zip" "$DOWNLOADS/Flickr8k_text.zip"
    rmdir "$DOWNLOADS" 2>/dev/null || true
    say "Flickr8k ready in $FLICKR8K_DIR ($n_images images)"
}

# ---------------------------------------------------------------- 5. a browser for the tests

setup_browser() {
    if [ "${SETUP_SKIP_BROWSER:-0}" = "1" ]; then
        say "SETUP_SKIP_BROWSER=1: skipping the browser for the results page's tests"
        return 0
    fi
    if { command -v chromium || command -v chromium-browser; } >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
        say "chromium and chromedriver are installed (for the results page's tests)"
        return 0
    fi
    local sudo=()
    if [ "$(id -u)" != "0" ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            browser_failed "installing it needs root"
            return 0
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        browser_failed "there is no apt-get here (not Debian or Ubuntu)"
        return 0
    fi
    say "installing Debian's chromium and chromium-driver (for the results page's tests; a minute)"
    local install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver)
    if "${sudo[@]}" "${install[@]}" >/dev/null 2>&1 \
            || { "${sudo[@]}" apt-get update -q >/dev/null 2>&1 && "${sudo[@]}" "${install[@]}" >/dev/null 2>&1; }; then
        say "chromium installed"
    else
        browser_failed "apt-get could not install chromium and chromium-driver (are you offline?)"
    fi
}

browser_failed() {
    warn "no headless Chromium: $1. Carrying on: the training script does not need it,"
    warn "  and the results page's browser tests skip without it. To run them:"
    warn "    apt-get install chromium chromium-driver   (Ubuntu: chromium-browser chromium-chromedriver)"
}

# ---------------------------------------------------------------- main

setup_venv
setup_resnet50
if [ "$WANT_FLICKR8K" = "1" ]; then
    setup_flickr8k
fi
if [ "$WANT_TEST" = "1" ]; then
    setup_test_requirements
    setup_browser
fi

say "done. Next:"
next_step() { printf '  %-66s # %s\n' "$1" "$2"; }
next_step ".venv/bin/python flickr_image_caption_with_pytorch_resnet_lstm.py" "train"
if [ "$WANT_TEST" = "1" ]; then
    next_step ".venv/bin/python -m pytest" "test"
else
    next_step "./setup.sh --test && .venv/bin/python -m pytest" "test"
fi
