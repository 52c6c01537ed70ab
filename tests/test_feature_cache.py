"""The frozen encoder's features, computed once per image and cached."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import ROOT, SCRIPT, TINY_DEMO, cap, error_line, run_script, shared


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "Images"
    folder.mkdir()
    names = []
    for i in range(5):
        Image.new("RGB", (60, 45), (50 * i, 200 - 30 * i, 90)).save(folder / f"{i}.jpg")
        names.append(f"{i}.jpg")
    return folder, names


def settings(cache, size=32, grid_cells=0, num_workers=0):
    """What cached_features reads of the settings; grid_cells > 0: the attention decoder's grids."""
    return SimpleNamespace(cache_dir=str(cache), image_size=size, batch_size=4, num_workers=num_workers,
                           decoder="attention" if grid_cells else "lstm")


def features(tmp_path, weights, folder, names, size=32, grid_cells=0):
    """cap.cached_features as prepare_data calls it, on the CPU, with a small batch and no worker processes."""
    cfg = settings(tmp_path / "cache", size, grid_cells)
    assert cap.feature_grid_cells(cfg) == grid_cells
    return cap.cached_features(weights, folder, names, cfg, torch.device("cpu"))


def resnet_features(weights, paths, size=32):
    """The pooled features of images, decoded and encoded here, one by one."""
    encoder = cap.EncoderCNN(1, cap.load_resnet50(weights).eval())
    images = torch.stack([cap.image_transform(size)(cap.open_rgb(path)) for path in paths])
    return encoder.grid(images).mean(1)


def cache_file(tmp_path):
    (path,) = (tmp_path / "cache").glob("features-*.pt")
    return path


