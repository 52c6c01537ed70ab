"""tests/gpu_check.sh on its CPU path (--device=cpu --quick): every part runs and gives a figure.

Opt-in (GPU_CHECK=1): it runs the script six times, torchrun among them, and the benchmark: about
5 minutes of CPU time (16 minutes' wall time on a shared 2-core CPU), and the suite must stay under
8 minutes without it."""
import json
import os
import subprocess
import time

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(
    os.environ.get("GPU_CHECK") != "1",
    reason="opt-in (5 minutes or more): GPU_CHECK=1 runs tests/gpu_check.sh --device=cpu --quick")

# the figures each part must give, as figures.json names them (by the part's number)
PART_FIGURES = [
    "1. default demo, wall time",
    "2. torchrun: resumed run's train_loss and val_loss equal an uninterrupted run's",
    "2. torchrun: stderr lines saying 'warning' (3 runs)",
    "3. extraction (JPEG decoding included) / ResNet50 bare forward",
    "3. cached epoch / the same steps on tensors in memory",
    "3. whole default job (extraction, 2 epochs, test report)",
    "4. SCST epoch / cross-entropy epoch (attention demo, medians)",
]


def test_the_quick_cpu_check_gives_a_figure_for_every_part(tmp_path):
    out = tmp_path / "check"
    start = time.time()
    done = subprocess.run(["bash", str(ROOT / "tests" / "gpu_check.sh"), str(out), "--device=cpu",
                           "--quick"], capture_output=True, text=True, timeout=1800, cwd=ROOT)
    print(f"gpu_check.sh --device=cpu --quick: {time.time() - start:.0f} s")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[0].startswith("needs: ")  # what to bring, in one line
    summary = (out / "summary.md").read_text()
    assert done.stdout.rstrip().endswith(summary.rstrip())  # printed last
    assert "| figure | value | target | met? |" in summary
    figures = json.loads((out / "figures.json").read_text())
    missing = [name for name in PART_FIGURES if figures.get(name) is None]
    assert not missing, summary
    parts = (out / "parts.tsv").read_text().splitlines()[1:]
    names = [row.split("\t")[0] for row in parts]
    assert names == ["setup", "demo", "torchrun", "benchmark", "scst"]
    for row in parts:  # each part ended by itself, not by its time cap
        name, code = row.split("\t")[:2]
        assert code == "0", (name, (out / f"{name}.err").read_text()[-3000:])
