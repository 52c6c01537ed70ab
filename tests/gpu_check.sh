#!/usr/bin/env bash
# The script on one GPU at the hardware's speed (issue 29): four parts, each under its own time cap
# so that one failure does not stop the rest, in at most 8 minutes, with no network.
#
#   tests/gpu_check.sh OUTDIR [--device=cuda|cpu] [--quick]
#
#   1. the default demo: wall time, its test accuracies, peak GPU memory;
#   2. torchrun --nproc_per_node=1 on the demo for 3 epochs, stopped by Ctrl-C (SIGINT) in its
#      second, then --resume: its epochs' train_loss and val_loss against an uninterrupted run's
#      (exact equality), and any line of stderr that says "warning";
#   3. tests/benchmark.py at Flickr8k's size (8,091 generated JPEGs of 500x375): extraction against
#      ResNet50's bare forward, a cached epoch against the same steps in memory, the whole job;
#   4. the attention demo with --scst_epochs=3: an SCST epoch's time against a cross-entropy
#      epoch's.
# OUTDIR (new, empty, or an earlier check's) receives each part's stdout and stderr (NAME.out,
# NAME.err), the runs' output folders, summary.md (figure | value | target | met?) and
# figures.json; the summary is printed last. --quick caps every part (a few epochs and batches,
# 60 demo images, 200 benchmark images) so that the script itself is proven in minutes on a CPU:
# its figures say nothing about a GPU. It needs a Python with torch and torchvision ($PYTHON, else
# .venv/bin/python, else python3) and the packages that its first line of output names; it
# installs nothing.
set -u -o pipefail

usage() {
    echo "usage: $0 OUTDIR [--device=cuda|cpu] [--quick]" >&2
    exit 2
}

OUT="" DEVICE=cuda QUICK=0
for arg in "$@"; do
    case $arg in
        --device=cuda | --device=cpu) DEVICE=${arg#--device=} ;;
        --quick) QUICK=1 ;;
        -*) usage ;;
        *) [ -z "$OUT" ] || usage; OUT=$arg ;;
    esac
done
[ -n "$OUT" ] || usage

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPT=$ROOT/flickr_image_caption_with_pytorch_resnet_lstm.py
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then
    PY=$ROOT/.venv/bin/python
else
    PY=python3
fi

# Our own entries only: an earlier check's are replaced, anything else in OUTDIR is refused.
OWN=(.gpu_check about.txt summary.md figures.json parts.tsv demo-data cache demo torchrun-resumed
     torchrun-straight benchmark scst resnet50-random-init.pth)
for name in setup demo torchrun benchmark scst torchrun-{interrupted,resumed,straight}; do
    OWN+=("$name.out" "$name.err")
done
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
if [ -n "$(ls -A "$OUT")" ] && [ ! -e "$OUT/.gpu_check" ]; then
    echo "error: $OUT holds other files than an earlier gpu_check's: give a new folder" >&2
    exit 2
fi
for entry in "${OWN[@]}"; do
    rm -rf "${OUT:?}/$entry"
done
touch "$OUT/.gpu_check"

# time caps in seconds, summing to the 8 minutes: setup, parts 1-4 (and the whole job's in part 3)
if [ "$QUICK" = 1 ]; then
    # about 5 minutes of CPU time on 2 cores; the caps leave room for a CPU that other jobs share
    # (measured: 16 minutes with the load average at 10-14 on 2 cores)
    CAPS=(120 240 420 420 300) JOB_TIMEOUT=300
    DEMO=(--demo_images=60 --num_workers=0 --beam_size=1)  # the demo set's, for every demo part
    DEMO_RUN=(--num_epochs=2)
    TORCHRUN=(--num_epochs=2 --batch_size=8 --log_every=2)  # a second epoch long enough to stop in
    BENCH=(--images=200 --image_size=64 --max_batches_per_epoch=5 --num_workers=0 --beam_size=1)
    SCST=(--num_epochs=2 --max_batches_per_epoch=4)
else
    # 470 s, and about 10 s of checks and summary: 8 minutes. A job past 2 minutes missed its target
    CAPS=(35 80 105 180 70) JOB_TIMEOUT=125
    DEMO=() DEMO_RUN=() TORCHRUN=(--num_epochs=3) BENCH=(--images=8091)
    SCST=(--num_epochs=4)  # enough cross-entropy epochs to compare with (the first is warm-up)
