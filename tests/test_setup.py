"""Tests for setup.sh.

Each test copies setup.sh into a fresh project folder under tmp_path and runs it
with bash, SETUP_SKIP_VENV=1 and every download URL pointing at a file:// path
that the test creates (or at one that does not exist), so nothing touches the
network or this checkout.
"""

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUP_SH = ROOT / "setup.sh"
WEIGHTS_NAME = "resnet50-0676ba61.pth"
WEIGHTS_REL = Path("resources/models") / WEIGHTS_NAME

pytestmark = [
    pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed"),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]


# ---------------------------------------------------------------- helpers


def file_url(path):
    return Path(path).resolve().as_uri()


MISSING_URL = "file:///nonexistent/setup-test/missing.bin"


@pytest.fixture
def project(tmp_path):
    proj = tmp_path / "project"
    proj.mkdir()
    shutil.copy2(SETUP_SH, proj / "setup.sh")
    shutil.copy2(ROOT / "requirements.txt", proj / "requirements.txt")
    (proj / "tests").mkdir()
    shutil.copy2(ROOT / "tests/requirements.txt", proj / "tests/requirements.txt")
    return proj


def run_setup(proj, *args, env=None, cwd=None):
    full_env = dict(os.environ)
    # Make sure the script finds a python3 (this venv's) first.
    full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env.get("PATH", "")
    full_env.update(
        SETUP_SKIP_VENV="1",
        SETUP_SKIP_BROWSER="1",
        RESNET50_URL="file:///nonexistent/setup-test/resnet50.pth",
        FLICKR8K_IMAGES_URL=MISSING_URL,
        FLICKR8K_TEXT_URL=MISSING_URL,
        TORCH_INDEX_URL="file:///nonexistent/setup-test/torch-index",  # never the network
    )
    full_env.update(env or {})
    proc = subprocess.run(
        ["bash", str(proj / "setup.sh"), *args],
        cwd=str(cwd or proj),
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
    )
    return proc.returncode, proc.stdout


def tiny_jpeg(color):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


def make_flickr8k_zips(folder, text_subfolder=""):
    """Build small zips with the layout of the real Flickr8k release."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ["1000_a.jpg", "1001_b.jpg", "1002_c.jpg"]
    images_zip = folder / "Flickr8k_Dataset.zip"
    with zipfile.ZipFile(images_zip, "w") as z:
        z.writestr("Flicker8k_Dataset/", "")
        for name, color in zip(names, ["red", "green", "blue"]):
            z.writestr(f"Flicker8k_Dataset/{name}", tiny_jpeg(color))
        # The real zip has macOS metadata next to the images.
        z.writestr(f"__MACOSX/Flicker8k_Dataset/._{names[0]}", b"\x00\x05\x16\x07junk")
    text_zip = folder / "Flickr8k_text.zip"
    tokens = "".join(f"{n}#{i}\ta picture number {i} .\n" for n in names for i in range(5))
    with zipfile.ZipFile(text_zip, "w") as z:
        z.writestr(f"{text_subfolder}Flickr8k.token.txt", tokens)
        z.writestr(f"{text_subfolder}Flickr_8k.trainImages.txt", names[0] + "\n")
        z.writestr(f"{text_subfolder}Flickr_8k.devImages.txt", names[1] + "\n")
        z.writestr(f"{text_subfolder}Flickr_8k.testImages.txt", names[2] + "\n")
        z.writestr(f"__MACOSX/{text_subfolder}._Flickr8k.token.txt", b"\x00\x05\x16\x07junk")
    return images_zip, text_zip, names


def flickr_env(images_zip, text_zip):
    return {
        "FLICKR8K_IMAGES_URL": file_url(images_zip),
        "FLICKR8K_TEXT_URL": file_url(text_zip),
    }


def assert_flickr8k_layout(proj, names):
    data = proj / "resources/input/flickr8k"
    assert sorted(p.name for p in (data / "Flicker8k_Dataset").glob("*.jpg")) == sorted(names)
    assert (data / "Flickr8k.token.txt").is_file()
    for split in ("train", "dev", "test"):
        assert (data / f"Flickr_8k.{split}Images.txt").is_file()
    assert not list(data.rglob("__MACOSX"))
    assert not (proj / "resources/input/flickr8k.tmp").exists()
    downloads = proj / "resources/input/.downloads"
    assert not downloads.exists() or not any(downloads.iterdir())


# ---------------------------------------------------------------- help


def test_help(project):
    rc, out = run_setup(project, "--help")
    assert rc == 0, out
    assert "FLICKR8K_IMAGES_URL" in out
    assert "RESNET50_URL" in out
    assert "Flickr30k" in out and "Kaggle" in out
    assert "resources/input/flickr30k" in out
    assert "--test" in out and "tests/requirements.txt" in out
    assert "TORCH_INDEX_URL" in out and "https://download.pytorch.org/whl/cpu" in out
    assert "TORCH_BUILD" in out and "no NVIDIA GPU" in out
    # --help does nothing else.
    assert not (project / "resources").exists()


def test_unknown_option(project):
    rc, out = run_setup(project, "--bogus")
    assert rc != 0
    assert "unknown option" in out


# ---------------------------------------------------------------- venv


def fake_venv(project):
    """A stand-in .venv whose pip only logs its calls, so no real install runs; returns the log."""
    bin_dir = project / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    log = project / "pip.log"
    (bin_dir / "python").write_text('#!/bin/sh\necho "${FAKE_TORCH:-2.14.1 (CUDA 12.8)}"\n')
    (bin_dir / "pip").write_text(
        f'#!/bin/sh\necho "$*" >> "{log}"\nexit "${{FAKE_PIP_RC:-0}}"\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return log


def pip_calls(log):
    return log.read_text().splitlines() if log.exists() else []


def sha256_text(text):
    return hashlib.sha256(text.encode()).hexdigest()


VENV = {"SETUP_SKIP_VENV": "0"}


def test_venv_requirements_installed_only_when_changed(project):
    log = fake_venv(project)
    (project / "requirements.txt").write_text("numpy\n")
    stamp = project / ".venv" / ".requirements.sha256"

    rc, out = run_setup(project, env=VENV)
    assert rc == 0, out
    assert pip_calls(log) == ["install -r requirements.txt"]  # and not the tests' requirements
    assert stamp.read_text().strip() == sha256_text("numpy\n")

    rc, out = run_setup(project, env=VENV)
    assert rc == 0, out
    assert len(pip_calls(log)) == 1  # unchanged: no pip run
    assert "up to date" in out

    # Changed requirements and a failing pip: error, and the stamp stays old.
    (project / "requirements.txt").write_text("numpy\npandas\n")
    rc, out = run_setup(project, env={**VENV, "FAKE_PIP_RC": "1"})
    assert rc != 0, out
    assert "requirements.txt" in out and "failed" in out
    assert len(pip_calls(log)) == 2
    assert stamp.read_text().strip() == sha256_text("numpy\n")

    rc, out = run_setup(project, env=VENV)
    assert rc == 0, out
    assert len(pip_calls(log)) == 3
    assert stamp.read_text().strip() == sha256_text("numpy\npandas\n")


def test_test_requirements_only_with_test_and_only_when_changed(project):
    log = fake_venv(project)
    env = {**VENV, "SETUP_SKIP_BROWSER": "0", "PATH": no_browser_path(project.parent)}
    rc, out = run_setup(project, env=env)
    assert rc == 0, out
    assert pip_calls(log) == ["install -r requirements.txt"]
    assert not (project.parent / "calls").exists()  # plain setup never runs apt-get
    assert "./setup.sh --test && .venv/bin/python -m pytest" in out  # how to test next

    rc, out = run_setup(project, "--test", env=env)
    assert rc == 0, out
    assert pip_calls(log) == ["install -r requirements.txt", "install -r tests/requirements.txt"]
    stamp = project / ".venv" / ".test-requirements.sha256"
    tests_requirements = (project / "tests/requirements.txt").read_text()
    assert stamp.read_text().strip() == sha256_text(tests_requirements)
    assert (project.parent / "calls").exists()  # --test tried to install the browser

    rc, out = run_setup(project, "--test", env=env)
    assert rc == 0, out
    assert len(pip_calls(log)) == 2  # both unchanged: no pip run

    (project / "tests/requirements.txt").write_text("pytest\n")
    rc, out = run_setup(project, "--test", env=env)
    assert rc == 0, out
    assert pip_calls(log)[2:] == ["install -r tests/requirements.txt"]  # only the changed file

    (project / "tests/requirements.txt").write_text("pytest\nruff\n")
    rc, out = run_setup(project, "--test", env={**env, "FAKE_PIP_RC": "1"})
    assert rc != 0, out
    assert "tests/requirements.txt" in out and "failed" in out
    assert stamp.read_text().strip() == sha256_text("pytest\n")


def machine(tmp_path, gpu):
    """setup.sh's view of the machine: an NVIDIA GPU (nvidia-smi answers) or none, and a reachable
    CPU-only index (a local folder) at the returned URL."""
    stub(tmp_path / "gpu", "nvidia-smi", "exit 0" if gpu else "exit 9")
    index = tmp_path / "cpu-index"
    (index / "torch").mkdir(parents=True)
    return {"PATH": f"{tmp_path / 'gpu'}{os.pathsep}{os.environ['PATH']}", "SETUP_PROC_NVIDIA": "/nonexistent",
            "TORCH_INDEX_URL": file_url(index)}


PINS = "torch==2.14.1\ntorchvision==0.29.1  # pinned\nnumpy\n"


def test_without_an_nvidia_gpu_the_cpu_only_build_is_installed_once(project, tmp_path):
    log = fake_venv(project)
    (project / "requirements.txt").write_text(PINS)
    env = {**VENV, **machine(tmp_path, gpu=False), "FAKE_TORCH": "2.14.1+cpu (CPU-only)"}
    rc, out = run_setup(project, env=env)
    assert rc == 0, out
    assert pip_calls(log) == [f"install torch==2.14.1 torchvision==0.29.1 --index-url {env['TORCH_INDEX_URL']}",
                              "install -r requirements.txt"]
    assert "no NVIDIA GPU found: torch's CPU-only build" in out
    assert "torch in .venv: 2.14.1+cpu (CPU-only)" in out  # which build it installed
    rc, out = run_setup(project, env=env)
    assert rc == 0 and len(pip_calls(log)) == 2, out  # installed: nothing to do


def test_an_unreachable_cpu_index_falls_back_to_the_default_build_with_a_note(project, tmp_path):
    log = fake_venv(project)
    (project / "requirements.txt").write_text(PINS)
    env = {**VENV, **machine(tmp_path, gpu=False), "TORCH_INDEX_URL": "file:///nonexistent/cpu-index"}
    rc, out = run_setup(project, env=env)
    assert rc == 0, out
    assert pip_calls(log) == ["install -r requirements.txt"]  # pip never waits on the unreachable index
    assert "file:///nonexistent/cpu-index cannot be reached" in out and "default build instead" in out
    assert "torch in .venv: 2.14.1 (CUDA 12.8)" in out


@pytest.mark.parametrize("gpu, build, cpu_index", [(True, "", False), (True, "cpu", True),
                                                   (False, "default", False), (False, "cpu", True)])
def test_an_nvidia_gpu_gets_the_default_build_and_torch_build_overrides_either_way(project, tmp_path, gpu,
                                                                                   build, cpu_index):
    log = fake_venv(project)
    (project / "requirements.txt").write_text(PINS)
    rc, out = run_setup(project, env={**VENV, **machine(tmp_path, gpu), "TORCH_BUILD": build})
    assert rc == 0, out
    assert any("--index-url" in call for call in pip_calls(log)) == cpu_index, out
    assert pip_calls(log)[-1] == "install -r requirements.txt"
    assert ("NVIDIA GPU is here" in out) == (gpu and not build)
    assert "torch in .venv:" in out


def test_a_gpu_driver_without_nvidia_smi_counts(project, tmp_path):
    log = fake_venv(project)
    (project / "requirements.txt").write_text(PINS)
    env = {**VENV, **machine(tmp_path, gpu=False), "SETUP_PROC_NVIDIA": str(tmp_path)}  # the driver's folder
    rc, out = run_setup(project, env=env)
    assert rc == 0 and pip_calls(log) == ["install -r requirements.txt"] and "NVIDIA GPU is here" in out, out


def test_an_unknown_torch_build_is_refused(project, tmp_path):
    fake_venv(project)
    rc, out = run_setup(project, env={**VENV, "TORCH_BUILD": "rocm"})
    assert rc != 0 and "TORCH_BUILD=rocm: must be auto, cpu or default" in out


def test_requirements_split():
    """Training needs no test tools: they are in tests/requirements.txt, ruff 0.17 among them."""
    def names(path):
        lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
        return {re.split(r"[<>=!~ ]", line)[0].lower(): line for line in lines if line}
    runtime = names(ROOT / "requirements.txt")
    tests = names(ROOT / "tests/requirements.txt")
    assert {"torch", "torchvision"} <= set(runtime)
    assert not {"pytest", "selenium", "ruff"} & set(runtime)
    assert {"pytest", "selenium", "ruff"} <= set(tests)
    from packaging.specifiers import SpecifierSet
    assert "0.17.6" in SpecifierSet(tests["ruff"][len("ruff"):])


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = "./setup.sh --test && .venv/bin/python -m pytest"
    assert command in readme
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    assert ci[-1] == command


# ---------------------------------------------------------------- weights


def test_weights_offline_carries_on(project, tmp_path):
    # Run from another folder: the script must cd to its own folder.
    rc, out = run_setup(project, cwd=tmp_path)
    assert rc == 0, out
    assert "download failed" in out
    assert "offline" in out
    assert "demo needs no download" in out
    assert "https://download.pytorch.org" not in out  # the env URL was used
    assert str(WEIGHTS_REL) in out  # how to fetch it by hand
    assert "sha256 0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a" in out
    assert "--encoder_weights=random checks the" in out  # real data without them
    assert not (project / WEIGHTS_REL).exists()
    assert not (project / f"{WEIGHTS_REL}.part").exists()
    assert ".venv/bin/python flickr_image_caption_with_pytorch_resnet_lstm.py" in out


def test_weights_hash_mismatch_refused(project, tmp_path):
    fake = tmp_path / "fake_resnet50.pth"
    fake.write_bytes(b"not the real weights" * 100)
    rc, out = run_setup(project, env={"RESNET50_URL": file_url(fake)})
    assert rc == 0, out
    assert "hash mismatch" in out
    assert not (project / WEIGHTS_REL).exists()
    assert not (project / f"{WEIGHTS_REL}.part").exists()


def test_corrupt_existing_weights_reported_and_removed(project):
    target = project / WEIGHTS_REL
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated garbage")
    rc, out = run_setup(project)
    assert rc == 0, out
    assert "corrupt" in out
    assert "download failed" in out
    assert not target.exists()
    assert not (project / f"{WEIGHTS_REL}.part").exists()


def test_weights_download_verified_and_then_present(project, tmp_path):
    # The real hash cannot be faked, so patch the expected file name (whose hex
    # tag is the expected sha256 prefix) in this copy of the script.
    payload = b"pretend these are resnet50 weights\n" * 50
    prefix = hashlib.sha256(payload).hexdigest()[:8]
    name = f"resnet50-{prefix}.pth"
    script = project / "setup.sh"
    text = script.read_text()
    assert WEIGHTS_NAME in text
    script.write_text(text.replace(WEIGHTS_NAME, name))
    source = tmp_path / "weights.pth"
    source.write_bytes(payload)
    target = project / "resources/models" / name
    # A corrupt existing file is replaced by a good download.
    target.parent.mkdir(parents=True)
    target.write_bytes(b"corrupt")

    rc, out = run_setup(project, env={"RESNET50_URL": file_url(source)})
    assert rc == 0, out
    assert "corrupt" in out
    assert target.read_bytes() == payload
    assert not target.with_name(name + ".part").exists()

    # Second run: found and verified, nothing downloaded (the URL is now dead).
    rc, out = run_setup(project)
    assert rc == 0, out
    assert "already present" in out
    assert "downloading" not in out and "failed" not in out
    assert target.read_bytes() == payload


# ---------------------------------------------------------------- Flickr8k


def test_flickr8k_from_local_zips_and_second_run(project, tmp_path):
    images_zip, text_zip, names = make_flickr8k_zips(tmp_path / "srv")
    env = flickr_env(images_zip, text_zip)
    rc, out = run_setup(project, "--flickr8k", env=env)
    assert rc == 0, out
    assert_flickr8k_layout(project, names)
    assert "download failed" in out  # the weights step still carried on

    rc, out = run_setup(project, "--flickr8k", env=env)
    assert rc == 0, out
    assert "already there" in out
    assert_flickr8k_layout(project, names)


def test_flickr8k_text_in_subfolder_is_moved_up(project, tmp_path):
    srv = tmp_path / "srv"
    images_zip, text_zip, names = make_flickr8k_zips(srv, text_subfolder="Flickr8k_text/")
    rc, out = run_setup(project, "--flickr8k", env=flickr_env(images_zip, text_zip))
    assert rc == 0, out
    assert_flickr8k_layout(project, names)
    assert not (project / "resources/input/flickr8k/Flickr8k_text").exists()


def test_flickr8k_interrupted_run_recovers(project, tmp_path):
    images_zip, text_zip, names = make_flickr8k_zips(tmp_path / "srv")
    inp = project / "resources/input"
    stale = inp / "flickr8k.tmp"
    (stale / "Flicker8k_Dataset").mkdir(parents=True)
    (stale / "Flicker8k_Dataset" / "junk.jpg").write_bytes(b"junk")
    (stale / "junk.txt").write_text("junk")
    downloads = inp / ".downloads"
    downloads.mkdir()
    (downloads / "Flickr8k_Dataset.zip.part").write_bytes(images_zip.read_bytes()[:100])

    rc, out = run_setup(project, "--flickr8k", env=flickr_env(images_zip, text_zip))
    assert rc == 0, out
    assert_flickr8k_layout(project, names)
    assert not (inp / "flickr8k/junk.txt").exists()


def test_flickr8k_stale_part_from_other_file_recovers(project, tmp_path):
    # A .part that is not a prefix of the zip (e.g. the URL changed): resuming
    # gives a broken zip, so the script must start that download again.
    images_zip, text_zip, names = make_flickr8k_zips(tmp_path / "srv")
    downloads = project / "resources/input/.downloads"
    downloads.mkdir(parents=True)
    (downloads / "Flickr8k_Dataset.zip.part").write_bytes(b"x" * 500)

    rc, out = run_setup(project, "--flickr8k", env=flickr_env(images_zip, text_zip))
    assert rc == 0, out
    assert_flickr8k_layout(project, names)


def test_flickr8k_truncated_complete_zip_is_redownloaded(project, tmp_path):
    images_zip, text_zip, names = make_flickr8k_zips(tmp_path / "srv")
    downloads = project / "resources/input/.downloads"
    downloads.mkdir(parents=True)
    data = images_zip.read_bytes()
    (downloads / "Flickr8k_Dataset.zip").write_bytes(data[: len(data) // 2])
    # A complete text zip is reused as it is.
    shutil.copy2(text_zip, downloads / "Flickr8k_text.zip")

    rc, out = run_setup(
        project,
        "--flickr8k",
        env={"FLICKR8K_IMAGES_URL": file_url(images_zip), "FLICKR8K_TEXT_URL": MISSING_URL},
    )
    assert rc == 0, out
    assert "Flickr8k_Dataset.zip is incomplete or corrupt" in out
    assert "reusing" in out
    assert_flickr8k_layout(project, names)


@pytest.mark.parametrize("broken", ["images", "text"])
def test_flickr8k_download_failure(project, tmp_path, broken):
    images_zip, text_zip, _ = make_flickr8k_zips(tmp_path / "srv")
    env = flickr_env(images_zip, text_zip)
    var = "FLICKR8K_IMAGES_URL" if broken == "images" else "FLICKR8K_TEXT_URL"
    env[var] = MISSING_URL
    rc, out = run_setup(project, "--flickr8k", env=env)
    assert rc != 0, out
    assert var in out
    assert MISSING_URL in out
    assert not (project / "resources/input/flickr8k").exists()
    assert not (project / "resources/input/flickr8k.tmp").exists()


def test_flickr8k_not_a_zip_fails(project, tmp_path):
    not_zip = tmp_path / "error.html"
    not_zip.write_text("<html>404</html>")
    images_zip, text_zip, _ = make_flickr8k_zips(tmp_path / "srv")
    env = flickr_env(images_zip, text_zip)
    env["FLICKR8K_TEXT_URL"] = file_url(not_zip)
    rc, out = run_setup(project, "--flickr8k", env=env)
    assert rc != 0, out
    assert "not a valid zip" in out
    assert "FLICKR8K_TEXT_URL" in out
    assert not (project / "resources/input/flickr8k").exists()
    assert not (project / "resources/input/.downloads/Flickr8k_text.zip.part").exists()


# ---------------------------------------------------------------- the tests' browser (--test)


def stub(folder, name, body):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f"#!/bin/sh\n{body}\n")
    (folder / name).chmod(0o755)


def no_browser_path(tmp_path):
    """A PATH of every command but chromium and chromedriver, as root; apt-get fails."""
    tools = tmp_path / "tools"
    if not tools.exists():
        tools.mkdir()
        for folder in [os.path.dirname(sys.executable), *os.environ["PATH"].split(os.pathsep)]:
            for tool in Path(folder).glob("*") if Path(folder).is_dir() else []:
                wanted = tool.name not in ("chromium", "chromedriver")
                if wanted and not (tools / tool.name).exists():
                    (tools / tool.name).symlink_to(tool)
    stubs = tmp_path / "stubs"
    stub(stubs, "apt-get", f"echo \"$@\" >> {tmp_path / 'calls'}; exit 100")
    stub(stubs, "id", "echo 0")
    return f"{stubs}{os.pathsep}{tools}"


def test_browser_present_is_left_alone(project, tmp_path):
    stubs = tmp_path / "stubs"
    for name in ("chromium", "chromedriver", "apt-get"):
        stub(stubs, name, f"echo {name} >> {tmp_path / 'calls'}; exit 0")
    path = f"{stubs}{os.pathsep}{os.environ['PATH']}"
    rc, out = run_setup(project, "--test", env={"SETUP_SKIP_BROWSER": "0", "PATH": path})
    assert rc == 0 and "chromium and chromedriver are installed" in out
    assert not (tmp_path / "calls").exists()  # nothing run, nothing installed


def test_browser_not_installed_without_test(project, tmp_path):
    rc, out = run_setup(project, env={"SETUP_SKIP_BROWSER": "0", "PATH": no_browser_path(tmp_path)})
    assert rc == 0, out
    assert not (tmp_path / "calls").exists()  # nothing system-wide: apt-get never ran
    assert "chromium" not in out


def test_browser_install_failing_offline_carries_on(project, tmp_path):
    env = {"SETUP_SKIP_BROWSER": "0", "PATH": no_browser_path(tmp_path)}
    rc, out = run_setup(project, "--test", env=env)
    assert rc == 0, out
    assert "no headless Chromium" in out and "apt-get" in out
    assert "setup: done" in out
    calls = (tmp_path / "calls").read_text().splitlines()
    # the install, then a refresh of the package lists that fails too
    assert calls == ["install -y -q chromium chromium-driver", "update -q"]
