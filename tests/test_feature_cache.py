"""The frozen encoder's features, computed once per image and cached."""
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import cap


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "Images"
    folder.mkdir()
    names = []
    for i in range(5):
        Image.new("RGB", (60, 45), (50 * i, 200 - 30 * i, 90)).save(folder / f"{i}.jpg")
        names.append(f"{i}.jpg")
    return folder, names


def cache_args(tmp_path, weights, folder, names, size=32):
    return weights, folder, names, cap.image_transform(size), tmp_path / "cache", torch.device("cpu"), 4, 0


def test_cached_features_equal_per_step_features(tmp_path, images, random_weights):
    folder, names = images
    transform = cap.image_transform(32)
    cache = cap.cached_features(*cache_args(tmp_path, random_weights, folder, names))
    encoder = cap.EncoderCNN(8, cap.load_resnet50(random_weights))
    per_step = encoder.features(torch.stack([cap.load_image(folder / n, transform) for n in cache["images"]]))
    assert cache["images"] == names and cache["features"].shape == (5, 2048)
    assert torch.allclose(cache["features"], per_step, atol=1e-4, rtol=1e-4)
    assert torch.allclose(encoder(cache["features"]), encoder(torch.stack(
        [cap.load_image(folder / n, transform) for n in names])), atol=1e-4)


def test_second_run_reuses_the_cache(tmp_path, images, random_weights, monkeypatch):
    folder, names = images
    first = cap.cached_features(*cache_args(tmp_path, random_weights, folder, names))
    monkeypatch.setattr(cap, "extract_features", lambda *a, **k: pytest.fail("features extracted twice"))
    assert torch.equal(cap.cached_features(*cache_args(tmp_path, random_weights, folder, names))["features"],
                       first["features"])


def test_weights_transform_or_image_list_change_rebuilds(tmp_path, images, random_weights):
    folder, names = images
    cap.cached_features(*cache_args(tmp_path, random_weights, folder, names))
    other = tmp_path / "other.pth"
    state = torch.load(random_weights, weights_only=True)
    state["conv1.weight"] = state["conv1.weight"] * 2
    torch.save(state, other)
    cap.cached_features(*cache_args(tmp_path, other, folder, names))
    cap.cached_features(*cache_args(tmp_path, random_weights, folder, names, size=48))
    cap.cached_features(*cache_args(tmp_path, random_weights, folder, names[:3]))
    assert len(list((tmp_path / "cache").glob("features-*.pt"))) == 4


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_cache_is_rebuilt(tmp_path, images, random_weights, capsys, damage):
    folder, names = images
    first = cap.cached_features(*cache_args(tmp_path, random_weights, folder, names))["features"].clone()
    (path,) = (tmp_path / "cache").glob("features-*.pt")  # memory-mapped: cloned above before it is damaged
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x55  # inside the feature tensor: only the checksum notices
    path.write_bytes(bytes(data))
    rebuilt = cap.cached_features(*cache_args(tmp_path, random_weights, folder, names))
    assert "damaged or stale: rebuilding" in capsys.readouterr().err
    assert torch.equal(rebuilt["features"], first)


def test_unreadable_image_is_left_out_and_named(tmp_path, images, random_weights):
    folder, names = images
    (folder / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    cache = cap.cached_features(*cache_args(tmp_path, random_weights, folder, names + ["bad.jpg"]))
    assert cache["failed"] == ["bad.jpg"] and cache["images"] == names + ["bad.jpg"]  # its row is never read
    assert not cache["features"][-1].any()


def test_an_image_replaced_under_the_same_name_rebuilds(tmp_path, images, random_weights):
    folder, names = images
    first = cap.cached_features(*cache_args(tmp_path, random_weights, folder, names))
    stat = (folder / "2.jpg").stat()
    Image.new("RGB", (60, 45), (0, 0, 255)).save(folder / "2.jpg")  # new content, as a user's fix would be
    os.utime(folder / "2.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a coarse clock could repeat it
    second = cap.cached_features(*cache_args(tmp_path, random_weights, folder, names))
    assert not torch.equal(second["features"][2], first["features"][2])
    assert torch.equal(second["features"][[0, 1, 3, 4]], first["features"][[0, 1, 3, 4]])


def test_the_grid_cache_is_float16_memory_mapped_and_reused(tmp_path, images, random_weights, monkeypatch):
    folder, names = images
    pooled = cap.cached_features(*cache_args(tmp_path, random_weights, folder, names, size=64))["features"]
    grid = cap.cached_features(*cache_args(tmp_path, random_weights, folder, names, size=64), grid_cells=4)
    assert grid["features"].dtype == torch.float16 and grid["features"].shape == (5, 4, 2048)  # 2x2 at 64 px
    assert torch.allclose(grid["features"].float().mean(1), pooled, rtol=1e-2, atol=1e-2)  # its mean is the pool
    files = sorted((tmp_path / "cache").glob("features-*.pt"), key=lambda p: p.stat().st_size)
    assert len(files) == 2 and str(files[1]) in Path("/proc/self/maps").read_text()  # mapped, not read into RAM
    monkeypatch.setattr(cap, "extract_features", lambda *a, **k: pytest.fail("features extracted twice"))
    again = cap.cached_features(*cache_args(tmp_path, random_weights, folder, names, size=64), grid_cells=4)
    assert torch.equal(again["features"], grid["features"])


def test_the_grid_statistics_are_per_channel_over_every_cell():
    features = torch.randn(300, 4, 2048).half() * 3 + 1
    mean, std = cap.feature_statistics(features, list(range(0, 300, 2)))
    rows = features[::2].float().reshape(-1, 2048)
    assert torch.allclose(mean, rows.mean(0), atol=1e-4) and torch.allclose(std, rows.std(0), atol=1e-4)


def test_too_little_disk_space_is_said_before_extracting(tmp_path, images, random_weights, monkeypatch):
    folder, names = images
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(cap.shutil, "disk_usage", lambda path: usage._replace(free=100_000))
    monkeypatch.setattr(cap, "extract_features", lambda *a, **k: pytest.fail("extracted without room"))
    needed = 5 * 49 * 2048 * 2 / 1e9  # 5 grids of 7x7 cells in float16
    with pytest.raises(cap.UserError, match=f"the feature cache needs {needed:.2f} GB in .*cache, and twice that "
                                            f"while it is written, but only 0.00 GB is free: free some space"):
        cap.cached_features(*cache_args(tmp_path, random_weights, folder, names, size=224), grid_cells=49)
