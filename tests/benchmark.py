"""Benchmark: the script's speed against what its hardware allows. Prints figures; asserts nothing.

    .venv/bin/python tests/benchmark.py [--images=256] [--figures=LIST] [--work=DIR]
                                        [--job_timeout=SECONDS] [--scst_only] [--name=value ...]

On a generated set of 500x375 JPEGs with 5 captions each (3,000 random words: about Flickr8k's
vocabulary), with the script's default settings (any --name=value among them is passed on), it
measures the figures that --figures names (a comma-separated list; default: all of them):
  extraction  feature extraction (JPEG decoding included) against ResNet50's bare forward on decoded
              tensors already on the device;
  job         the whole default job, as a user runs it (extraction into a fresh cache, num_epochs,
              test report), and its second epoch: a cached epoch;
  epoch       the same steps as that cached epoch on tensors already in memory (needs job);
  decoders    a cached epoch (the second, in a fresh process) and its peak memory, pooled lstm
              against attention;
  scst        the CIDEr-D reward's throughput, and an SCST step against a cross-entropy step.
              --scst_only means --figures=scst;
  help        how long --help takes in a fresh process (the aim: under 3 s);
  start       seconds from launch to the first training step on a warm cache, at 2,000 and 20,000
              noise-textured JPEGs of a photo's file size (about 130 KB) with five real Flickr8k
              captions each (made once in --work, which may then be reused), and where they go;
              --script=FILE measures another version of the script (the aim: the larger at most
              50 us an image slower).
Every figure is one line `name: value` (a number, or n/a or timeout), printed as soon as it is
known; lines starting with '#' say what was measured. tests/gpu_check.sh reads these lines.
"""
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flickr_image_caption_with_pytorch_resnet_lstm as cap  # noqa: E402

SCRIPT = Path(cap.__file__)
FIGURES = ("extraction", "job", "epoch", "decoders", "scst", "help", "start")
OWN_FLAGS = ("--images=", "--figures=", "--work=", "--job_timeout=", "--scst_only", "--script=")
FLICKR8K_CAPTIONS = SCRIPT.parent.parent / "shared" / "data" / "flickr8k" / "captions.txt"
# a Flickr8k-sized vocabulary, so that the softmax costs what it costs there
WORDS = [f"w{i}" for i in range(3000)]


def figure(name, value, digits=2):
    """One parseable line: name: value."""
    text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    print(f"{name}: {text}", flush=True)


def note(text):
    print(f"# {text}", flush=True)


def make_jpeg(args):
    """A photo-sized JPEG with texture (it costs what a real one costs to decode), 5 captions."""
    folder, i, seed = args
    rng = np.random.default_rng([seed, i])
    ramp = np.linspace(0, 190, 500)[None, :, None]
    pixels = (rng.random((375, 500, 3)) * 60 + ramp).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        x, y = rng.integers(0, 450), rng.integers(0, 325)
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.ellipse([x, y, x + 50, y + 50], fill=colour)
    image.save(folder / "Images" / f"{i:05d}.jpg", quality=90)
    name = f"{i:05d}.jpg"
    return [(name, " ".join(rng.choice(WORDS, rng.integers(8, 16)))) for _ in range(5)]


