"""The built-in demo set: how it is made (and what it never touches), how its captions are scored, and whether the
demo model reads the image, even shapes another renderer drew."""
import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import cap, error_line, run_script

# Measured on tests/conftest.py's SMALL_DEMO (2-core CPU): about 77% of held-out single-shape images got the right
# colour and shape on the fixed-rendering demo, 38% on issue 10's first varied demo (8 epochs, five captions of
# six word orders, two-layer decoder); on the next (three captions per image, the left shape named first;
# one-layer decoder, cosine schedule) 54% after 8 epochs and 76.2% after 16 (blind, 4.8%); on the current one (two
# shapes at their own heights, which may share a colour or a shape; best.pt by val demo_accuracy) 70.6%.
DEMO_ACCURACY_FLOOR = 0.5
BLIND_ACCURACY_CEILING = 0.25
# Measured: on shapes drawn by render_shapes below the small demo model gets 80.0% (its own held-out images:
# 70.6%); the full demo run's pooled model 92.7% (its own: 90.5%)
SECOND_RENDERER_SHARE = 0.75


# making the demo set
def test_the_demo_can_finish_its_longest_caption():
    longest = max(len(t.split()) for t in cap.DEMO_CAPTIONS[1] + cap.DEMO_CAPTIONS[2])  # '{c}': one word
    cfg = cap.resolve_settings(cap.parse_args(["--dataset=demo"])[0])
    assert cfg.max_caption_len > longest  # and then <EOS>: the original's 20 cut the full stop off


def test_demo_set_is_made_once_and_never_over_a_users_folder(tmp_path):
    folder = cap.make_demo_dataset(tmp_path / "demo", n_images=12, size=32)
    frame = pd.read_csv(folder / "captions.txt")
    assert len(list((folder / "Images").iterdir())) == 12 and len(frame) == 12 * cap.DEMO_CAPTIONS_PER_IMAGE
    stamp = (folder / "demo.json").stat().st_mtime_ns
    cap.make_demo_dataset(folder, n_images=12, size=32)
    assert (folder / "demo.json").stat().st_mtime_ns == stamp  # reused, not remade
    mine = tmp_path / "my_photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(cap.UserError, match="holds files but no demo set"):
        cap.make_demo_dataset(mine, n_images=12, size=32)
    assert (mine / "holiday.jpg").read_bytes() == b"precious"


def test_remaking_the_demo_set_keeps_every_other_file(tmp_path):
    folder = cap.make_demo_dataset(tmp_path / "demo", n_images=12, size=32)
    (folder / "keep.txt").write_text("mine")
    (folder / "best.pt").write_bytes(b"a trained model")
    cap.make_demo_dataset(folder, n_images=8, size=24)  # other settings: the demo set is remade in place
    assert (folder / "keep.txt").read_text() == "mine" and (folder / "best.pt").read_bytes() == b"a trained model"
    assert sorted(p.name for p in folder.iterdir()) == ["Images", "best.pt", "captions.txt", "demo.json",
                                                       "keep.txt", "shapes.csv"]
    captions = pd.read_csv(folder / "captions.txt")
    assert len(list((folder / "Images").iterdir())) == 8 and len(captions) == 8 * cap.DEMO_CAPTIONS_PER_IMAGE
    assert json.loads((folder / "demo.json").read_text())["images"] == 8
    assert Image.open(folder / "Images" / "demo_00000.jpg").size == (24, 24)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temporary folder left beside it


def test_a_rebuild_keeps_the_users_own_files_in_its_images_folder(tmp_path):
    folder = cap.make_demo_dataset(tmp_path / "demo", n_images=12, size=32)
    mine = {"holiday.jpg": b"precious", "demo_1.jpg": b"not the demo's: four digits short", "notes.txt": b"mine"}
    for name, content in mine.items():
        (folder / "Images" / name).write_bytes(content)
    cap.make_demo_dataset(folder, n_images=8, size=24)  # demo_images changed: rebuilt
    demo = [f"demo_{i:05d}.jpg" for i in range(8)]  # demo_00008.jpg to demo_00011.jpg are gone
    assert sorted(p.name for p in (folder / "Images").iterdir()) == sorted(demo + list(mine))
    assert all((folder / "Images" / name).read_bytes() == content for name, content in mine.items())
    assert sorted(pd.read_csv(folder / "captions.txt")["image"].unique()) == demo  # the demo's own images only
    assert Image.open(folder / "Images" / "demo_00007.jpg").size == (24, 24)