def file_identity(path):
    """Changes when the file is written again (atomic_save replaces it by a new file)."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def test_cached_features_equal_the_images_encoded_one_by_one(tmp_path, images, random_weights):
    folder, names = images
    cache = features(tmp_path, random_weights, folder, names)
    one_by_one = resnet_features(random_weights, [folder / n for n in cache["images"]])
    assert cache["images"] == names and cache["features"].shape == (5, 2048)
    assert torch.allclose(cache["features"], one_by_one, atol=1e-4, rtol=1e-4)


def test_second_run_reuses_the_cache(tmp_path, images, random_weights, capsys):
    folder, names = images
    first = features(tmp_path, random_weights, folder, names)
    path = cache_file(tmp_path)
    written = file_identity(path)
    assert f"cached in {path}" in capsys.readouterr().out
    again = features(tmp_path, random_weights, folder, names)
    assert f"features: reusing {path} (5 images)" in capsys.readouterr().out
    assert file_identity(path) == written and torch.equal(again["features"], first["features"])


def test_weights_transform_or_image_list_change_rebuilds(tmp_path, images, random_weights):
    folder, names = images
    features(tmp_path, random_weights, folder, names)
    other = tmp_path / "other.pth"
    state = torch.load(random_weights, weights_only=True)
    state["conv1.weight"] = state["conv1.weight"] * 2
    torch.save(state, other)
    features(tmp_path, other, folder, names)
    features(tmp_path, random_weights, folder, names, size=48)
    features(tmp_path, random_weights, folder, names[:3])
    assert len(list((tmp_path / "cache").glob("features-*.pt"))) == 4


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_cache_is_rebuilt(tmp_path, images, random_weights, capsys, damage):
    folder, names = images
    first = features(tmp_path, random_weights, folder, names)["features"].clone()
    (path,) = (tmp_path / "cache").glob("features-*.pt")  # memory-mapped: cloned above before it is damaged
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x55  # inside the feature tensor: only the checksum notices
    path.write_bytes(bytes(data))
    rebuilt = features(tmp_path, random_weights, folder, names)
    assert "damaged or stale: rebuilding" in capsys.readouterr().err
    assert torch.equal(rebuilt["features"], first)


def test_unreadable_image_is_left_out_and_named(tmp_path, images, random_weights):
    folder, names = images
    (folder / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    cache = features(tmp_path, random_weights, folder, names + ["bad.jpg"])
    assert cache["failed"] == ["bad.jpg"] and cache["images"] == names + ["bad.jpg"]  # its row is never read
    assert not cache["features"][-1].any()


def test_an_image_replaced_under_the_same_name_rebuilds(tmp_path, images, random_weights):
    folder, names = images
    first = features(tmp_path, random_weights, folder, names)
    stat = (folder / "2.jpg").stat()
    Image.new("RGB", (60, 45), (0, 0, 255)).save(folder / "2.jpg")  # new content, as a user's fix would be
    os.utime(folder / "2.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a coarse clock could repeat it
    second = features(tmp_path, random_weights, folder, names)
    assert not torch.equal(second["features"][2], first["features"][2])
    assert torch.equal(second["features"][[0, 1, 3, 4]], first["features"][[0, 1, 3, 4]])


def counted(monkeypatch, name):
    """cap.<name> still working, with a list of the first argument of each of its calls."""
    calls, inner = [], getattr(cap, name)

    def counting(*args, **kwargs):
        calls.append(args[0])
        return inner(*args, **kwargs)

    monkeypatch.setattr(cap, name, counting)
    return calls


def test_an_image_is_hashed_again_only_when_its_stat_is_new(tmp_path, images, random_weights, monkeypatch):
    folder, names = images
    hashed, tensor_hashes = counted(monkeypatch, "file_sha256"), counted(monkeypatch, "tensor_sha256")
    first = features(tmp_path, random_weights, folder, names)["features"].clone()
    assert sorted(Path(p).name for p in hashed) == names and len(tensor_hashes) == 1  # when written
    hashed.clear()
    again = features(tmp_path, random_weights, folder, names)["features"]
    assert hashed == [] and len(tensor_hashes) == 1 and torch.equal(again, first)  # nothing read again
    (folder / "3.jpg").write_bytes((folder / "3.jpg").read_bytes())  # the same content, a new mtime
    features(tmp_path, random_weights, folder, names)
    assert hashed == [str(folder.resolve() / "3.jpg")] and len(tensor_hashes) == 1  # the same cache


def test_a_cache_replaced_by_a_copy_is_verified_once(tmp_path, images, random_weights, monkeypatch, capsys):
    folder, names = images
    features(tmp_path, random_weights, folder, names)
    path = cache_file(tmp_path)
    shutil.copy(path, tmp_path / "copy.pt")
    os.replace(tmp_path / "copy.pt", path)  # a new inode: hashed at the next load, then known
    tensor_hashes = counted(monkeypatch, "tensor_sha256")
    for _ in range(2):
        features(tmp_path, random_weights, folder, names)
    assert len(tensor_hashes) == 1 and "reusing" in capsys.readouterr().out and cache_file(tmp_path) == path


def test_tokens_and_statistics_are_kept_until_the_captions_or_the_split_change(tmp_path, random_weights,
                                                                             monkeypatch):
    folder = tmp_path / "data"
    (folder / "Images").mkdir(parents=True)
    names = [f"{i}.jpg" for i in range(10)]
    for i, name in enumerate(names):
        Image.new("RGB", (40, 30), (25 * i, 90, 200 - 20 * i)).save(folder / "Images" / name)
    rows = [(name, f"a picture , number {i} .") for i, name in enumerate(names)]
    pd.DataFrame(rows, columns=["image", "caption"]).to_csv(folder / "captions.txt", index=False)

    def prepared(*extra):
        args = ["--dataset=flickr8k", f"--data_dir={folder}", f"--cache_dir={tmp_path / 'cache'}", "--image_size=32",
                f"--encoder_weights={random_weights}", "--num_workers=0", "--freq_threshold=1", *extra]
        return cap.prepare_data(cap.resolve_settings(cap.parse_args(args)[0]), torch.device("cpu"), build_vocab=True)

    tokenized, statistics = [], counted(monkeypatch, "feature_statistics")
    tokenize = cap.Vocabulary.tokenize
    monkeypatch.setattr(cap.Vocabulary, "tokenize", staticmethod(lambda text: tokenized.append(text) or tokenize(text)))
    first = prepared()
    assert len(tokenized) == 10 and len(statistics) == 1
    tokenized.clear()
    again = prepared()  # a warm start: both read back, the same
    assert tokenized == [] and len(statistics) == 1
    assert again.frame["tokens"].tolist() == first.frame["tokens"].tolist() == [
        ["a", "picture", ",", "number", str(i), "."] for i in range(10)]
    assert all(torch.equal(a, b) and a.dtype == torch.float32 for a, b in zip(again.feature_stats, first.feature_stats))
    other_split = prepared("--seed=5")
    assert tokenized == [] and len(statistics) == 2
    assert other_split.images("train") != first.images("train")
    rows[3] = ("3.jpg", "a new caption")
    pd.DataFrame(rows, columns=["image", "caption"]).to_csv(folder / "captions.txt", index=False)
    changed = prepared()
    assert "a new caption" in tokenized and changed.frame["tokens"][3] == ["a", "new", "caption"]
    assert len(statistics) == 2  # the same images and split


def test_the_grid_cache_is_float16_memory_mapped_and_reused(tmp_path, images, random_weights, capsys):
    folder, names = images
    pooled = features(tmp_path, random_weights, folder, names, size=64)["features"]
    grid = features(tmp_path, random_weights, folder, names, size=64, grid_cells=4)
    assert grid["features"].dtype == torch.float16 and grid["features"].shape == (5, 4, 2048)  # 2x2 at 64 px
    assert torch.allclose(grid["features"].float().mean(1), pooled, rtol=1e-2, atol=1e-2)  # its mean is the pool
    files = sorted((tmp_path / "cache").glob("features-*.pt"), key=lambda p: p.stat().st_size)
    assert len(files) == 2 and str(files[1]) in Path("/proc/self/maps").read_text()  # mapped, not read into RAM
    written = file_identity(files[1])
    capsys.readouterr()
    again = features(tmp_path, random_weights, folder, names, size=64, grid_cells=4)
    assert f"features: reusing {files[1]} (5 images)" in capsys.readouterr().out and file_identity(files[1]) == written
    assert torch.equal(again["features"], grid["features"])


def test_the_grid_statistics_are_per_channel_over_every_cell():
    features = torch.randn(300, 4, 2048).half() * 3 + 1
    mean, std = cap.feature_statistics(features, list(range(0, 300, 2)))
    rows = features[::2].float().reshape(-1, 2048)
    assert torch.allclose(mean, rows.mean(0), atol=1e-4) and torch.allclose(std, rows.std(0), atol=1e-4)


def test_too_little_disk_space_is_said_before_extracting(tmp_path, images, random_weights, monkeypatch):
    folder, names = images
    usage = shutil.disk_usage(tmp_path)
    # no public way to fill a disk here (no tmpfs of our own can be mounted): the free space is what is faked
    monkeypatch.setattr(cap.shutil, "disk_usage", lambda path: usage._replace(free=100_000))
    needed = 5 * 49 * 2048 * 2 / 1e9  # 5 grids of 7x7 cells in float16
    with pytest.raises(cap.UserError, match=f"the feature cache needs {needed:.2f} GB in .*cache, and twice that "
                                            f"while it is written, but only 0.00 GB is free: free some space"):
        features(tmp_path, random_weights, folder, names, size=224, grid_cells=49)
    # said before extracting: neither a scratch file nor a cache was started
    # the images' sha256 index alone
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == ["sha256-index.json"]


def test_an_image_replaced_by_one_of_the_same_size_and_time_is_extracted_again(tmp_path, random_weights):
    """The cache is keyed by each image's content: a fix copied over a bad image with its size and mtime kept
    (as shutil.copy2 or rsync -t may leave it) is not mistaken for the old image."""
    folder = tmp_path / "Images"
    folder.mkdir()
    names = [f"{i}.bmp" for i in range(4)]  # BMP: every image of one size is the same number of bytes
    for i, name in enumerate(names):
        Image.new("RGB", (40, 30), (60 * i, 40, 200 - 50 * i)).save(folder / name)
    first = features(tmp_path, random_weights, folder, names)["features"].clone()
    replaced, stat = folder / "2.bmp", (folder / "2.bmp").stat()
    Image.new("RGB", (40, 30), (250, 250, 20)).save(tmp_path / "fix.bmp")
    shutil.copy2(tmp_path / "fix.bmp", replaced)  # into the same file (the same inode), then its old times back
    os.utime(replaced, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = replaced.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    second = features(tmp_path, random_weights, folder, names)["features"]
    assert not torch.allclose(second[2], first[2], atol=1e-3)  # the new image's features, not the cached ones
    assert torch.equal(second[[0, 1, 3]], first[[0, 1, 3]])
    assert torch.allclose(second[2], resnet_features(random_weights, [replaced])[0], atol=1e-4, rtol=1e-4)


RUN_CACHED_FEATURES = """
import sys, time
from pathlib import Path
import torch
from types import SimpleNamespace
sys.path.insert(0, sys.argv[1])
import flickr_image_caption_with_pytorch_resnet_lstm as cap
folder, weights, cache, ready, go = map(Path, sys.argv[2:7])
ready.touch()
while not go.exists():  # both processes start their work at once
    time.sleep(0.01)