def make_jpegs(folder, n, seed=0):
    (folder / "Images").mkdir(parents=True)
    jobs = [(folder, i, seed) for i in range(n)]
    with ProcessPoolExecutor() as pool:
        rows = [row for rows in pool.map(make_jpeg, jobs, chunksize=64) for row in rows]
    frame = pd.DataFrame(rows, columns=["image", "caption"])
    frame.to_csv(folder / "captions.txt", index=False)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def peak_memory():
    """(GiB, where): the GPU's peak allocation, else this process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "gpu"
    # Linux carries ru_maxrss over exec: a child would report its parent's peak
    status = Path("/proc/self/status")
    if status.exists():
        lines = status.read_text().splitlines()
        peak_kib = next(int(line.split()[1]) for line in lines if line.startswith("VmHWM"))
        return peak_kib / 2**20, "resident"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "resident"


def model_args(cfg):
    """The settings that shape the model, as the script passes them to Captioner."""
    return {name: getattr(cfg, name) for name in cap.MODEL_ARGS}


def extraction(cfg, device, image_dir, weights):
    """Extraction with JPEG decoding against ResNet50's bare forward on decoded tensors."""
    names = sorted(p.name for p in image_dir.iterdir())
    resnet = cap.load_resnet50(weights).to(device).eval().to(memory_format=torch.channels_last)
    transform = cap.image_transform(cfg.image_size)
    batch = max(cfg.batch_size, 64)  # as the script extracts
    # at most 1,024 decoded images on the device (all of Flickr8k would need 4.9 GB)
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:  # PIL decodes without the GIL
        decoded = list(pool.map(lambda n: transform(cap.open_rgb(image_dir / n)), names[:1024]))
    tensors = torch.stack(decoded)
    tensors = tensors.to(device).contiguous(memory_format=torch.channels_last)  # (N, 3, H, W)

    def forward_only():
        with torch.inference_mode(), cap.autocast(device):
            for i in range(0, len(tensors), batch):
                resnet(tensors[i:i + batch])

    with torch.inference_mode(), cap.autocast(device):
        resnet(tensors[:batch])  # cuDNN picks its kernels before the clock starts
    alone = len(tensors) / timed(forward_only, device)
    workers = cap.decoding_workers(cfg)
    paths = [image_dir / n for n in names]
    encoder = cap.EncoderCNN(1, resnet)
    seconds = timed(lambda: cap.extract_features(encoder, paths, cfg, device), device)
    with_decoding = len(names) / seconds
    note(f"extraction: {len(names)} JPEGs in {seconds:.1f} s, batch {batch}, {workers} "
         f"decoding workers; bare forward on {len(tensors)} decoded tensors on {device}")
    figure("extraction_images_per_s", with_decoding, 1)
    figure("bare_forward_images_per_s", alone, 1)
    figure("extraction_vs_forward", with_decoding / alone)


def whole_job(common, work, timeout):
    """The default job in a process of its own, as a user runs it; past timeout it is stopped, and
    the epochs it finished still count. Returns how many epochs it recorded."""
    out = work / "job"
    command = [sys.executable, str(SCRIPT), *common, f"--cache_dir={work / 'job-cache'}",
               f"--output_dir={out}"]
    note("the whole default job: " + " ".join(command[2:]))
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - start
        (work / "job.log").write_text(done.stdout + done.stderr)
        if done.returncode == 0:
            figure("default_job_s", seconds, 1)
        else:
            note(f"the default job failed ({done.returncode}): {done.stderr[-2000:]}")
            figure("default_job_s", "n/a")
        found = re.search(r"features: \d+ images in [\d.]+ s \(([\d.]+) images/s", done.stdout)
        if found:
            figure("job_extraction_images_per_s", float(found.group(1)), 1)
    except subprocess.TimeoutExpired:
        figure("default_job_s", f"timeout (over {timeout:.0f} s)")
    if not (out / "loss_per_epoch.csv").is_file():
        return 0
    epochs = pd.read_csv(out / "loss_per_epoch.csv")
    note(f"the job's epochs took {', '.join(f'{s:.2f}' for s in epochs['epoch_seconds'])} s")
    figure("cached_epoch_s", float(epochs["epoch_seconds"].iloc[-1]))  # the last: warm
    return len(epochs)


def in_memory_epoch(cfg, device, epoch):
    """The job's last epoch's steps on batches already on the device: the training loop's floor."""
    data = cap.prepare_data(cfg, device, build_vocab=True)  # reads the job's cache
    if device.type == "cuda":  # as the script does: batches gathered on the GPU
        data.source.features = data.source.features.to(device)
    model = cap.Captioner(data.vocab, model_args(cfg)).to(device).train()
    trained = [p for p in model.parameters() if p.requires_grad]
    fused = True if device.type == "cuda" else None  # as the script's optimizer
    optimizer = torch.optim.Adam(trained, lr=cfg.learning_rate, fused=fused)
    train_set = cap.FlickrDataset(data.split("train"), data.vocab, data.source,
                                  cfg.max_train_caption_len)
    batches = cap.epoch_batches(len(train_set), cfg.batch_size, cfg.seed, epoch,
                                cfg.max_batches_per_epoch)
    pairs = [train_set.batch(b) for b in batches]
    in_memory = [(x.to(device), y.to(device)) for x, y in pairs]

    def steps(some):
        for images, captions in some:
            cap.train_step(run, images, captions, cfg.learning_rate)

    run = SimpleNamespace(cfg=cfg, device=device, model=model, ddp=model, optimizer=optimizer)
    timed(lambda: steps(in_memory[:20]), device)  # kernels chosen and memory allocated first
    seconds = timed(lambda: steps(in_memory), device)
    note(f"in memory: the same {len(in_memory)} steps of batch {cfg.batch_size}")
    figure("in_memory_epoch_s", seconds)
    return seconds