fi

# ---------------------------------------------------------------------------------------------
# What it needs, in one line; without it nothing runs.
read -r -d '' NEEDS_PY <<'EOF'
import importlib, sys
device = sys.argv[1]
modules = {"torch": "torch", "torchvision": "torchvision", "numpy": "numpy", "pandas": "pandas",
           "spacy": "spacy", "pycocoevalcap": "pycocoevalcap", "tqdm": "tqdm",
           "matplotlib": "matplotlib", "PIL": "pillow"}
missing = []
for module, package in modules.items():
    try:
        importlib.import_module(module)
    except Exception:
        missing.append(package)
bring = [p for p in modules.values() if p not in ("torch", "torchvision")]
line = (f"needs: {sys.executable} with torch and torchvision, and {' '.join(bring)} (missing: "
        f"{' '.join(missing) or 'none'}); to bring them without network: on a machine with "
        f"network `pip download -d wheels {' '.join(bring)}` for this Python, then here "
        f"`pip install --no-index --target DIR wheels/*.whl` and PYTHONPATH=DIR; "
        f"java on the PATH for METEOR (else it is skipped with a warning)")
print(line)
if missing:
    sys.exit(3)
import torch
if device == "cuda" and not torch.cuda.is_available():
    print("error: --device=cuda but torch sees no CUDA GPU here: use --device=cpu")
    sys.exit(3)
EOF
"$PY" -c "$NEEDS_PY" "$DEVICE" || exit 3

read -r -d '' ABOUT_PY <<'EOF'
import os, platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU"
cuda = torch.version.cuda or "none"
print(f"{gpu}; torch {torch.__version__} (CUDA {cuda}); {len(os.sched_getaffinity(0))} CPU cores; "
      f"Python {platform.python_version()}")
EOF
ABOUT=$("$PY" -c "$ABOUT_PY")
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "unknown")
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "machine: $ABOUT"
    echo "commit: $COMMIT"
    echo "mode: --device=$DEVICE$([ "$QUICK" = 1 ] && echo " --quick")"
} > "$OUT/about.txt"
echo "gpu_check: $ABOUT; commit $COMMIT; writing to $OUT"

run_part() {  # NAME CAP COMMAND...: stdout and stderr to NAME.out and NAME.err; a row of parts.tsv
    local name=$1 cap=$2
    shift 2
    echo "[$(date +%T)] $name (at most $cap s)"
    local start end rc seconds
    start=$(date +%s.%N)
    timeout -k 15 "$cap" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err" < /dev/null
    rc=$?
    end=$(date +%s.%N)
    seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$cap" >> "$OUT/parts.tsv"
    echo "[$(date +%T)] $name: exit code $rc in $seconds s$([ "$rc" = 124 ] && echo ' (time cap)')"
}
printf 'part\texit\tseconds\tcap\n' > "$OUT/parts.tsv"

# ---------------------------------------------------------------------------------------------
# Setup: the demo set (so that part 1 times the run, not the drawing of 3,000 images) and the
# weights that parts 2 and 4 name (the ones part 1 uses by default, so their features are shared).
read -r -d '' SETUP_PY <<'EOF'
import sys, time
from pathlib import Path
root, out, settings = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
sys.path.insert(0, root)
import flickr_image_caption_with_pytorch_resnet_lstm as cap
default = cap.ROOT / cap.encoder_weights
weights = default if default.is_file() else cap.random_resnet50_weights(
    out / "resnet50-random-init.pth")  # the demo's own random weights: the same seed
print(f"weights: {weights}")
cfg = cap.resolve_settings(cap.parse_args(["--dataset=demo", *settings])[0])
start = time.perf_counter()
cap.make_demo_dataset(Path(cfg.data_dir), cfg.demo_images, cfg.image_size)
print(f"demo_set_s: {time.perf_counter() - start:.1f}")
EOF
run_part setup "${CAPS[0]}" "$PY" -c "$SETUP_PY" "$ROOT" "$OUT" "--data_dir=$OUT/demo-data" \
    "${DEMO[@]}"