names = sorted(p.name for p in folder.iterdir())
cfg = SimpleNamespace(cache_dir=cache, image_size=32, batch_size=4, num_workers=0, decoder="lstm")
result = cap.cached_features(weights, folder, names, cfg, torch.device("cpu"))
print("features sha256", cap.tensor_sha256(result["features"]), len(result["images"]))
"""


def test_two_runs_sharing_a_cache_dir_take_turns(tmp_path, images, random_weights):
    folder, names = images
    cache, go = tmp_path / "cache", tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    runs = [subprocess.Popen([sys.executable, "-c", RUN_CACHED_FEATURES, str(ROOT), str(folder), str(random_weights),
                              str(cache), str(tmp_path / f"ready{i}"), str(go)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path) for i in range(2)]
    try:
        deadline = time.time() + 120
        while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.time() < deadline:
            time.sleep(0.05)
        go.touch()
        outputs = [run.communicate(timeout=180) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    (path,) = cache.glob("features-*.pt")
    # no scratch or tmp left; the index of the images' and the cache's sha256
    assert sorted(p.name for p in cache.iterdir()) == [path.name, path.name + ".lock", "sha256-index.json"]
    extracted = [out for out, _ in outputs if f"cached in {path}" in out]
    reused = [out for out, _ in outputs if f"features: reusing {path} (5 images)" in out]
    assert len(extracted) == 1 and len(reused) == 1  # the second waited for the first, then read its cache
    cached = torch.load(path, weights_only=True)["features"]
    sums = [line for out, _ in outputs for line in out.splitlines() if line.startswith("features sha256")]
    assert sums == [f"features sha256 {cap.tensor_sha256(cached)} 5"] * 2  # both read the one cache file


WRITE_WITH_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
from pathlib import Path
import torch
from types import SimpleNamespace
sys.path.insert(0, sys.argv[1])
import flickr_image_caption_with_pytorch_resnet_lstm as cap
folder, weights, cache, limit = Path(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails (EFBIG), as on a full disk (ENOSPC)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
names = sorted(p.name for p in folder.iterdir())
try:
    cfg = SimpleNamespace(cache_dir=cache, image_size=32, batch_size=4, num_workers=0, decoder="lstm")
    cap.cached_features(weights, folder, names, cfg, torch.device("cpu"))
except cap.UserError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
"""