def epoch_seconds(args):
    """Trains with the script itself; returns the last epoch's training time as it recorded it."""
    assert cap.main(args) == 0
    out = next(a.split("=", 1)[1] for a in args if a.startswith("--output_dir="))
    return float(pd.read_csv(Path(out) / "loss_per_epoch.csv")["epoch_seconds"].iloc[-1])


def epoch_in_a_fresh_process(args):
    """(training seconds of one epoch, peak GiB, where) of the script in its own process, after a
    first run that fills the feature cache, so that the figures are training's own."""
    here = str(Path(__file__).parent)
    code = (f"import sys; sys.path.insert(0, {here!r}); import benchmark; "
            f"print('RESULT', benchmark.epoch_seconds({args!r}), *benchmark.peak_memory())")
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True)
    seconds, peak, where = done.stdout.rsplit("RESULT", 1)[1].split()
    return float(seconds), float(peak), where


def decoders(common, work):
    """A cached epoch (the second: the first shares the CPU with METEOR's JVM starting) and its peak
    memory, pooled lstm against attention, each in a fresh process reading a cache already there."""
    quick = ["--sample_every=0", "--freq_threshold=1", "--beam_size=1", "--num_epochs=2",
             f"--cache_dir={work / 'cache'}"]
    for name in ("lstm", "attention"):
        args = [*common, *quick, f"--decoder={name}", f"--output_dir={work / name}"]
        seconds, peak, where = epoch_in_a_fresh_process(args)
        figure(f"{name}_epoch_s", seconds)
        figure(f"{name}_peak_{where}_gib", peak)
    grid = max((work / "cache").glob("features-*.pt"), key=lambda p: p.stat().st_size)
    figure("attention_grid_cache_mib", grid.stat().st_size / 2**20, 0)


def main(argv):
    settings = [a for a in argv if not a.startswith(OWN_FLAGS)]
    overrides, _ = cap.parse_args(settings)
    own = dict(a[2:].split("=", 1) for a in argv if a.startswith(OWN_FLAGS) and "=" in a)
    listed = "scst" if "--scst_only" in argv else own.get("figures", ",".join(FIGURES))
    chosen = set(listed.split(","))
    unknown = chosen - set(FIGURES)
    if unknown:
        sys.exit(f"--figures: unknown {', '.join(sorted(unknown))}; choose among {FIGURES}")
    n_images = int(own.get("images", 256))
    work = Path(own["work"]) if "work" in own else Path(tempfile.mkdtemp(prefix="caption-bench-"))
    if "start" in chosen:  # first: the others' processes would share the CPU with it
        start_figures(work, Path(own.get("script", SCRIPT)))
    if not chosen <= {"start", "help"}:
        make_jpegs(work / "data", n_images)
    weights = cap.random_resnet50_weights(work / "resnet50-random.pth")
    common = [f"--{k}={v}" for k, v in overrides.items()] + [
        "--dataset=flickr8k", f"--data_dir={work / 'data'}", f"--encoder_weights={weights}"]
    cfg = cap.resolve_settings(cap.parse_args([*common, f"--cache_dir={work / 'job-cache'}"])[0])
    device = cap.pick_device(cfg.device)
    note(f"{n_images} JPEGs of 500x375, {n_images * 5} captions, batch {cfg.batch_size}, image "
         f"size {cfg.image_size}, device {device}, {torch.get_num_threads()} threads, "
         f"{cap.decoding_workers(cfg)} decoding workers, torch {torch.__version__}")
    if device.type == "cuda":
        note(f"GPU: {torch.cuda.get_device_name(device)}")
    if "extraction" in chosen:
        extraction(cfg, device, work / "data" / "Images", weights)
    epochs = None
    if "job" in chosen:
        timeout = float(own["job_timeout"]) if "job_timeout" in own else None
        epochs = whole_job(common, work, timeout)
    if "epoch" in chosen and not epochs:
        note("epoch: skipped, as it needs the job's cache and its last epoch (--figures=job,epoch)")
    if "epoch" in chosen and epochs:
        in_memory = in_memory_epoch(cfg, device, epochs)
        cached = float(pd.read_csv(work / "job" / "loss_per_epoch.csv")["epoch_seconds"].iloc[-1])
        figure("cached_vs_in_memory", cached / in_memory)
    if "decoders" in chosen:
        decoders(common, work)
    if "help" in chosen:
        help_seconds()
    if "scst" in chosen:
        self_critical(cap.resolve_settings(cap.parse_args(
            [*common, f"--cache_dir={work / 'cache'}", "--freq_threshold=1"])[0]), device)