WEIGHTS=$(sed -n 's/^weights: //p' "$OUT/setup.out")
[ -n "$WEIGHTS" ] || WEIGHTS=$ROOT/resources/models/resnet50-random-init.pth

COMMON=(--dataset=demo "--device=$DEVICE" "--data_dir=$OUT/demo-data" "--cache_dir=$OUT/cache"
        "${DEMO[@]}")

# ---------------------------------------------------------------------------------------------
# 1. The default demo, with a fresh output_dir and cache_dir.
run_part demo "${CAPS[1]}" "$PY" "$SCRIPT" "${COMMON[@]}" "--output_dir=$OUT/demo" "${DEMO_RUN[@]}"

# ---------------------------------------------------------------------------------------------
# 2. torchrun, Ctrl-C, --resume, against an uninterrupted run.
read -r -d '' TORCHRUN_PY <<'EOF'
import csv, os, signal, subprocess, sys, time
from pathlib import Path
py, script, out, *settings = sys.argv[1:]
out, children = Path(out), []


def figure(name, value):
    print(f"{name}: {value}", flush=True)


def start(name, folder, *extra):
    """torchrun in a session of its own, as in a terminal, where Ctrl-C reaches torchrun alone."""
    command = [py, "-m", "torch.distributed.run", "--nproc_per_node=1", "--standalone", script,
               *settings, f"--output_dir={folder}", *extra]
    print(f"# {name}: {' '.join(command)}", flush=True)
    logs = [open(out / f"torchrun-{name}.{kind}", "w") for kind in ("out", "err")]
    child = subprocess.Popen(command, stdout=logs[0], stderr=logs[1], start_new_session=True)
    children.append(child)
    return child


def descendants(pid):
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(k) for k in kids] + [d for k in kids for d in descendants(int(k))]


def stop_all():
    for child in children:
        if child.poll() is None:  # torchrun's workers are in sessions of their own: each by its id
            family = [child.pid, *descendants(child.pid)]
            for pid in family:
                with_signal(pid, signal.SIGTERM)
            deadline = time.time() + 10
            while child.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            for pid in family:
                with_signal(pid, signal.SIGKILL)


def with_signal(pid, sig):
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def epoch_begun(log, epoch):
    """Whether loss_per_batch.csv has a row of this epoch (its first column)."""
    try:
        lines = log.read_text().splitlines()
    except OSError:
        return False
    last = lines[-1].split(",")[0] if len(lines) > 1 else ""
    return last.isdigit() and int(last) >= epoch


def rows(folder, name):
    with open(folder / name) as file:
        return list(csv.DictReader(file))


def compare(resumed, straight):
    a, b = rows(resumed, "loss_per_epoch.csv"), rows(straight, "loss_per_epoch.csv")
    same = len(a) == len(b) > 0 and all(
        x[k] == y[k] for x, y in zip(a, b) for k in ("epoch", "train_loss", "val_loss"))
    for x, y in zip(a, b):
        print(f"# epoch {x['epoch']}: train_loss {x['train_loss']} vs {y['train_loss']}, "
              f"val_loss {x['val_loss']} vs {y['val_loss']}", flush=True)
    pairs = zip(rows(resumed, "loss_per_batch.csv"), rows(straight, "loss_per_batch.csv"))
    steps = [(float(x["loss"]), float(y["loss"])) for x, y in pairs]
    columns = ("train_loss", "val_loss")
    gaps = [abs(float(x[k]) - float(y[k])) for x, y in zip(a, b) for k in columns]
    figure("torchrun_epochs_compared", f"{len(a)} vs {len(b)}")
    figure("torchrun_epoch_loss_max_difference", max(gaps, default="n/a"))
    figure("torchrun_step_loss_max_difference", max((abs(x - y) for x, y in steps), default="n/a"))
    figure("torchrun_resume_exact", "yes" if same else "no")


def warnings():
    lines = [f"{path.name}: {line}" for path in sorted(out.glob("torchrun-*.err"))
             for line in path.read_text(errors="replace").splitlines() if "warning" in line.lower()]
    for line in lines[:10]:
        print(f"# {line}", flush=True)
    figure("torchrun_stderr_warning_lines", len(lines))