def test_the_demo_refuses_a_data_dir_that_is_a_file(tmp_path, random_weights, capsys):
    (tmp_path / "afile").write_text("mine")
    assert cap.main(["--dataset=demo", "--demo_images=30", f"--data_dir={tmp_path / 'afile'}",
                     f"--output_dir={tmp_path / 'out'}", f"--cache_dir={tmp_path / 'cache'}",
                     f"--encoder_weights={random_weights}"]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"--data_dir={tmp_path / 'afile'} is a file" in line
    assert (tmp_path / "afile").read_text() == "mine" and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("where", ["under_a_file", "full_disk"])
def test_a_demo_data_dir_under_a_file_or_on_a_disk_that_fills_is_one_line(tmp_path, random_weights, where):
    """One line naming data_dir and the system's reason, no traceback (a tmpfs of 64 KiB fills)."""
    (tmp_path / "afile").write_text("mine")
    data = tmp_path / "afile" / "data" if where == "under_a_file" else tmp_path / "small"
    if where == "full_disk":
        data.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(data)], capture_output=True)
        if mounted.returncode:
            pytest.skip(f"no tmpfs can be mounted here (it takes root): {mounted.stderr.strip()}")
    try:
        result = run_script("--dataset=demo", "--demo_images=30", f"--data_dir={data}", f"--output_dir={tmp_path / 'o'}",
                            f"--cache_dir={tmp_path / 'cache'}", f"--encoder_weights={random_weights}")
        line = error_line(result.stderr)
        assert result.returncode == 2 and ("No space left" if where == "full_disk" else "Not a directory") in line
        assert f"--data_dir={data}" in line and (tmp_path / "afile").read_text() == "mine"
    finally:
        if where == "full_disk":
            subprocess.run(["umount", str(data)])