def test_a_cache_that_cannot_be_written_is_one_line_and_leaves_nothing_behind(tmp_path, images, random_weights):
    """A real failing write, not a patched torch.save: a file-size limit lets the scratch file of the extracted
    features (5 x 2048 float32) be written, and stops the cache file, which holds a little more, part way."""
    folder, names = images
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run([sys.executable, "-c", WRITE_WITH_A_FILE_SIZE_LIMIT, str(ROOT), str(folder),
                             str(random_weights), str(tmp_path / "cache"), str(5 * 2048 * 4)], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=180)
    assert result.returncode == 2, result.stderr[-3000:]
    # no cache, no temporary file, no scratch file of the features: the lock and the images' sha256 index
    lock, index = sorted((tmp_path / "cache").iterdir())
    path = lock.with_suffix("")
    assert index.name == "sha256-index.json" and str(path.name) not in index.read_text()
    assert lock.name.endswith(".pt.lock") and "cached in" not in result.stdout
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert line.startswith(f"error: cannot write {path}: ") and "Traceback" not in result.stderr
    assert line.endswith(f"Free some space or choose another folder; the previous {path.name}, if any, is intact")
    cache = features(tmp_path, random_weights, folder, names)  # with room again: written as usual
    assert cache_file(tmp_path) == path and cache["features"].shape == (5, 2048) and cache["features"].any()