def noise_jpeg(path):
    """A 500x375 JPEG of a real photo's file size (about 130 KB): per-pixel noise over a ramp."""
    rng = np.random.default_rng(int(path.stem))
    ramp = np.linspace(0, 120, 500)[None, :, None]
    pixels = (rng.random((375, 500, 3)) * 130 + ramp).astype(np.uint8)  # (375, 500, 3)
    Image.fromarray(pixels).save(path, quality=90)


def start_set(work, n, images):
    """A data folder of the first n of images' JPEGs (hard links), five captions each: Flickr8k's
    real captions in turn, or random words where they are absent."""
    folder = work / f"start-{n}"
    if (folder / "captions.txt").is_file():
        return folder
    (folder / "Images").mkdir(parents=True, exist_ok=True)
    names = [f"{i:05d}.jpg" for i in range(n)]
    for name in names:
        if not (folder / "Images" / name).exists():
            os.link(images / name, folder / "Images" / name)
    if FLICKR8K_CAPTIONS.is_file():
        real = cap.read_captions(FLICKR8K_CAPTIONS)[0]["caption"].tolist()
    else:
        rng = np.random.default_rng(0)
        real = [" ".join(rng.choice(WORDS, rng.integers(8, 16))) for _ in range(40000)]
    rows = [(name, real[(5 * i + k) % len(real)]) for i, name in enumerate(names) for k in range(5)]
    pd.DataFrame(rows, columns=["image", "caption"]).to_csv(folder / "captions.txt", index=False)
    return folder


# Run in a fresh process: the script as launched, with a timestamp after each phase, stopped at the
# end of its first training step. METEOR's JVM is not started: it loads beside the first epoch. The
# run that fills the cache (cold: 1) stores random features instead of ResNet50's: a warm start
# reads the file, whatever its numbers, and 20,000 JPEGs take half an hour to extract on 2 cores.
START_PROBE = """
import os, sys, time
launched, folder, cold = float(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
sys.path.insert(0, folder)
import flickr_image_caption_with_pytorch_resnet_lstm as cap
print("MARK imports", time.time() - launched, flush=True)
if cold:
    import torch
    cap.extract_features = lambda resnet, paths, *_, **__: (torch.rand(len(paths), 2048), [])
def after(name, phase):
    inner = getattr(cap, name)
    def timed(*args, **kwargs):
        result = inner(*args, **kwargs)
        print("MARK", phase, time.time() - launched, flush=True)
        if phase == "first_step":
            os._exit(0)
        return result
    setattr(cap, name, timed)
for name, phase in [("load_captions", "captions"), ("build_vocabulary", "vocabulary"),
                    ("prepare_data", "cache"), ("prepare_epochs", "model"),
                    ("train_step", "first_step")]:
    after(name, phase)
cap.meteor_scorer = lambda: None
sys.exit(cap.main(sys.argv[4:]))
"""


def start_marks(script, args, cold=False):
    """{phase: seconds from launch to its end} of one run of script that stops at its first step."""
    out = tempfile.mkdtemp(prefix="start-out-")  # a fresh run's: nothing to set aside
    launched = time.time()
    done = subprocess.run([sys.executable, "-c", START_PROBE, str(launched), str(script.parent),
                           str(int(cold)), *args, f"--output_dir={out}"], capture_output=True,
                          text=True)
    shutil.rmtree(out)
    marks = [line.split() for line in done.stdout.splitlines() if line.startswith("MARK ")]
    if not marks or marks[-1][1] != "first_step":
        sys.exit(f"start: no first step ({done.returncode}): {done.stderr[-2000:]}")
    return {phase: float(seconds) for _, phase, seconds in marks}