def main():
    resumed, straight = out / "torchrun-resumed", out / "torchrun-straight"
    first = start("interrupted", resumed)
    while first.poll() is None and not epoch_begun(resumed / "loss_per_batch.csv", 2):
        time.sleep(0.05)
    if first.poll() is None:
        os.killpg(first.pid, signal.SIGINT)  # a terminal's Ctrl-C
    code = first.wait()
    printed = (out / "torchrun-interrupted.out").read_text().splitlines()
    stopped = [line for line in printed if "interrupted: saved" in line]
    # torchrun itself ends with its SignalException (exit code 1) once its worker has saved
    said = stopped[-1] if stopped else "it was not stopped"
    print(f"# interrupted run: exit code {code}; {said}")
    figure("torchrun_interrupted", "yes" if stopped else "no")
    figure("torchrun_resume_exit", start("resumed", resumed, "--resume").wait())
    figure("torchrun_straight_exit", start("straight", straight).wait())
    compare(resumed, straight)


signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # the time cap: the runs go too
try:
    main()
finally:
    warnings()
    stop_all()
EOF
run_part torchrun "${CAPS[2]}" "$PY" -c "$TORCHRUN_PY" "$PY" "$SCRIPT" "$OUT" "${COMMON[@]}" \
    "--encoder_weights=$WEIGHTS" "${TORCHRUN[@]}"

# ---------------------------------------------------------------------------------------------
# 3. tests/benchmark.py at Flickr8k's size.
run_part benchmark "${CAPS[3]}" "$PY" "$ROOT/tests/benchmark.py" "--device=$DEVICE" \
    --figures=extraction,job,epoch "--work=$OUT/benchmark" "--job_timeout=$JOB_TIMEOUT" \
    "${BENCH[@]}"

# ---------------------------------------------------------------------------------------------
# 4. The attention demo with self-critical epochs.
run_part scst "${CAPS[4]}" "$PY" "$SCRIPT" "${COMMON[@]}" "--encoder_weights=$WEIGHTS" \
    --decoder=attention --scst_epochs=3 "--output_dir=$OUT/scst" "${SCST[@]}"

# ---------------------------------------------------------------------------------------------
# The summary: figure | value | target | met?
read -r -d '' SUMMARY_PY <<'EOF'
import csv, json, re, statistics, sys
from pathlib import Path
out, quick = Path(sys.argv[1]), sys.argv[2] == "1"
rows, figures = [], {}


def text(path):
    try:
        return (out / path).read_text(errors="replace")
    except OSError:
        return ""


def parsed(path):
    """The `name: value` lines of a part's stdout."""
    return dict(re.findall(r"^([a-z0-9_]+): (.+)$", text(path), re.M))


def number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def short(value):
    return f"{number(value):.2g}" if number(value) is not None else "?"


def add(part, name, value, shown, target="", test=None):
    met = "" if test is None or value is None else ("yes" if test(value) else "no")
    if target and value is None:
        met = "n/a"
    rows.append((f"{part}. {name}", shown if value is not None else "n/a", target, met))
    figures[f"{part}. {name}"] = value


def epochs(folder):
    try:
        with open(out / folder / "loss_per_epoch.csv") as file:
            return list(csv.DictReader(file))
    except OSError:
        return []


parts = {r["part"]: r for r in csv.DictReader(open(out / "parts.tsv"), delimiter="\t")}
setup = parsed("setup.out")

# 1. the default demo
demo = parts.get("demo", {})
wall = number(demo.get("seconds")) if demo.get("exit") == "0" else None
made = setup.get("demo_set_s", "?")
add(1, "default demo, wall time", wall, f"{wall} s (the demo set, made before: {made} s)",
    "< 40 s", lambda v: v < 40)
try:
    report = json.loads(text("demo/test_metrics.json") or "{}")
except ValueError:
    report = {}
accuracies = {k: v for k, v in report.items() if "demo" in k}
for key, value in accuracies.items():
    add(1, f"{key} (test split)", value, f"{100 * value:.1f}%")
if not accuracies:
    add(1, "demo accuracies (test split)", None, "")
peak = re.findall(r"peak GPU memory: ([\d.]+) GiB", text("demo.out"))
add(1, "peak GPU memory", number(peak[-1]) if peak else None, f"{peak[-1]} GiB" if peak else "")
seconds = [float(r["epoch_seconds"]) for r in epochs("demo")]
if seconds:
    add(1, "demo epoch, median training seconds", statistics.median(seconds),
        f"{statistics.median(seconds):.2f} s of {len(seconds)} epochs")

