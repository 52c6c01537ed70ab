"""Benchmark: per-step encoding (the original's way) against cached features. Prints figures; asserts nothing.

    .venv/bin/python tests/benchmark.py [--images=256] [--device=cpu]

On a generated set of 500x375 JPEGs with 5 captions each (and the script's default model sizes) it measures
1. seconds per epoch encoding every caption's image each step vs training from cached features;
2. feature-extraction throughput (JPEG decoding included) vs ResNet50's own forward throughput on tensors;
3. seconds per cached epoch vs the decoder's own training steps on tensors already in memory;
4. seconds per epoch and peak memory of the pooled LSTM decoder and of the attention decoder (over the 7x7 grid,
   cached in float16 and memory-mapped), each in a fresh process reading a cache that is already there;
5. self-critical training: the CIDEr-D reward's throughput (captions per second), and the time of an SCST step
   (batch_size images, scst_samples captions sampled for each) against a cross-entropy step (batch_size captions).
   With --scst_only, only this.
"""
import random
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flickr_image_caption_with_pytorch_resnet_lstm as cap  # noqa: E402


def make_jpeg(args):
    """One photo-sized JPEG with texture (so it costs what a real one costs to decode) and its 5 captions."""
    folder, i, seed = args
    rng = np.random.default_rng([seed, i])
    pixels = (rng.random((375, 500, 3)) * 60 + np.linspace(0, 190, 500)[None, :, None]).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        x, y = rng.integers(0, 450), rng.integers(0, 325)
        draw.ellipse([x, y, x + 50, y + 50], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    image.save(folder / "Images" / f"{i:05d}.jpg", quality=90)
    return [(f"{i:05d}.jpg", " ".join(rng.choice(WORDS, rng.integers(8, 16)))) for _ in range(5)]


WORDS = [f"w{i}" for i in range(3000)]  # a Flickr8k-sized vocabulary, so the softmax costs what it costs there


def make_jpegs(folder, n, seed=0):
    (folder / "Images").mkdir(parents=True)
    with ProcessPoolExecutor() as pool:
        rows = [row for rows in pool.map(make_jpeg, [(folder, i, seed) for i in range(n)], chunksize=64)
                for row in rows]
    pd.DataFrame(rows, columns=["image", "caption"]).to_csv(folder / "captions.txt", index=False)


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def epoch_seconds(args):
    """Trains with the script itself and returns the last epoch's training time as it recorded it."""
    assert cap.main(args) == 0
    out = next(a.split("=", 1)[1] for a in args if a.startswith("--output_dir="))
    return float(pd.read_csv(Path(out) / "loss_per_epoch.csv")["epoch_seconds"].iloc[-1])


def peak_memory():
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB on the GPU"
    status = Path("/proc/self/status")  # Linux carries ru_maxrss over exec: a child would report its parent's peak
    if status.exists():
        peak_kib = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM"))
        return f"{peak_kib / 2**20:.2f} GiB resident"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident"


def epoch_in_a_fresh_process(args):
    """(training seconds of one epoch, peak memory) of the script run in its own process, after a first run
    that fills the feature cache, so that the figures are training's own."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import benchmark; "
            f"print('RESULT', benchmark.epoch_seconds({args!r}), '|', benchmark.peak_memory())")
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    seconds, peak = out.rsplit("RESULT", 1)[1].split("|")
    return float(seconds), peak.strip()


def main(argv):
    overrides, _ = cap.parse_args([a for a in argv if not a.startswith(("--images=", "--scst_only"))])
    n_images = int(next((a.split("=")[1] for a in argv if a.startswith("--images=")), 256))
    work = Path(tempfile.mkdtemp(prefix="caption-benchmark-"))
    make_jpegs(work / "data", n_images)
    weights = cap.random_resnet50_weights(work / "resnet50-random.pth")
    common = [f"--{k}={v}" for k, v in overrides.items()] + [
        "--dataset=flickr8k", f"--data_dir={work / 'data'}", f"--cache_dir={work / 'cache'}",
        f"--encoder_weights={weights}", "--sample_every=0", "--freq_threshold=1", "--num_epochs=1", "--beam_size=1"]
    cfg = cap.resolve_settings(cap.parse_args(common)[0])
    device = cap.pick_device(cfg.device)
    print(f"benchmark: {n_images} JPEGs of 500x375, {n_images * 5} captions, batch {cfg.batch_size}, "
          f"image size {cfg.image_size}, device {device}, {torch.get_num_threads()} threads, "
          f"{cfg.num_workers} decoding workers")
    if "--scst_only" in argv:
        return self_critical(cfg, device)

    cached = epoch_seconds([*common, f"--output_dir={work / 'cached'}"])  # extracts the features first
    per_step = epoch_seconds([*common, f"--output_dir={work / 'per_step'}", "--cache_features=false"])
    cached = min(cached, epoch_seconds([*common, f"--output_dir={work / 'cached2'}"]))  # both warm now
    print(f"1. epoch, per-step encoding: {per_step:.1f} s; from cached features: {cached:.2f} s; "
          f"ratio {per_step / cached:.1f}x (target >= 10x)")

    data = cap.prepare_data(cfg, device, build_vocab=True)
    names = data.images("train")
    resnet = cap.load_resnet50(weights).to(device).eval().to(memory_format=torch.channels_last)
    transform = cap.image_transform(cfg.image_size)
    extraction = timed(lambda: cap.extract_features(resnet, work / "data" / "Images", names, transform, device,
                                                    max(cfg.batch_size, 64), cfg.num_workers))
    # ResNet50's forward alone, on at most 1,024 images already decoded (all of Flickr8k would need 4 GB)
    tensors = torch.stack([cap.load_image(work / "data" / "Images" / n, transform) for n in names[:1024]])

    def forward_only():
        with torch.inference_mode(), cap.autocast(device):
            for i in range(0, len(tensors), 64):
                resnet(tensors[i:i + 64].to(device).contiguous(memory_format=torch.channels_last))
        if device.type == "cuda":
            torch.cuda.synchronize()

    forward = timed(forward_only)
    with_decoding, alone = len(names) / extraction, len(tensors) / forward
    print(f"2. feature extraction with JPEG decoding: {with_decoding:.1f} images/s; ResNet50 forward alone on "
          f"decoded tensors: {alone:.1f} images/s; ratio {with_decoding / alone:.2f} (target >= 0.8)")

    vocab = data.vocab
    model = cap.Captioner(vocab, cfg.embed_size, cfg.hidden_size, cfg.num_layers, cfg.dropout).to(device).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], cfg.learning_rate)
    train_set = cap.FlickrDataset(data.split("train"), vocab, data.source)
    batches = cap.epoch_batches(len(train_set), cfg.batch_size, cfg.seed, 1)
    in_memory = [cap.CapsCollate()([train_set[i] for i in batch]) for batch in batches]
    in_memory = [(x.to(device), y.to(device)) for x, y in in_memory]

    def decoder_only():
        for images, captions in in_memory:
            with cap.autocast(device):
                loss, _, _ = model(images, captions)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    bare = timed(decoder_only)
    print(f"3. cached epoch: {cached:.2f} s; the same steps on tensors in memory: {bare:.2f} s; "
          f"overhead {100 * (cached / bare - 1):.1f}% (target <= 25%)")
    print(f"peak memory of the whole benchmark so far: {peak_memory()}")

    # the second epoch's time: the first shares the CPU with METEOR's JVM loading its tables
    figures = {name: epoch_in_a_fresh_process([*common, f"--decoder={name}", f"--output_dir={work / name}",
                                               "--num_epochs=2"]) for name in ("lstm", "attention")}
    grid = max((work / "cache").glob("features-*.pt"), key=lambda p: p.stat().st_size)
    print("4. a cached epoch (the second) in a fresh process: " + "; ".join(
        f"{name} decoder {seconds:.2f} s, peak {peak}" for name, (seconds, peak) in figures.items()) +
        f" (the grid cache: {grid.stat().st_size / 2**20:.0f} MiB on disk, memory-mapped)")

    self_critical(cfg, device)


def self_critical(cfg, device):
    """5. The CIDEr-D reward's throughput, and an SCST step against a cross-entropy step, on the same data."""
    data = cap.prepare_data(cfg, device, build_vocab=True)
    model = cap.Captioner(data.vocab, cfg.embed_size, cfg.hidden_size, cfg.num_layers, cfg.dropout).to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], cfg.learning_rate)
    train_set = cap.FlickrDataset(data.split("train"), data.vocab, data.source)
    start = time.perf_counter()
    images, reward = cap.scst_data(data, data.vocab, cfg.max_train_caption_len)
    setup = time.perf_counter() - start
    hyps = torch.nn.utils.rnn.pad_sequence([c[1:] for c in train_set.captions], batch_first=True)  # words, <EOS>
    position = {name: i for i, name in enumerate(images.images)}
    owners = torch.tensor([position[name] for name in train_set.images])  # each caption's image, as the reward has it
    n = cfg.batch_size * cfg.scst_samples
    scoring = timed(lambda: [reward(hyps[i:i + n], owners[i:i + n]) for i in range(0, len(hyps), n)])
    print(f"5. CIDEr-D reward: {len(hyps) / scoring:.0f} captions/s in batches of {n} "
          f"({len(images)} training images' references prepared in {setup:.2f} s)")
    steps = cap.epoch_batches(len(images), cfg.batch_size, cfg.seed, 1)[:20]
    model.train()

    def scst_steps():
        for batch in steps:
            inputs, _ = images.batch(batch)
            cap.scst_step(model, model, optimizer, inputs.to(device), batch, reward, cfg.scst_learning_rate, cfg,
                          device)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def cross_entropy_steps():
        for batch in cap.epoch_batches(len(train_set), cfg.batch_size, cfg.seed, 1)[:20]:
            inputs, captions = train_set.batch(batch)
            cap.train_step(model, optimizer, inputs.to(device), captions.to(device), cfg.learning_rate, device)
        if device.type == "cuda":
            torch.cuda.synchronize()

    scst, cross_entropy = timed(scst_steps) / len(steps), timed(cross_entropy_steps) / 20
    per_epoch = scst * len(cap.epoch_batches(len(images), cfg.batch_size, cfg.seed, 1))
    ce_epoch = cross_entropy * len(cap.epoch_batches(len(train_set), cfg.batch_size, cfg.seed, 1))
    print(f"   an SCST step ({cfg.batch_size} images x {cfg.scst_samples} samples, max {cfg.max_caption_len} words): "
          f"{1000 * scst:.0f} ms; a cross-entropy step ({cfg.batch_size} captions): {1000 * cross_entropy:.0f} ms; "
          f"per epoch {per_epoch:.2f} s vs {ce_epoch:.2f} s ({per_epoch / ce_epoch:.1f}x)")


if __name__ == "__main__":
    random.seed(0)
    main(sys.argv[1:])