def start_figures(work, script, sizes=(2000, 20000), tries=3):
    """Launch to first step on a warm cache: the best of tries, each phase's share, per image."""
    images = work / "start-images"
    images.mkdir(parents=True, exist_ok=True)
    paths = [images / f"{i:05d}.jpg" for i in range(max(sizes))]
    with ProcessPoolExecutor() as pool:
        list(pool.map(noise_jpeg, [p for p in paths if not p.exists()], chunksize=64))
    weights = cap.random_resnet50_weights(work / "resnet50-random.pth")
    note(f"start: {script}; load {os.getloadavg()[0]:.2f}; JPEGs of "
         f"{sum(p.stat().st_size for p in paths) / len(paths) / 1000:.0f} KB on average")
    best = {}
    for n in sizes:
        folder = start_set(work, n, images)
        args = ["--dataset=flickr8k", f"--data_dir={folder}", f"--encoder_weights={weights}",
                f"--cache_dir={work / 'start-cache'}",
                "--sample_every=0"]
        start_marks(script, args, cold=True)  # fills the cache, and the page cache
        runs = [start_marks(script, args) for _ in range(tries)]
        best[n] = min(runs, key=lambda marks: marks["first_step"])
        ends = list(best[n].items())
        phases = [(p, s - (ends[i - 1][1] if i else 0)) for i, (p, s) in enumerate(ends)]
        tried = ", ".join(f"{marks['first_step']:.2f}" for marks in runs)
        note(f"start at {n} images, the best of {tried} s, in seconds: "
             + ", ".join(f"{p} {s:.2f}" for p, s in phases))
        figure(f"start_{n}_s", best[n]["first_step"])
    small, large = sizes[0], sizes[-1]
    extra = (best[large]["first_step"] - best[small]["first_step"]) / (large - small)
    figure("start_us_per_extra_image", extra * 1e6, 0)
    note(f"load after: {os.getloadavg()[0]:.2f}")


def help_seconds():
    """--help's wall time in a fresh process, as a user waits for it (the best of three)."""
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, check=True)
        runs.append(time.perf_counter() - start)
    figure("help_s", min(runs))


def self_critical(cfg, device):
    """The CIDEr-D reward's throughput, and an SCST step against a cross-entropy step."""
    data = cap.prepare_data(cfg, device, build_vocab=True)
    model = cap.Captioner(data.vocab, model_args(cfg)).to(device)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, cfg.learning_rate)
    train_set = cap.FlickrDataset(data.split("train"), data.vocab, data.source)
    start = time.perf_counter()
    images, reward = cap.scst_data(data, data.vocab, cfg.max_train_caption_len)
    setup = time.perf_counter() - start
    hyps = train_set.padded[:, 1:].long()  # words, <EOS>
    position = {name: i for i, name in enumerate(images.images)}
    # each caption's image, as the reward has it
    owners = torch.tensor([position[name] for name in train_set.images])
    n = cfg.batch_size * cfg.scst_samples
    scoring = timed(lambda: [reward(hyps[i:i + n], owners[i:i + n])
                             for i in range(0, len(hyps), n)], device)
    note(f"CIDEr-D reward in batches of {n}; {len(images)} training images' references "
         f"prepared in {setup:.2f} s")
    figure("cider_reward_captions_per_s", len(hyps) / scoring, 0)
    steps = cap.epoch_batches(len(images), cfg.batch_size, cfg.seed, 1)[:20]
    model.train()
    run = SimpleNamespace(cfg=cfg, device=device, model=model, ddp=model, optimizer=optimizer,
                          reward=reward)

    def scst_steps():
        for batch in steps:
            inputs, _ = images.batch(batch)
            cap.scst_step(run, inputs.to(device), batch, cfg.scst_learning_rate)

    def cross_entropy_steps():
        for batch in cap.epoch_batches(len(train_set), cfg.batch_size, cfg.seed, 1)[:20]:
            inputs, captions = train_set.batch(batch)
            cap.train_step(run, inputs.to(device), captions.to(device), cfg.learning_rate)

    scst = timed(scst_steps, device) / len(steps)
    cross_entropy = timed(cross_entropy_steps, device) / 20
    per_epoch = scst * len(cap.epoch_batches(len(images), cfg.batch_size, cfg.seed, 1))
    ce_epoch = cross_entropy * len(cap.epoch_batches(len(train_set), cfg.batch_size, cfg.seed, 1))
    note(f"an SCST step: {cfg.batch_size} images x {cfg.scst_samples} samples, at most "
         f"{cfg.max_caption_len} words; a cross-entropy step: {cfg.batch_size} captions")
    figure("scst_step_ms", 1000 * scst, 0)
    figure("cross_entropy_step_ms", 1000 * cross_entropy, 0)
    figure("scst_epoch_s_estimate", per_epoch)
    figure("cross_entropy_epoch_s_estimate", ce_epoch)
    figure("scst_vs_cross_entropy_epoch", per_epoch / ce_epoch)


if __name__ == "__main__":
    main(sys.argv[1:])