def test_decoding_processes_give_the_features_one_process_gives(tmp_path, random_weights):
    """Real 500x375 Flickr JPEGs, a PNG and a damaged file decoded by 2 worker processes: the same
    features as in this process, and the same image skipped."""
    real = sorted(shared("flickr8k-mini", "Images").iterdir())[:6]
    for path in real:
        shutil.copy(path, tmp_path / path.name)
    Image.open(real[0]).rotate(90, expand=True).save(tmp_path / "turned.png")
    (tmp_path / "broken.jpg").write_bytes(real[1].read_bytes()[:500])
    paths = sorted(tmp_path.iterdir())
    resnet = cap.EncoderCNN(1, cap.load_resnet50(random_weights))
    device = torch.device("cpu")
    alone, unread = cap.extract_features(resnet, paths, settings(tmp_path, 64), device)
    workers, unread_too = cap.extract_features(resnet, paths, settings(tmp_path, 64, num_workers=2), device)
    assert [paths[i].name for i in unread] == ["broken.jpg"] and unread_too == unread
    assert torch.equal(alone, workers)


def test_the_number_of_decoding_processes_fits_the_open_file_limit(monkeypatch):
    cfg = SimpleNamespace(num_workers=-1)
    monkeypatch.setattr(cap.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(cap.resource, "setrlimit", lambda *args: None)
    monkeypatch.setattr(cap.resource, "getrlimit", lambda what: (4096, 4096))
    assert cap.decoding_workers(cfg) == 16  # one per core, at most 16
    monkeypatch.setattr(cap.resource, "getrlimit", lambda what: (100, 100))
    assert cap.decoding_workers(cfg) == 3
    monkeypatch.setattr(cap.resource, "getrlimit", lambda what: (30, 30))
    with pytest.raises(cap.UserError, match="ulimit -n"):
        cap.decoding_workers(cfg)


def test_a_run_with_few_open_files_allowed_is_one_line(tmp_path, random_weights):
    """ulimit -n 30 once made the decoding processes hang; it is one line and exit code 2."""
    args = [*TINY_DEMO, "--num_workers=-1", f"--data_dir={tmp_path / 'data'}", f"--cache_dir={tmp_path / 'c'}",
            f"--encoder_weights={random_weights}", f"--output_dir={tmp_path / 'out'}"]
    result = subprocess.run(["bash", "-c", 'ulimit -n 30 && exec "$@"', "bash", sys.executable, str(SCRIPT),
                             *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "ulimit -n" in error_line(result.stderr)


def test_a_read_only_cache_dir_without_the_features_is_one_line(tmp_path, random_weights):
    args = [*TINY_DEMO, f"--data_dir={tmp_path / 'data'}", "--cache_dir=/proc/no-cache-here",
            f"--encoder_weights={random_weights}", f"--output_dir={tmp_path / 'out'}"]
    result = run_script(*args)
    assert result.returncode == 2 and "--cache_dir=/proc/no-cache-here" in error_line(result.stderr)


def decoders(pid):
    """The processes pid started (the DataLoader's decoding workers)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return path.read_text().split() if path.exists() else []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_the_process_group_during_extraction_leaves_no_scratch_file(tmp_path, random_weights, sig):
    """As a scheduler or a closed terminal sends it, to every process: the decoding processes leave it to the main
    one, which stops them, so the end is the same whichever process it reaches first."""
    cache = tmp_path / "cache"
    args = [*TINY_DEMO, "--demo_images=300", "--num_workers=2", f"--data_dir={tmp_path / 'data'}",
            f"--cache_dir={cache}", f"--encoder_weights={random_weights}", f"--output_dir={tmp_path / 'out'}"]
    process = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while len(decoders(process.pid)) < 2 and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert list(cache.glob("*.scratch")) and len(decoders(process.pid)) == 2, "extraction never started"
    os.killpg(process.pid, sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted" in err, err[-2000:]
    assert "Traceback" not in err and "Exception ignored" not in err and "killed by signal" not in err, err[-2000:]
    assert not list(cache.glob("*.scratch")) and not list(cache.glob("*.tmp"))


def test_a_disk_that_fills_during_extraction_is_one_line_and_leaves_no_scratch_file(tmp_path, images, random_weights,
                                                                                    monkeypatch):
    """The free-space check passes (here: it is told of more room than there is, as when another process fills the
    disk after it), then the scratch file's space is reserved: ENOSPC, one line, and not a SIGBUS while the
    features are written through its memory map."""
    cache = tmp_path / "cache"
    cache.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(cache)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"no tmpfs can be mounted here (it takes root): {mounted.stderr.strip()}")
    try:
        monkeypatch.setattr(cap.shutil, "disk_usage", lambda path: SimpleNamespace(free=10 ** 12))
        with pytest.raises(cap.UserError, match=r"^cannot write the features \(0.00 GB\) in --cache_dir=.*cache: "
                                                r"No space left on device; free some space or use another$"):
            features(tmp_path, random_weights, *images)
        left = [p.name for p in cache.iterdir() if not p.name.endswith(".lock")]
        assert left in ([], ["sha256-index.json"])  # the images' hashes, whole: no features, no scratch
    finally:
        subprocess.run(["umount", str(cache)])


def test_a_killed_runs_scratch_is_removed_and_a_read_only_cache_is_reused(tmp_path, images, random_weights,
                                                                           monkeypatch):
    folder, names = images
    first = features(tmp_path, random_weights, folder, names)
    path = cache_file(tmp_path)
    stale = [path.with_name(f"{path.name}.{end}") for end in ("99999.scratch", "99999.tmp")]
    mine = path.with_name(f"{path.name}.bak")  # a user's copy, not a run's: it stays
    for file in [*stale, mine]:
        file.write_bytes(b"left by kill -9")
    features(tmp_path, random_weights, folder, names)
    assert not any(file.exists() for file in stale) and mine.exists()
    real_open = open

    def read_only(file, mode="r", *args, **kwargs):  # as on a read-only mount: nothing can be created there
        if str(file).startswith(str(tmp_path / "cache")) and mode != "rb" and mode != "r":
            raise PermissionError(30, "Read-only file system")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    again = features(tmp_path, random_weights, folder, names)
    assert torch.equal(again["features"], first["features"])


def test_a_write_with_a_file_where_its_folder_should_be_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(cap.UserError, match="cannot write .*afile/x.pt: .*the previous x.pt, if any, is intact"):
        cap.atomic_save({"a": 1}, tmp_path / "afile" / "x.pt")
