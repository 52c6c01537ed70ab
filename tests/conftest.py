import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

import flickr_image_caption_with_pytorch_resnet_lstm as cap  # noqa: E402

SCRIPT = ROOT / "flickr_image_caption_with_pytorch_resnet_lstm.py"
# A small demo run that still shows the model reading the image (see tests/test_training.py for figures).
SMALL_DEMO = ["--dataset=demo", "--demo_images=1000", "--image_size=96", "--num_epochs=16",
              "--batch_size=32", "--learning_rate=0.002", "--embed_size=128", "--hidden_size=256",
              "--sample_every=0", "--num_workers=0", "--seed=3"]


def greedy_decode(decoder, image_embeds, max_len):
    """The reference that beam search with beam_size=1 must match: the most likely word at each step."""
    state = decoder.start(image_embeds)
    tokens = torch.full((image_embeds.size(0),), cap.Vocabulary.SOS)
    steps = []
    for t in range(max_len):
        logp, state = decoder.step(tokens, state, first=t == 0)
        tokens = logp.argmax(-1)
        steps.append(tokens)
    ids = torch.stack(steps, 1).tolist()
    return [seq[:seq.index(cap.Vocabulary.EOS)] if cap.Vocabulary.EOS in seq else seq for seq in ids]


def shared(*parts):
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the team's shared data is not beside this clone)")
    return path


def run_script(*args, timeout=300, **kwargs):
    """Runs the script as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kwargs)


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory):
    """A random-init ResNet50 .pth, as a user's downloaded file would hold real weights."""
    path = tmp_path_factory.mktemp("weights") / "resnet50-test.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def demo_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    return {"data_dir": base / "data", "cache_dir": base / "cache"}


def demo_args(demo_dirs, weights, out, *extra):
    return [*SMALL_DEMO, f"--data_dir={demo_dirs['data_dir']}", f"--cache_dir={demo_dirs['cache_dir']}",
            f"--encoder_weights={weights}", f"--output_dir={out}", *extra]


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory, demo_dirs, random_weights):
    """One small demo training run shared by the tests that need a trained model."""
    out = tmp_path_factory.mktemp("demo_out")
    assert cap.main(demo_args(demo_dirs, random_weights, out)) == 0
    return out


@pytest.fixture(scope="session")
def trained_run(trained_demo, demo_dirs, random_weights):
    """The trained demo model (best.pt), its data and settings, loaded as the script itself loads them."""
    cfg = cap.resolve_settings(cap.parse_args(demo_args(demo_dirs, random_weights, trained_demo))[0])
    model = cap.restore(trained_demo / "best.pt").model
    return model.eval(), cap.prepare_data(cfg, torch.device("cpu")), cfg


@pytest.fixture(scope="session")
def trained_attention(tmp_path_factory, demo_dirs, random_weights, trained_demo):
    """A short attention-decoder run on the same demo set (after trained_demo, which makes it): enough for its
    checkpoint, grid cache and figures, not for good captions."""
    out = tmp_path_factory.mktemp("attention_out")
    assert cap.main(demo_args(demo_dirs, random_weights, out, "--decoder=attention", "--num_epochs=1",
                              "--max_batches_per_epoch=20", "--beam_size=1")) == 0
    return out


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
    model = cap.restore(checkpoint).model
    model.encoder.attach(cap.load_resnet50(weights))
    source = cap.ImageSource(folder, cap.image_transform(model.args["image_size"]))
    cfg = cap.resolve_settings({"dataset": "flickr8k", "num_workers": 0})
    captions, failed = cap.generate_captions(model.eval(), source, sorted(truth), cfg, torch.device("cpu"), 1)
    assert not failed
    return tuple(cap.demo_accuracy(captions, Path(folder) / "shapes.csv", n)[0] for n in (1, 2))