@pytest.mark.parametrize("n", [3, 1])
def test_too_few_demo_images_are_refused_naming_demo_images(tmp_path, random_weights, capsys, n):
    """Not a later, unrelated failure (an empty vocabulary at freq_threshold, a split of max_images)."""
    assert cap.main(["--dataset=demo", f"--demo_images={n}", f"--data_dir={tmp_path / 'data'}",
                     f"--output_dir={tmp_path / 'out'}", f"--cache_dir={tmp_path / 'cache'}",
                     f"--encoder_weights={random_weights}"]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: --demo_images={n}: must be at least 30 on the demo")
    assert "freq_threshold" not in line and "max_images" not in line
    assert list(tmp_path.iterdir()) == []  # refused before the demo set or anything else was written


def test_demo_images_vary_and_two_shape_captions_say_where(tmp_path):
    folder = cap.make_demo_dataset(tmp_path / "demo", n_images=40, size=48)
    shapes = pd.read_csv(folder / "shapes.csv").set_index("image")["shapes"]
    captions = pd.read_csv(folder / "captions.txt")
    two = captions[captions["image"].map(shapes).str.contains(";")]
    assert len(two) and (two["caption"].map(cap.demo_placement) == two["image"].map(shapes)).all()
    pixels = {name: np.asarray(Image.open(folder / "Images" / name)) for name in shapes.index}
    corners = {tuple(p[0, 0]) for p in pixels.values()}
    assert len(corners) > 10  # background shades vary, not three exact colours
    singles = [pixels[name] for name in shapes.index if ";" not in shapes[name]]
    areas = [(np.abs(p.astype(int) - p[0, 0]).sum(-1) > 60).mean() for p in singles]
    assert np.std(areas) > 0.1 * np.mean(areas)  # shape sizes vary


# scoring the demo's captions
@pytest.mark.parametrize("caption, placed", [
    ("a red circle on the left and a blue square on the right .", "red circle;blue square"),
    ("a red circle to the left of a blue square .", "red circle;blue square"),
    ("a blue square to the right of a red circle .", "red circle;blue square"),
    ("there is a blue square on the right and a red circle on the left .", "red circle;blue square"),
    ("a blue square on the left , a red circle on the right .", "blue square;red circle"),
    ("a red circle and a blue square .", None),  # no placement
    ("a red circle on the left and a blue square .", None),  # one left unplaced
    ("a red circle on the left and a blue square on the left .", None),  # contradicts itself
    ("a red circle to the left of a blue square on the left .", None),
    ("a red or green circle on the left and a blue square on the right .", None),  # hedging
    ("a red circle on the left and a blue square on the right and a green triangle .", None),  # an extra object
    ("a red circle on the left and a blue square on the right of a triangle .", None),  # a stray shape word
    ("a red circle on the left .", None)])
def test_two_shape_captions_are_read_strictly(caption, placed):
    assert cap.demo_placement(caption) == placed


def test_demo_accuracy_scores_single_and_two_shape_images_apart(tmp_path):
    pd.DataFrame([("a.jpg", "red circle"), ("b.jpg", "red circle;blue square"), ("c.jpg", "green square;red circle"),
                  ("d.jpg", "blue triangle")], columns=["image", "shapes"]).to_csv(tmp_path / "shapes.csv")
    captions = {"a.jpg": "a red circle .", "b.jpg": "a red circle to the left of a blue square .",
                "c.jpg": "a red circle on the left and a green square on the right .",  # swapped sides: wrong
                "d.jpg": "a blue triangle next to a blue square ."}  # an extra object: wrong
    truth = cap.demo_truth(tmp_path)
    assert cap.demo_accuracy(captions, truth) == (0.5, 2)
    assert cap.demo_accuracy(captions, truth, n_shapes=2) == (0.5, 2)
    assert cap.demo_accuracy(captions, truth, n_shapes=None) == (0.5, 4)


def greedy_settings(cfg):
    """The demo's figures come from greedy captions (demo_scores)."""
    return dataclasses.replace(cfg, beam_size=1)


# the trained demo model (conftest's trained_demo)
def test_the_demo_figures_are_what_demo_accuracy_makes_of_the_greedy_captions(trained_demo, trained_run):
    """The test report's demo figures, recomputed from the checkpoint's greedy captions of the test images."""
    model, data, cfg = trained_run
    report = json.loads((trained_demo / "test_metrics.json").read_text())
    greedy = cap.generate_captions(model, data.source, data.images("test"), greedy_settings(cfg), torch.device("cpu"))
    shapes = cap.demo_truth(cfg.data_dir)
    (single, n_single), (two, n_two) = (cap.demo_accuracy(greedy, shapes, n) for n in (1, 2))
    assert sorted(greedy) == sorted(data.images("test")) and n_single + n_two == report["images"] == 100 and n_two > 10
    assert report["demo_colour_shape_accuracy"] == pytest.approx(100 * single)  # stored x100
    assert report["demo_two_shape_accuracy"] == pytest.approx(100 * two)
    assert report["demo_accuracy"] == pytest.approx(100 * cap.demo_accuracy(greedy, shapes, None)[0])  # all images


def test_demo_model_reads_the_image(trained_demo, trained_run):
    seeing = json.loads((trained_demo / "test_metrics.json").read_text())["demo_colour_shape_accuracy"] / 100
    model, data, cfg = trained_run
    names = data.images("test")
    # the same model, blind: every image's features replaced by the training set's mean
    blind_source = cap.ImageSource(data.source.image_dir,
                                   model.encoder.feature_mean.expand(len(names), -1), names)
    blind = cap.generate_captions(model, blind_source, names, greedy_settings(cfg), torch.device("cpu"))
    blind_accuracy, singles = cap.demo_accuracy(blind, cap.demo_truth(cfg.data_dir))
    assert singles >= 50
    assert seeing >= DEMO_ACCURACY_FLOOR and blind_accuracy <= BLIND_ACCURACY_CEILING, (seeing, blind_accuracy)


def test_the_demo_model_reads_shapes_drawn_by_another_renderer(tmp_path, trained_demo, random_weights):
    """A model that learnt the demo's exact pixels would fall to chance (1/12) on another renderer's shapes."""
    own = json.loads((trained_demo / "test_metrics.json").read_text())["demo_colour_shape_accuracy"] / 100
    single, two = second_renderer_accuracy(trained_demo / "best.pt", random_weights, tmp_path / "shapes")
    print(f"second renderer: {single:.1%} of single-shape images right (the demo's own: {own:.1%}), {two:.1%} of "
          f"two-shape images")
    assert single >= SECOND_RENDERER_SHARE * own and single >= 3 / 12, (single, own)


# A second renderer, independent of the demo's (PIL drawing, downscaled, saved as JPEG): shapes rasterised here
# by supersampled coverage, in its own palette, at other sizes, saved as PNG, BMP and WebP. A model that learnt
# shapes rather than the demo's exact pixels captions these as well.
PALETTE = {"red": (205, 35, 45), "green": (45, 165, 75), "blue": (35, 70, 215), "yellow": (245, 220, 45)}
BACKGROUNDS = [(250, 250, 250), (120, 120, 120), (10, 10, 10), (228, 228, 228), (140, 140, 140)]


def coverage(shape, size, x, y, r, supersample=4):
    """The share of each pixel (size, size) inside the shape centred at (x, y) with half-extent r (pixels)."""
    py, px = (np.mgrid[0:size * supersample, 0:size * supersample] + 0.5) / supersample
    if shape == "circle":
        inside = (px - x) ** 2 + (py - y) ** 2 <= r ** 2
    elif shape == "square":
        inside = (abs(px - x) <= r) & (abs(py - y) <= r)
    else:  # apex up, base at the bottom
        inside = (py <= y + r) & (abs(px - x) <= (py - (y - r)) / 2)
    return inside.reshape(size, supersample, size, supersample).mean((1, 3))


def render_shapes(folder, n_images, seed=0):
    """Writes n_images (half with one shape, half with two) into folder: {file name: 'colour shape[;colour shape]',
    left to right}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i in range(n_images):
        size, ext = int(rng.choice([80, 150, 200])), [".png", ".bmp", ".webp"][i % 3]
        objects = [(str(rng.choice(list(PALETTE))), str(rng.choice(cap.DEMO_SHAPES))) for _ in range(1 + i % 2)]
        places = [(0.5, 0.5, rng.uniform(0.25, 0.35))] if len(objects) == 1 else \
            [(rng.uniform(0.24, 0.27), 0.5, 0.17), (rng.uniform(0.73, 0.76), 0.5, 0.17)]
        pixels = np.broadcast_to(np.array(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], float), (size, size, 3))
        for (colour, shape), (x, y, r) in zip(objects, places):
            alpha = coverage(shape, size, x * size, y * size, r * size)[..., None]
            pixels = pixels * (1 - alpha) + np.array(PALETTE[colour]) * alpha
        name = f"shapes_{i:03d}{ext}"
        Image.fromarray(pixels.round().astype(np.uint8)).save(folder / name)  # WebP: lossy, quality 80
        truth[name] = ";".join(f"{c} {s}" for c, s in objects)
    return truth


def second_renderer_accuracy(checkpoint, weights, folder, n_images=90):
    """The greedy captions' accuracy on render_shapes' images: (single-shape, two-shape) shares."""
    truth = render_shapes(Path(folder), n_images)
    pd.DataFrame(list(truth.items()), columns=["image", "shapes"]).to_csv(Path(folder) / "shapes.csv", index=False)
    model, _ = cap.restore(checkpoint)
    cfg = cap.resolve_settings({"dataset": "flickr8k", "num_workers": 0, "image_size": model.args["image_size"]})
    names = sorted(truth)
    features, unread = cap.extract_features(cap.EncoderCNN(1, cap.load_resnet50(weights)), [Path(folder) / n for n in names], cfg,
                                            torch.device("cpu"))
    assert not unread
    source = cap.ImageSource(folder, features, names)
    captions = cap.generate_captions(model.eval(), source, names, greedy_settings(cfg), torch.device("cpu"))
    assert list(captions) == names
    return tuple(cap.demo_accuracy(captions, cap.demo_truth(folder), n)[0] for n in (1, 2))