# 2. torchrun
run = parsed("torchrun.out")
exact = run.get("torchrun_resume_exact")
interrupted = run.get("torchrun_interrupted")
stops = re.findall(r"interrupted: saved .* at step (\d+)", text("torchrun-interrupted.out"))
where = f"stopped by SIGINT at step {stops[-1]}" if stops else "not stopped by SIGINT"
add(2, "torchrun: resumed run's train_loss and val_loss equal an uninterrupted run's",
    exact if interrupted == "yes" else None,
    f"{exact} ({run.get('torchrun_epochs_compared', '?')} epochs; {where}; largest difference "
    f"{short(run.get('torchrun_epoch_loss_max_difference'))} in an epoch's, "
    f"{short(run.get('torchrun_step_loss_max_difference'))} in a step's loss)", "exact",
    lambda v: v == "yes")
lines = number(run.get("torchrun_stderr_warning_lines"))
said = sorted({line.strip()[:100].replace("|", "/") for path in sorted(out.glob("torchrun-*.err"))
               for line in text(path.name).splitlines() if "warning" in line.lower()})
shown = f"{lines:.0f}" + (f": {'; '.join(said[:3])}" if said else "") if lines is not None else ""
add(2, "torchrun: stderr lines saying 'warning' (3 runs)", lines, shown, "0", lambda v: v == 0)

# 3. the benchmark
bench = parsed("benchmark.out")
get = lambda name: number(bench.get(name))  # noqa: E731
ratio = get("extraction_vs_forward")
add(3, "extraction (JPEG decoding included) / ResNet50 bare forward", ratio,
    f"{ratio} ({bench.get('extraction_images_per_s')} vs {bench.get('bare_forward_images_per_s')}"
    f" images/s)", ">= 0.7", lambda v: v >= 0.7)
cached = get("cached_epoch_s")
add(3, "cached epoch at batch 32", cached, f"{cached} s", "<= 4 s", lambda v: v <= 4)
over = get("cached_vs_in_memory")
add(3, "cached epoch / the same steps on tensors in memory", over,
    f"{over}x ({cached} vs {bench.get('in_memory_epoch_s')} s)", "<= 1.1x", lambda v: v <= 1.1)
job = bench.get("default_job_s")
add(3, "whole default job (extraction, 2 epochs, test report)", number(job) or job,
    f"{job} s" if number(job) else job, "< 120 s",
    lambda v: number(v) is not None and number(v) < 120)

# 4. SCST against cross-entropy
rows4 = epochs("scst")
xe = [float(r["epoch_seconds"]) for r in rows4 if r["phase"] == "cross-entropy"][1:]  # warm
sc = [float(r["epoch_seconds"]) for r in rows4 if r["phase"] == "self-critical"]
scst = statistics.median(sc) / statistics.median(xe) if xe and sc else None
add(4, "SCST epoch / cross-entropy epoch (attention demo, medians)", scst,
    f"{scst:.2f}x ({statistics.median(sc):.2f} vs {statistics.median(xe):.2f} s)" if scst else "",
    "<= 3x", lambda v: v <= 3)

table = ["| figure | value | target | met? |", "| --- | --- | --- | --- |"]
table += [f"| {' | '.join(str(c) for c in row)} |" for row in rows]
runs = ["| part | exit code | seconds | cap (s) |", "| --- | --- | --- | --- |"]
runs += [f"| {p['part']} | {p['exit']} | {p['seconds']} | {p['cap']} |" for p in parts.values()]
head = text("about.txt").strip().splitlines()
note = ("\n\n--quick: every part capped to prove the script on this machine; the targets are for "
        "one H100 or H200 and these figures say nothing about them.") if quick else ""
summary = "\n".join(["# gpu_check summary", "", *[f"- {line}" for line in head], "",
                     *table, "", *runs]) + note + "\n"
(out / "summary.md").write_text(summary)
(out / "figures.json").write_text(json.dumps(figures, indent=1) + "\n")
print(summary)
EOF
"$PY" -c "$SUMMARY_PY" "$OUT" "$QUICK"
