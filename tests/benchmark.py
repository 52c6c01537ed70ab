"""Benchmark: per-step encoding (the original's way) against cached features. Prints figures; asserts nothing.

    .venv/bin/python tests/benchmark.py [--images=256] [--device=cpu]

On a generated set of 500x375 JPEGs with 5 captions each (and the script's default model sizes) it measures
1. seconds per epoch encoding every caption's image each step vs training from cached features;
2. feature-extraction throughput (JPEG decoding included) vs ResNet50's own forward throughput on tensors;
3. seconds per cached epoch vs the decoder's own training steps on tensors already in memory.
"""
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flickr_image_caption_with_pytorch_resnet_lstm as cap  # noqa: E402


def make_jpegs(folder, n, seed=0):
    """Photo-sized JPEGs with texture (so they cost what real ones cost to decode) and 5 captions each."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(3000)]  # a Flickr8k-sized vocabulary, so the softmax costs what it costs there
    (folder / "Images").mkdir(parents=True)
    rows = []
    for i in range(n):
        pixels = (rng.random((375, 500, 3)) * 60 + np.linspace(0, 190, 500)[None, :, None]).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(5):
            x, y = rng.integers(0, 450), rng.integers(0, 325)
            draw.ellipse([x, y, x + 50, y + 50], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        image.save(folder / "Images" / f"{i:05d}.jpg", quality=90)
        rows += [(f"{i:05d}.jpg", " ".join(rng.choice(words, rng.integers(8, 16)))) for _ in range(5)]
    pd.DataFrame(rows, columns=["image", "caption"]).to_csv(folder / "captions.txt", index=False)


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv):
    args, _ = cap.parse_args([a for a in argv if not a.startswith("--images=")])
    n_images = int(next((a.split("=")[1] for a in argv if a.startswith("--images=")), 256))
    device = cap.pick_device(args["device"])
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="caption-benchmark-"))
    make_jpegs(work / "data", n_images)
    weights = cap.random_resnet50_weights(work / "resnet50-random.pth")
    cfg = {**args, "dataset": "flickr8k", "data_dir": str(work / "data"), "output_dir": str(work / "out"),
           "cache_dir": str(work / "cache"), "encoder_weights": str(weights), "sample_every": 0, "freq_threshold": 1}
    print(f"benchmark: {n_images} JPEGs of 500x375, {n_images * 5} captions, batch {cfg['batch_size']}, "
          f"image size {cfg['image_size']}, device {device}, {torch.get_num_threads()} threads, "
          f"{cfg['num_workers']} decoding workers")
    Path(cfg["output_dir"]).mkdir(parents=True)
    runs = {}
    for cached in (True, False):
        data = cap.prepare({**cfg, "cache_features": cached}, device)
        params = [p for m in (data["encoder"], data["decoder"]) for p in m.parameters() if p.requires_grad]
        frame = data["frame"]  # every image trains here: the benchmark measures speed, not quality
        runs[cached] = {**data, "out": Path(cfg["output_dir"]), "optimizer": torch.optim.Adam(params, 1e-4),
                        "train_set": cap.FlickrDataset(frame, data["vocab"], data["source"])}

    def epoch(run):
        state = {"epoch": 0, "step": 0, "batch": 0, "loss_sum": 0.0, "loss_count": 0}
        cap.train_one_epoch(run, 1, state, cfg, device, lambda state: None)
        if device.type == "cuda":
            torch.cuda.synchronize()

    per_step, cached_epoch = timed(lambda: epoch(runs[False])), timed(lambda: epoch(runs[True]))
    print(f"1. epoch, per-step encoding: {per_step:.1f} s; from cached features: {cached_epoch:.2f} s; "
          f"ratio {per_step / cached_epoch:.1f}x (target >= 10x)")

    names = sorted(runs[True]["frame"]["image"].unique())
    resnet = cap.load_resnet50(weights).to(device).eval().to(memory_format=torch.channels_last)
    transform = cap.image_transform(cfg["image_size"])
    extraction = timed(lambda: cap.extract_features(resnet, work / "data" / "Images", names, transform, device,
                                                    max(cfg["batch_size"], 64), cfg["num_workers"]))
    tensors = torch.stack([cap.load_image(work / "data" / "Images" / n, transform) for n in names])

    def forward_only():
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            for i in range(0, len(tensors), 64):
                resnet(tensors[i:i + 64].to(device).contiguous(memory_format=torch.channels_last))
        if device.type == "cuda":
            torch.cuda.synchronize()

    forward = timed(forward_only)
    print(f"2. feature extraction with JPEG decoding: {len(names) / extraction:.1f} images/s; ResNet50 forward "
          f"alone on decoded tensors: {len(names) / forward:.1f} images/s; ratio {forward / extraction:.2f} "
          f"(target >= 0.8)")

    run = runs[True]
    batches = cap.epoch_batches(len(run["train_set"]), cfg["batch_size"], cfg["seed"], 1)
    in_memory = [cap.CapsCollate()([run["train_set"][i] for i in batch]) for batch in batches]
    in_memory = [(x.to(device), y.to(device)) for x, y in in_memory]

    def decoder_only():
        run["encoder"].train()
        run["decoder"].train()
        for images, captions in in_memory:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, _, _ = cap.caption_loss(run["encoder"], run["decoder"], images, captions)
            run["optimizer"].zero_grad(set_to_none=True)
            loss.backward()
            run["optimizer"].step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    bare = timed(decoder_only)
    cached_epoch = timed(lambda: epoch(run))  # measured again beside it, with the same warm state
    print(f"3. cached epoch: {cached_epoch:.2f} s; the same steps on tensors in memory: {bare:.2f} s; "
          f"overhead {100 * (cached_epoch / bare - 1):.1f}% (target <= 25%)")


if __name__ == "__main__":
    random.seed(0)
    main(sys.argv[1:])
