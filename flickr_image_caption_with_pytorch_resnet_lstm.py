"""Image captioning on Flickr8k / Flickr30k: a frozen ResNet50 encoder and a 2-layer LSTM decoder.

    python flickr_image_caption_with_pytorch_resnet_lstm.py                 # train (demo set if no Flickr8k)
    python flickr_image_caption_with_pytorch_resnet_lstm.py --resume        # continue from last.pt
    python flickr_image_caption_with_pytorch_resnet_lstm.py --evaluate      # test-split metrics of best.pt
    python flickr_image_caption_with_pytorch_resnet_lstm.py --caption photo.jpg folder/ [--caption_figure=out.png]

Every constant in the config section can be overridden on the command line as --name=value.
"""
import argparse
import contextlib
import csv
import dataclasses
import datetime
import fcntl
import functools
import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageOps
from torch.nn.utils.rnn import pad_sequence
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T
from tqdm.auto import tqdm as _tqdm

ROOT = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
# config: plain constants; override any of them as --name=value
# data
dataset = "auto"            # 'auto' (Flickr8k if present, else the demo), 'demo', 'flickr8k', 'flickr30k', 'coco'
data_dir = ""               # '' means resources/input/<dataset>
encoder_weights = "resources/models/resnet50-19c8e357.pth"  # fetched by ./setup.sh
output_dir = ""             # '' means resources/output/<dataset>
cache_dir = "resources/cache"
cache_features = True       # compute the frozen ResNet50 features once per image instead of every step
image_size = 224            # images are resized and centre-cropped to this many pixels
max_images = 0              # 0 = every image; else a quick partial run on this many
demo_images = 3000          # the built-in demo set: how many images of coloured shapes it generates (image_size px)
# model
decoder = "lstm"            # 'lstm': the pooled feature is the LSTM's first input (Show and Tell); 'attention': soft
                            # attention over ResNet50's last convolutional grid (Show, Attend and Tell)
embed_size = 400
hidden_size = 512
num_layers = 2
dropout = 0.3
freq_threshold = 5          # a word enters the vocabulary when it occurs this often in the training captions
# training
batch_size = 32
num_epochs = 2
learning_rate = 0.0002      # the original's 3e-4 scaled for batch size 32
lr_schedule = "constant"    # 'constant' (the original) or 'cosine' (decays to 0 by the last step)
warmup_steps = 0            # steps of linear warm-up from 0 to learning_rate, before either schedule
max_batches_per_epoch = 0   # 0 = whole epochs
seed = 42
device = "auto"             # 'auto' picks cuda, then mps, then cpu
num_workers = 2             # image-decoding processes
sample_every = 200          # print sample captions every this many batches
log_every = 10              # read the loss back from the device every this many batches
resume = False              # continue from last.pt in output_dir
# decoding and evaluation
max_caption_len = 20
max_train_caption_len = 100 # longer training captions are cut to this many words (Flickr8k's longest: 40)
beam_size = 3
best_metric = "auto"        # the validation figure that picks best.pt: 'CIDEr', 'BLEU-4', 'val_loss' (lowest) or
                            # 'demo_accuracy' (demo images captioned fully right); 'auto': that on the demo, else CIDEr
# modes
evaluate = False            # evaluate a checkpoint on the test split and exit
checkpoint = ""             # '' means best.pt in output_dir (for --evaluate and --caption)
caption_figure = ""         # with --caption: also save the images and their captions to this PNG
preset = "auto"             # settings from PRESETS over the constants above: 'auto' (the dataset's own), or 'none'

CONFIG_NAMES = [k for k, v in globals().items()
                if not k.startswith("_") and k.islower() and isinstance(v, (bool, int, float, str))]
# Presets apply over the constants and under the command line. The demo's is sized to finish in under
# 5 minutes on a 2-core CPU: its 36-word vocabulary needs no 2-layer 512-unit LSTM, and one layer of 256 takes
# half the time per step and reads the shapes at least as well.
PRESETS = {"demo": dict(image_size=128, num_epochs=20, batch_size=64, learning_rate=0.002, lr_schedule="cosine",
                        embed_size=128, hidden_size=256, num_layers=1,
                        max_caption_len=24)}  # room to end its longest caption (20 words and a full stop)
# Settings resolved once per run, then frozen: cfg.learning_rate, never a dictionary that code changes.
Config = dataclasses.make_dataclass("Config", [(name, type(globals()[name])) for name in CONFIG_NAMES], frozen=True)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


class UserError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""


def is_main_process():
    """True except in the other processes of a torchrun job, which neither print nor write files."""
    return os.environ.get("RANK", "0") == "0"


def tqdm(*args, **kwargs):
    return _tqdm(*args, **kwargs | {"disable": kwargs.get("disable") or not is_main_process()})


def log(message):
    if is_main_process():
        _tqdm.write(message)


def warn(message):
    if is_main_process():
        _tqdm.write(f"warning: {message}", file=sys.stderr)


def parse_bool(text):
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")
    return text.lower() in ("true", "1", "yes")


def parse_args(argv):
    """The command line: ({name: value} for each --name=value given, type-checked; the --caption paths or None)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False, argument_default=argparse.SUPPRESS)
    for name in CONFIG_NAMES:
        default = globals()[name]
        kind = parse_bool if isinstance(default, bool) else type(default)
        parser.add_argument(f"--{name}", type=kind, help=f"default: {default!r}",
                            **({"nargs": "?", "const": True} if isinstance(default, bool) else {}))
    parser.add_argument("--caption", nargs="+", metavar="PATH", help="caption these image files or folders")
    overrides = vars(parser.parse_args(argv))
    return overrides, overrides.pop("caption", None)


POSITIVE = ("batch_size", "num_epochs", "beam_size", "max_caption_len", "embed_size", "hidden_size", "num_layers",
            "freq_threshold", "image_size", "log_every", "demo_images")
NON_NEGATIVE = ("max_images", "max_batches_per_epoch", "num_workers", "sample_every", "warmup_steps",
                "max_train_caption_len")
PATHS = ("data_dir", "encoder_weights", "output_dir", "cache_dir", "checkpoint", "caption_figure")


def resolve_settings(overrides=None, echo=None):
    """constants < preset < command line, then the dataset and default paths filled in: one frozen Config.

    Every value that differs from the constants at the top is printed with where it came from."""
    overrides = dict(overrides or {})
    values = {name: globals()[name] for name in CONFIG_NAMES} | overrides
    source = {name: "command line" for name in overrides}
    if values["dataset"] not in ("auto", "demo", "flickr8k", "flickr30k", "coco"):
        raise UserError(f"--dataset={values['dataset']!r}: expected 'auto', 'demo', 'flickr8k', 'flickr30k' or 'coco'")
    if values["dataset"] == "auto":
        found = ("--data_dir given" if values["data_dir"] else
                 (ROOT / "resources/input/flickr8k").is_dir() and "found resources/input/flickr8k")
        values["dataset"], source["dataset"] = ("flickr8k", found) if found else ("demo", "no resources/input/flickr8k")
    preset = values["dataset"] if values["preset"] == "auto" else values["preset"]
    if preset in PRESETS:
        for name, value in PRESETS[preset].items():
            if name not in overrides:
                values[name], source[name] = value, f"{preset} preset; --preset=none keeps the constants"
    elif values["preset"] not in ("auto", "none"):
        raise UserError(f"--preset={values['preset']!r}: expected 'auto', 'none' or one of {', '.join(PRESETS)}")
    if values["best_metric"] == "auto":  # the demo's CIDEr rewards matching one of three arbitrary phrasings
        values["best_metric"] = "demo_accuracy" if values["dataset"] == "demo" else "CIDEr"
        if values["dataset"] == "demo":
            source["best_metric"] = "auto on the demo"
    for name in PATHS:  # the defaults live in the project; the user's own paths are relative to where they are
        if values[name] and name not in overrides:
            values[name] = str(ROOT / values[name])
    for name, folder in (("data_dir", "input"), ("output_dir", "output")):
        if not values[name]:
            values[name] = str(ROOT / "resources" / folder / values["dataset"])
            source[name] = f"default for {values['dataset']}"
    check_settings(values)
    changed = [name for name in CONFIG_NAMES if name in source and values[name] != globals()[name]]
    if echo and changed:
        echo("settings that differ from the constants at the top of the script:\n" + "\n".join(
            f"  {name:15s} = {values[name]!r:30s} ({source[name]})" for name in changed))
    return Config(**values)


def check_settings(values):
    """Impossible values, each refused before any work with one line that says what the value must be."""
    rules = [(POSITIVE, lambda v: v >= 1, "at least 1"), (NON_NEGATIVE, lambda v: v >= 0, "0 or more"),
             (["learning_rate"], lambda v: math.isfinite(v) and v > 0, "a positive number such as 0.0002"),
             (["dropout"], lambda v: 0 <= v < 1, "at least 0 and below 1, such as 0.3"),
             (["seed"], lambda v: 0 <= v < 2 ** 32, f"between 0 and {2 ** 32 - 1}"),
             (["lr_schedule"], lambda v: v in ("constant", "cosine"), "'constant' or 'cosine'"),
             (["decoder"], lambda v: v in DECODERS, "'lstm' or 'attention'"),
             (["best_metric"], lambda v: v in ("CIDEr", "BLEU-4", "val_loss") or v == "demo_accuracy" and
              values["dataset"] == "demo", "'CIDEr', 'BLEU-4', 'val_loss' or, on the demo, 'demo_accuracy'")]
    for names, valid, must_be in rules:
        for name in (n for n in names if not valid(values[n])):
            raise UserError(f"--{name}={values[name]}: must be {must_be}")
    if values["dataset"] == "demo" and Path(values["output_dir"]).resolve().is_relative_to(
            Path(values["data_dir"]).resolve()):
        raise UserError(f"--output_dir={values['output_dir']} lies in the demo's data folder {values['data_dir']}, "
                        f"which the demo rewrites: choose an output_dir outside it")


def uses_bf16(device):
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def autocast(device):
    """bf16 mixed precision on GPUs that support it natively; full precision elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device))


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device={name!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={name}: this machine has no CUDA GPU that torch can use")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device={name}: this machine has no Apple GPU (MPS) that torch can use; try --device=cpu")
    return device


# -----------------------------------------------------------------------------
# several processes (torchrun): the same loop in each, on its share of every batch; rank 0 writes everything
def start_processes(device):
    """Under torchrun, joins the process group (NCCL on CUDA GPUs, one per process; gloo on CPUs) and returns
    this process's device; without torchrun, the device as it is."""
    if "LOCAL_RANK" not in os.environ:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # the others wait while process 0 writes the feature cache, which at COCO's size takes more than NCCL's 10 minutes
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2),
                            device_id=device if device.type == "cuda" else None)
    return device


def rank_and_size():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def wait_for_all():
    if dist.is_initialized():
        dist.barrier()


def any_process(flag, device):
    """Whether flag is true in any process: every process then takes the same branch."""
    return sum_over_processes([float(flag)], device)[0] > 0


def sum_over_processes(values, device):
    """The element-wise sum of a list of numbers over all processes."""
    if not dist.is_initialized():
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def merge_over_processes(part):
    """The union of every process's dict."""
    if not dist.is_initialized():
        return part
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


# -----------------------------------------------------------------------------
# tokenization and vocabulary
@functools.lru_cache(maxsize=1)
def spacy_tokenizer():
    import spacy  # spacy.blank("en") tokenizes exactly as en_core_web_sm does, with no model download
    return spacy.blank("en").tokenizer


class Vocabulary:
    PAD, SOS, EOS, UNK = 0, 1, 2, 3
    SPECIALS = ["<PAD>", "<SOS>", "<EOS>", "<UNK>"]

    def __init__(self, freq_threshold=5, itos=None):
        self.freq_threshold = freq_threshold
        self.itos = list(itos) if itos is not None else list(self.SPECIALS)
        if self.itos[:4] != self.SPECIALS:
            raise ValueError(f"a vocabulary must start with {self.SPECIALS}")
        self.stoi = {word: i for i, word in enumerate(self.itos)}

    def __len__(self):
        return len(self.itos)

    @staticmethod
    def tokenize(text):
        return [token.text.lower() for token in spacy_tokenizer()(text)]

    @staticmethod
    def tokenize_many(texts):
        return [[t.text.lower() for t in doc] for doc in spacy_tokenizer().pipe(texts, batch_size=2000)]

    def build_vocab(self, sentences):
        """Counts words in sentences (strings, or lists of tokens already split)."""
        sentences = list(sentences)
        tokenized = sentences if sentences and isinstance(sentences[0], list) else self.tokenize_many(sentences)
        counts = Counter(token for tokens in tokenized for token in tokens)
        for word, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
            if count >= self.freq_threshold and word not in self.stoi:
                self.stoi[word] = len(self.itos)
                self.itos.append(word)
        return self

    def numericalize(self, text):
        tokens = text if isinstance(text, list) else self.tokenize(text)
        return [self.stoi.get(token, self.UNK) for token in tokens]

    def decode(self, ids):
        ids = ids[:ids.index(self.EOS)] if self.EOS in ids else ids
        return " ".join(self.itos[i] for i in ids if i not in (self.PAD, self.SOS))

    def save(self, path):
        Path(path).write_text(json.dumps({"freq_threshold": self.freq_threshold, "itos": self.itos}, indent=0))

    @classmethod
    def load(cls, path):
        data = json.loads(Path(path).read_text())
        return cls(data["freq_threshold"], data["itos"])


# -----------------------------------------------------------------------------
# dataset: caption files, image folders, splits
CAPTION_FILES = ["dataset_flickr8k.json", "dataset_flickr30k.json", "dataset_coco.json", "captions.txt",
                 "results.csv", "Flickr8k.token.txt"]
IMAGE_DIRS = ["Images", "flickr30k_images/flickr30k_images", "flickr30k_images", "Flicker8k_Dataset",
              "Flickr8k_Dataset"]
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}
FORMATS_ACCEPTED = ("Kaggle captions.txt ('image,caption' CSV), Kaggle Flickr30k results.csv "
                    "('image_name| comment_number| comment'), Flickr8k.token.txt ('name.jpg#0<TAB>caption') "
                    "or Karpathy's dataset_flickr8k.json / dataset_flickr30k.json")


TOKEN_LINE = re.compile(r"^(?P<image>[^\t#,|]+)#\d+\t(?P<caption>.*)$")  # Flickr8k.token.txt
RESULTS_HEADER = re.compile(r"^\s*image_name\s*\|\s*comment_number\s*\|\s*comment\s*$", re.IGNORECASE)
RESULTS_LINE = re.compile(r"^\s*(?P<image>[^|]+?)\s*\|\s*\d+\s*(?:\|\s*)?(?P<caption>.*)$")  # recovers a missing '|'


def read_text(path):
    """The file's text in whichever encoding it has, with \n line endings (\r\n and old Mac \r, even mixed)."""
    return re.sub(r"\r\n?", "\n", decode_text(Path(path).read_bytes()))


def decode_text(raw):
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    for encoding in ("utf-8-sig", "cp1252"):
        with contextlib.suppress(UnicodeDecodeError):
            return raw.decode(encoding)
    return raw.decode("latin-1")


def read_captions(path):
    """Reads any supported caption file: (DataFrame of image, caption[, split]; counts of what was dropped)."""
    path = Path(path)
    text = read_text(path)
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    dropped = Counter(blank_lines=sum(1 for line in lines if not line.strip()))
    rows, bad_lines = [], []
    if first.lstrip().startswith("{"):
        rows = karpathy_rows(path, text)
    elif TOKEN_LINE.match(first) or RESULTS_HEADER.match(first):
        pattern = TOKEN_LINE if TOKEN_LINE.match(first) else RESULTS_LINE
        for number, line in enumerate(lines, 1):
            match = pattern.match(line)
            if match:
                rows.append((match["image"], match["caption"]))
            elif line.strip() and line is not first:
                bad_lines.append(number)
    elif re.sub(r"\s", "", first).lower() == "image,caption":
        reader = csv.reader(io.StringIO(text))
        next(reader)
        for row in reader:
            if len(row) >= 2:  # more than 2 fields: a caption's unquoted commas
                rows.append((row[0].strip(), ",".join(row[1:])))
            elif row:
                bad_lines.append(reader.line_num)
    else:
        raise UserError(f"{path}: unknown caption file format. Its first line is {first[:120]!r}; "
                        f"accepted formats: {FORMATS_ACCEPTED}")
    columns = ["image", "caption", "split"] if rows and len(rows[0]) == 3 else ["image", "caption"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["caption"] = frame["caption"].str.strip()
    empty = frame["caption"] == ""
    dropped["empty_captions"] = int(empty.sum())
    frame = frame[~empty]
    before = len(frame)
    frame = frame.drop_duplicates(["image", "caption"]).reset_index(drop=True)
    dropped["duplicate_rows"] = before - len(frame)
    dropped["malformed_rows"] = len(bad_lines)
    if bad_lines:
        warn(f"{path}: skipped {len(bad_lines)} malformed line(s): {bad_lines[:10]}")
    return frame, {k: v for k, v in dropped.items() if v}


def karpathy_rows(path, text):
    """(image, caption, split) rows of a Karpathy-format JSON file; a malformed entry is one clear error."""
    try:
        images = json.loads(text)["images"]
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path}: not a Karpathy-format JSON file ({type(error).__name__}: {error})") from None
    if not isinstance(images, list):
        raise UserError(f"{path}: 'images' is a {type(images).__name__}, not a list: not a Karpathy-format JSON file")
    fix = "fix or remove that entry, or use another caption file"
    rows = []
    for i, image in enumerate(images):
        if not isinstance(image, dict):
            raise UserError(f"{path}: images[{i}] is a {type(image).__name__}, not an object with filename, split "
                            f"and sentences: {fix}")
        if not isinstance(image.get("filename"), str) or not image["filename"]:
            raise UserError(f"{path}: images[{i}] has no 'filename' string: {fix}")
        entry = f"{path}: images[{i}] ({image['filename']})"
        if image.get("split") not in ("train", "restval", "val", "test"):
            raise UserError(f"{entry} has split {image.get('split')!r}, not 'train', 'restval', 'val' or 'test': "
                            f"{fix}")
        if not isinstance(image.get("sentences"), list) or not image["sentences"]:
            raise UserError(f"{entry} has no 'sentences' list of captions: {fix}")
        for j, sentence in enumerate(image["sentences"]):
            if not isinstance(sentence, dict) or not isinstance(sentence.get("raw"), str):
                raise UserError(f"{entry}: sentences[{j}] has no 'raw' caption string ({sentence!r:.60}): {fix}")
        split = {"restval": "train"}.get(image["split"], image["split"])
        name = f"{image['filepath']}/{image['filename']}" if image.get("filepath") else image["filename"]  # COCO's
        rows += [(name, sentence["raw"], split) for sentence in image["sentences"]]
    return rows


def find_dataset_files(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"dataset folder {folder} does not exist. Download the data into it (see the README: "
                        f"./setup.sh --flickr8k fetches Flickr8k) or point --data_dir at it.")
    places = [folder] + [folder / d for d in IMAGE_DIRS]
    caption_file = next((p / name for name in CAPTION_FILES for p in places if (p / name).is_file()), None)
    if caption_file is None:
        raise UserError(f"no caption file in {folder}: expected one of {', '.join(CAPTION_FILES)}")
    if caption_file.name == "dataset_coco.json":  # its images are in train2014/ and val2014/, named with them
        return caption_file, folder
    image_dir = next((folder / d for d in IMAGE_DIRS if (folder / d).is_dir()
                      and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in (folder / d).iterdir())), None)
    if image_dir is None:
        raise UserError(f"no image folder with images in {folder}: expected one of {', '.join(IMAGE_DIRS)}")
    return caption_file, image_dir


def assign_splits(frame, folder, seed, holdout_fraction=0.1):
    """Split by image, never by caption: Karpathy splits, else the official Flickr8k lists, else seeded."""
    if "split" in frame:
        return frame, "from Karpathy's JSON"
    if all((Path(folder) / f).is_file() for f in SPLIT_FILES.values()):
        split_of = official_splits(folder)
        frame = frame.assign(split=frame["image"].map(split_of))
        unlisted = frame["split"].isna()
        if unlisted.any():
            log(f"{frame.loc[unlisted, 'image'].nunique()} images are in none of the official split lists: left out")
        return frame[~unlisted].reset_index(drop=True), "from the official Flickr8k lists"
    images = sorted(frame["image"].unique())
    random.Random(seed).shuffle(images)
    n_holdout = max(1, round(holdout_fraction * len(images)))
    split_of = {name: "test" for name in images[:n_holdout]}
    split_of.update({name: "val" for name in images[n_holdout:2 * n_holdout]})
    return frame.assign(split=frame["image"].map(split_of).fillna("train")), f"random by image, seed {seed}"


def official_splits(folder):
    """{image: split} from the Flickr8k split lists; an image in two lists goes in the last, with a warning."""
    split_of, repeated = {}, {}
    for split, file in SPLIT_FILES.items():
        for name in read_text(Path(folder) / file).split():
            if split_of.get(name, split) != split:
                repeated[name] = split
            split_of[name] = split
    if repeated:
        listed = ", ".join(f"{name} (put in {split})" for name, split in list(repeated.items())[:5])
        warn(f"{len(repeated)} image(s) are in more than one of the split lists {', '.join(SPLIT_FILES.values())} "
             f"in {folder}, each put in the last list that names it: {listed}{' ...' * (len(repeated) > 5)}")
    return split_of


def load_captions(folder, seed, max_images=0):
    """Caption table with a split column, for images that exist; reports everything it dropped."""
    caption_file, image_dir = find_dataset_files(folder)
    frame, dropped = read_captions(caption_file)
    present = {name for name in frame["image"].unique() if (image_dir / name).is_file()}
    missing = sorted(set(frame["image"]) - present)
    if missing:
        warn(f"{len(missing)} image(s) named in {caption_file.name} are not in {image_dir}, skipped: "
             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        frame = frame[frame["image"].isin(present)]
    if max_images:  # a random subset before splitting, so that every split keeps its share
        keep = sorted(frame["image"].unique())
        random.Random(f"max_images {seed}").shuffle(keep)
        frame = frame[frame["image"].isin(set(keep[:max_images]))]
    frame, split_source = assign_splits(frame.reset_index(drop=True), folder, seed)
    counts = frame.drop_duplicates("image")["split"].value_counts()
    log(f"captions: {caption_file} ({len(frame)} captions of {frame['image'].nunique()} images; images in "
        f"{image_dir}); splits ({split_source}): train {counts.get('train', 0)}, val {counts.get('val', 0)}, "
        f"test {counts.get('test', 0)} images" + (f"; dropped {dict(dropped)}" if dropped else ""))
    check_splits(frame, folder)
    return frame, image_dir


def check_splits(frame, folder):
    for split in ("train", "val", "test"):
        if not (frame["split"] == split).any():
            raise UserError(f"no {split} images in {folder} (after leaving out missing or unreadable ones): "
                            f"use more images (max_images) or check the split files")


def image_transform(size):
    return T.Compose([T.ToImage(), T.Resize(size, antialias=True), T.CenterCrop(size),
                      T.ToDtype(torch.float32, scale=True),
                      T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])


def open_rgb(path):
    """The image as 8-bit RGB, turned upright as its EXIF orientation says; 16- and 32-bit greys are scaled."""
    with Image.open(path) as image:
        with contextlib.suppress(Exception):  # a damaged EXIF block must not lose an otherwise good image
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of every upright image
        if image.mode.startswith("I"):  # 'I;16', 'I;16B', 'I': convert() would clip them at 255, almost white
            pixels = np.asarray(image, dtype=np.float64)
            # 'I' is how some Pillow versions open 16-bit PNGs: values that fit 16 bits are taken as 16-bit
            top = 65535 if image.mode.startswith("I;16") or pixels.max() <= 65535 else 2 ** 31 - 1
            image = Image.fromarray(np.clip(np.round(pixels * (255 / top)), 0, 255).astype(np.uint8))
        return image.convert("RGB")


def load_image(path, transform):
    """The transformed image, or None when it cannot be read (callers report it)."""
    try:
        return transform(open_rgb(path))
    except Exception:  # PIL raises OSError, ValueError or others by format and damage
        return None


def image_opens(path):
    """A cheap check (no full decode) for the per-step encoder, which cannot drop images up front otherwise."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:
        return False


class ImageSource:
    """Encoder inputs by image name: cached 2048-d features when there are some, else decoded images."""

    def __init__(self, image_dir, transform, features=None, names=None):
        self.image_dir, self.transform, self.features = Path(image_dir), transform, features
        self.row = {name: i for i, name in enumerate(names or [])}

    def get(self, name):
        if self.features is not None:
            return self.features[self.row[name]]
        return load_image(self.image_dir / name, self.transform)


class ImageList(Dataset):
    """One item per image: (encoder input, [its index in names]), batched by CapsCollate like captions."""

    def __init__(self, source, names):
        self.source, self.names = source, list(names)

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        return self.source.get(self.names[i]), torch.tensor([i])


def image_batches(source, names, batch_size, num_workers=0, pin_memory=False, desc=None):
    """Yields (encoder inputs, indices into names) per batch; unreadable images are left out of both."""
    workers = 0 if source.features is not None else num_workers
    loader = DataLoader(ImageList(source, names), batch_size=batch_size, num_workers=workers,
                        collate_fn=CapsCollate(), pin_memory=pin_memory, generator=torch.Generator())
    for inputs, index in tqdm(loader, desc=desc, unit="batch", leave=False, disable=desc is None):
        if inputs is not None:
            yield inputs, index.flatten()


class FlickrDataset(Dataset):
    """One item per caption: (encoder input for its image, caption ids with <SOS> and <EOS>)."""

    def __init__(self, captions, vocab, source, max_len=None):
        self.images = captions["image"].tolist()
        self.source = source
        tokens = captions["tokens"] if "tokens" in captions else Vocabulary.tokenize_many(captions["caption"].tolist())
        if max_len:  # one 10,000-word caption once made two batches take 420 s
            cut = sum(len(t) > max_len for t in tokens)
            tokens = [t[:max_len] for t in tokens]
            if cut:
                log(f"{cut} caption(s) longer than {max_len} words cut to {max_len} words")
        self.captions = [torch.tensor([Vocabulary.SOS] + vocab.numericalize(t) + [Vocabulary.EOS]) for t in tokens]

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        image = self.source.get(self.images[i])
        if image is None:
            warn(f"cannot read image {self.source.image_dir / self.images[i]}: its caption is skipped")
        return image, self.captions[i]


class CapsCollate:
    """Pads captions to the longest in the batch; drops items whose image could not be read."""

    def __init__(self, pad_idx=Vocabulary.PAD):
        self.pad_idx = pad_idx

    def __call__(self, batch):
        batch = [(image, caption) for image, caption in batch if image is not None]
        if not batch:
            return None, None
        images = torch.stack([image for image, _ in batch])
        return images, pad_sequence([c for _, c in batch], batch_first=True, padding_value=self.pad_idx)


# -----------------------------------------------------------------------------
# the built-in demo set: coloured shapes with captions, in the Flickr8k layout
DEMO_COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230), "yellow": (240, 210, 30)}
DEMO_BACKGROUNDS = {"white": (240, 240, 240), "grey": (128, 128, 128), "black": (15, 15, 15)}
DEMO_SHAPES = ["circle", "square", "triangle"]
DEMO_SINGLE_SHARE = 2 / 3   # the rest have two shapes, one on each side
DEMO_SHADE = 15             # each channel of a shape's colour varies by up to this much (0-255)
DEMO_BACKGROUND_SHADE = 20  # and the background's grey level by up to this much
DEMO_SINGLE_PLACE = dict(x=(0.45, 0.55), y=(0.45, 0.55), extent=(0.5, 0.75))  # fractions of the image
DEMO_PAIR_PLACE = dict(left=(0.24, 0.26), right=(0.74, 0.76), y=(0.35, 0.65), extent=(0.4, 0.46))  # never touch
DEMO_CAPTIONS_PER_IMAGE = 3  # of the templates below, drawn without repeats
ONE_SHAPE_CAPTIONS = ["a {c} {s} .", "a {c} {s} on a {bg} background .", "there is a {c} {s} on a {bg} background .",
                      "a large {c} {s} in the middle of the picture .", "a picture of a {c} {s} .",
                      "one big {c} {s} in the centre ."]
# every two-shape caption names the left shape first and says which shape is where, in words that demo_placement
# reads back: one word order is easier to learn than six ways of saying the same
TWO_SHAPE_CAPTIONS = ["a {c} {s} on the left and a {c2} {s2} on the right .", "a {c} {s} to the left of a {c2} {s2} .",
                      "two shapes on a {bg} background : a {c} {s} on the left and a {c2} {s2} on the right ."]


def draw_shape(draw, shape, centre, size, colour):
    x, y, r = centre[0], centre[1], size / 2
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)


DEMO_ENTRIES = ["Images", "captions.txt", "shapes.csv", "demo.json"]  # all that the demo set owns in its folder


def make_demo_dataset(folder, n_images, size, seed=0):
    """Writes Images/, captions.txt and shapes.csv deterministically; rebuilt only when the settings change."""
    folder = Path(folder)
    stamp = {"images": n_images, "size": size, "seed": seed, "version": 9}
    if (folder / "demo.json").is_file() and json.loads((folder / "demo.json").read_text()) == stamp:
        return folder
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "demo.json").is_file():
        raise UserError(f"{folder} holds files but no demo set: choose an empty or new --data_dir for the demo")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-demo-", dir=folder.parent))
    try:
        write_demo_set(tmp, n_images, size, seed, stamp)
        # the folder may also hold the user's own files: only the demo's own entries are replaced. A stamp that
        # matches no settings goes first, so that an interrupted swap is redone on the next run
        (folder / "demo.json").write_text(json.dumps({"incomplete": True}))
        for name in DEMO_ENTRIES:
            if (folder / name).is_dir():
                shutil.rmtree(folder / name)
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_demo_set(tmp, n_images, size, seed, stamp):
    """The demo set's entries (DEMO_ENTRIES) in the empty folder tmp. Shades, sizes and positions vary, and edges
    are anti-aliased (drawn 4x larger, then downscaled), so that a model must read shapes, not exact pixels."""
    from PIL import ImageDraw
    (tmp / "Images").mkdir()
    rng = random.Random(seed)
    shift = lambda rgb, offsets: tuple(min(255, max(0, round(v + o))) for v, o in zip(rgb, offsets))  # noqa: E731
    captions, shapes = [], []
    for i in tqdm(range(n_images), desc="making the demo set", unit="img", leave=False):
        name, bg, big = f"demo_{i:05d}.jpg", rng.choice(list(DEMO_BACKGROUNDS)), 4 * size
        grey = rng.uniform(-DEMO_BACKGROUND_SHADE, DEMO_BACKGROUND_SHADE)
        image = Image.new("RGB", (big, big), shift(DEMO_BACKGROUNDS[bg], [grey] * 3))  # grey stays grey
        draw = ImageDraw.Draw(image)
        n_shapes = 1 if rng.random() < DEMO_SINGLE_SHARE else 2
        # two shapes may share a colour or a shape, never both: which colour belongs to which shape, and which
        # is where, is then the question, and no combination can be guessed from what the other one is
        objects = rng.sample([(c, s) for c in DEMO_COLOURS for s in DEMO_SHAPES], n_shapes)
        # single shapes large and near the centre (what a random-weight encoder can still tell apart); two
        # shapes one in each half, each at its own height, never touching
        if n_shapes == 1:
            p = DEMO_SINGLE_PLACE
            places = [(rng.uniform(*p["x"]), rng.uniform(*p["y"]), rng.uniform(*p["extent"]))]
        else:
            p = DEMO_PAIR_PLACE
            places = [(rng.uniform(*p[side]), rng.uniform(*p["y"]), rng.uniform(*p["extent"]))
                      for side in ("left", "right")]
        for (colour, shape), (x, y, extent) in zip(objects, places):
            shade = [rng.uniform(-DEMO_SHADE, DEMO_SHADE) for _ in range(3)]
            draw_shape(draw, shape, (x * big, y * big), extent * big, shift(DEMO_COLOURS[colour], shade))
        image.resize((size, size), Image.LANCZOS).save(tmp / "Images" / name, quality=92)
        (c, s), (c2, s2) = objects[0], objects[-1]
        templates = rng.sample(ONE_SHAPE_CAPTIONS if n_shapes == 1 else TWO_SHAPE_CAPTIONS,
                               DEMO_CAPTIONS_PER_IMAGE)
        captions += [(name, t.format(c=c, s=s, c2=c2, s2=s2, bg=bg)) for t in templates]
        shapes.append((name, ";".join(f"{c} {s}" for c, s in objects)))  # left to right
    pd.DataFrame(captions, columns=["image", "caption"]).to_csv(tmp / "captions.txt", index=False)
    pd.DataFrame(shapes, columns=["image", "shapes"]).to_csv(tmp / "shapes.csv", index=False)
    (tmp / "demo.json").write_text(json.dumps(stamp))


SIDES = {"on the left": "left", "on the right": "right", "to the left of": "left", "to the right of": "right"}


def demo_placement(caption):
    """'left colour shape;right colour shape' as a caption places two shapes, or None when it names other than
    exactly two coloured shapes, leaves one unplaced, or contradicts itself."""
    words = caption.split()
    pairs = [i for i in range(len(words) - 1) if words[i] in DEMO_COLOURS and words[i + 1] in DEMO_SHAPES]
    if len(pairs) != 2 or sum(w in DEMO_COLOURS or w in DEMO_SHAPES for w in words) != 4:
        return None  # one shape, three, or a colour or shape word that belongs to neither: hedging
    claims = set()
    for k, i in enumerate(pairs):
        after = " ".join(words[i + 2:i + 6]) + " "
        for phrase, side in SIDES.items():
            if after.startswith(phrase + " "):
                claims.add((k, side))
                if phrase.endswith(" of"):  # 'X to the left of Y' places Y too
                    claims.add((1 - k, {"left": "right", "right": "left"}[side]))
    side = dict(claims)
    if len(claims) != 2 or sorted(side.values()) != ["left", "right"]:
        return None
    return ";".join(" ".join(words[pairs[k]:pairs[k] + 2]) for k in sorted(side, key=lambda k: side[k]))


def demo_accuracy(captions_by_image, shapes_file, n_shapes=1):
    """Share of the images with n_shapes shapes (None: any number) whose caption names exactly the right colour
    and shape (one shape) or both, each with its colour and on its side (two shapes), and how many such images
    there were."""
    truth = pd.read_csv(shapes_file).set_index("image")["shapes"].to_dict()
    names = [name for name in captions_by_image if n_shapes in (None, truth[name].count(";") + 1)]
    correct = 0
    for name in names:
        words = set(captions_by_image[name].split())
        if ";" in truth[name]:
            correct += demo_placement(captions_by_image[name]) == truth[name]
        else:
            colour, shape = truth[name].split()
            correct += words & set(DEMO_COLOURS) == {colour} and words & set(DEMO_SHAPES) == {shape}
    return correct / max(1, len(names)), len(names)


# -----------------------------------------------------------------------------
# models
FETCH_WEIGHTS = "run ./setup.sh to download it (or see the README)"
KNOWN_LEGACY_WEIGHTS = {"resnet50-19c8e357.pth"}  # torch.hub's old-format file: loadable only by unpickling
WEIGHTS_NAME = re.compile(r"resnet50-([0-9a-f]{8,64})\.pth")


def weights_sha256(path):
    stat = Path(path).stat()
    return file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def file_sha256(path, size, mtime):  # size and mtime are in the cache key: a changed file is hashed again
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_resnet50(weights_path):
    """torchvision ResNet50 without its classifier, from a local .pth, loaded without running pickled code."""
    path, fetch = Path(weights_path), FETCH_WEIGHTS
    if not path.is_file():
        raise UserError(f"ResNet50 weights {path} not found: {fetch}")
    named_hash = WEIGHTS_NAME.fullmatch(path.name)
    if named_hash and not weights_sha256(path).startswith(named_hash[1]):
        raise UserError(f"{path} is corrupt or incomplete (its sha256 does not start with {named_hash[1]}): "
                        f"delete it and {fetch}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if named_hash and path.name in KNOWN_LEGACY_WEIGHTS:
            state = torch.load(path, map_location="cpu", weights_only=False)  # safe: its sha256 was verified above
        elif isinstance(error, pickle.UnpicklingError):
            raise UserError(f"{path} holds pickled Python objects, refused because loading it could run code "
                            f"inside it. Use a torchvision ResNet50 .pth: {fetch}") from None
        else:
            raise UserError(f"{path} is damaged or not a PyTorch weights file ({type(error).__name__}): "
                            f"delete it and {fetch}") from None
    # built on the meta device: no random init, which would waste time and draw from the global RNG (a run
    # would then train differently with and without a feature cache); strict loading makes every tensor real
    with torch.device("meta"):
        model = torchvision.models.resnet50(weights=None)
    try:
        model.load_state_dict(state, assign=True)
    except Exception as error:
        raise UserError(f"{path} does not hold ResNet50 weights ({str(error)[:200]}): {fetch}") from None
    model.avgpool = model.fc = nn.Identity()  # its output is the last convolutional grid, flattened: see grid()
    return model.float()  # assign keeps the file's dtype; copying into the model converted it to float32


def random_resnet50_weights(path, seed=0):
    """A fixed random-init ResNet50 for the demo without downloads; saved so that captions can be reproduced."""
    path = Path(path)
    if not path.is_file():
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            state = torchvision.models.resnet50(weights=None).state_dict()
        atomic_save(state, path)
    return path


def grid(resnet, images):
    """ResNet50's last convolutional grid as L = h*w feature vectors (B, L, 2048); their mean is the pooled feature."""
    out = resnet(images.contiguous(memory_format=torch.channels_last)).float()  # (B, 2048*h*w), channels first
    return out.view(out.size(0), 2048, -1).transpose(1, 2)  # (B, L, 2048)


class EncoderCNN(nn.Module):
    """Frozen ResNet50 (always in eval mode) and a trained projection of its standardised 2048-d features.

    forward() takes images (B, 3, H, W) or, when features are cached, the pooled features (B, 2048) or, for the
    attention decoder (spatial), the grid (B, L, 2048); it returns (B, E) or (B, L, E)."""

    def __init__(self, embed_size, resnet=None, spatial=False):
        super().__init__()
        self.resnet, self.spatial = None, spatial
        if resnet is not None:
            self.attach(resnet)
        # standardising with the training set's statistics (per channel, over every grid cell for the attention
        # decoder) is what lets the decoder read random-weight features
        self.register_buffer("feature_mean", torch.zeros(2048))
        self.register_buffer("feature_std", torch.ones(2048))
        self.embed = nn.Linear(2048, embed_size)

    def attach(self, resnet):
        """Adds the frozen backbone, for images instead of cached features."""
        self.resnet = resnet.requires_grad_(False).eval()
        return self

    def train(self, mode=True):
        super().train(mode)
        if self.resnet is not None:
            self.resnet.eval()  # BatchNorm running statistics must never change
        return self

    def features(self, images):
        with torch.no_grad():
            cells = grid(self.resnet, images)
            return cells if self.spatial else cells.mean(1)

    def forward(self, x):
        features = x.float() if x.dim() < 4 else self.features(x)  # cached grids are float16
        return self.embed((features - self.feature_mean) / self.feature_std)


class DecoderRNN(nn.Module):
    """The image embedding is the first input step, then <SOS> and the caption's words."""

    def __init__(self, embed_size, hidden_size, vocab_size, num_layers=2, dropout=0.3):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.lstm = nn.LSTM(embed_size, hidden_size, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.fcn = nn.Linear(hidden_size, vocab_size)
        self.drop = nn.Dropout(dropout)

    def forward(self, image_embeds, captions):
        """Logits for captions[:, 1:] given the image (B, E) and captions[:, :-1] (B, T-1): (B, T-1, V)."""
        x = torch.cat([image_embeds.unsqueeze(1), self.drop(self.embed(captions[:, :-1]))], dim=1)  # (B, T, E)
        out, _ = self.lstm(x)  # (B, T, H)
        return self.fcn(self.drop(out[:, 1:]))  # the image step predicts nothing: (B, T-1, V)

    def start(self, image_embeds):
        """The LSTM state after reading the image: (h, c), each (num_layers, B, H)."""
        _, state = self.lstm(image_embeds.unsqueeze(1))  # (B, 1, E) in
        return state

    def step(self, tokens, state, first=False):
        """Log-probabilities (B, V) of the next word after tokens (B,): never <PAD> or <SOS>, nor <EOS> first
        (so no caption is empty)."""
        out, state = self.lstm(self.embed(tokens).unsqueeze(1), state)  # (B, 1, H)
        return next_word_logp(self.fcn(out.squeeze(1)), first), state


def next_word_logp(logits, first):
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, V)
    logp[:, [Vocabulary.PAD, Vocabulary.SOS] + [Vocabulary.EOS] * first] = float("-inf")
    return logp


# Xu et al.'s lambda (1 in the paper): how strongly every grid cell must be looked at once per caption. Lower, as
# here, leaves the attention on the objects rather than on empty background cells: on the demo, 0.2 gave 80.6% of
# two-shape images right where 1 gave 76.9%
DOUBLY_STOCHASTIC_WEIGHT = 0.2


class AttentionDecoder(nn.Module):
    """Show, Attend and Tell's soft attention (Xu et al., 2015): before each word, an additive (Bahdanau) attention
    over the image's L grid cells, from the top LSTM layer's last state, gives a context vector, scaled by a
    gating scalar and fed to the LSTM with the word. The LSTM state starts from the mean cell.

    Its state for beam search: (h, c, cells, keys, alpha), each with the batch in dimension 1: h and c
    (num_layers, B, H), the cells (L, B, E), their attention keys (L, B, H) and the last attention map (1, B, L)."""

    def __init__(self, embed_size, hidden_size, vocab_size, num_layers=2, dropout=0.3):
        super().__init__()
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.init_state = nn.Linear(embed_size, 2 * num_layers * hidden_size)
        self.key, self.query, self.score = (nn.Linear(embed_size, hidden_size), nn.Linear(hidden_size, hidden_size),
                                            nn.Linear(hidden_size, 1))
        self.gate = nn.Linear(hidden_size, 1)
        # LSTM cells rather than nn.LSTM: one step at a time they are 1.7x faster on a CPU
        self.cells = nn.ModuleList(nn.LSTMCell(hidden_size if i else 2 * embed_size, hidden_size)
                                   for i in range(num_layers))
        self.fcn = nn.Linear(hidden_size, vocab_size)
        self.drop = nn.Dropout(dropout)

    def start(self, cells):
        """The state before the first word, from the image's cells (B, L, E)."""
        h, c = torch.tanh(self.init_state(cells.mean(1))).view(-1, 2 * self.num_layers, self.hidden_size) \
            .transpose(0, 1).chunk(2)  # (L, B, H) each: layers first
        cells = cells.transpose(0, 1)  # (L, B, E)
        return (h.contiguous(), c.contiguous(), cells, self.key(cells), cells.new_zeros(1, *cells.shape[1::-1]))

    def advance(self, words, state):
        """The top LSTM layer's output (B, H) after attending and reading the embedded words (B, E)."""
        h, c, cells, keys, _ = state
        alpha = self.score(torch.tanh(keys + self.query(h[-1]))).squeeze(-1).softmax(0)  # (L, B)
        context = torch.sigmoid(self.gate(h[-1])) * (alpha.unsqueeze(-1) * cells).sum(0)  # (B, E)
        x, layers = torch.cat([words, context], -1), []  # (B, 2E)
        for cell, h_layer, c_layer in zip(self.cells, h, c):
            layers.append(cell(x, (h_layer, c_layer)))
            x = self.drop(layers[-1][0])  # between layers, as nn.LSTM's dropout
        h, c = (torch.stack(s) for s in zip(*layers))  # (num_layers, B, H) each
        return h[-1], (h, c, cells, keys, alpha.t().unsqueeze(0))

    def forward(self, cells, captions, alphas=False):
        """Logits for captions[:, 1:] given the image's cells (B, L, E) and captions[:, :-1]: (B, T-1, V); with
        alphas, also the attention map of every step (B, T-1, L)."""
        state, words = self.start(cells), self.drop(self.embed(captions[:, :-1]))  # (B, T-1, E)
        outs, maps = [], []
        for t in range(words.size(1)):
            out, state = self.advance(words[:, t], state)
            outs.append(out)
            maps.append(state[-1][0])
        logits = self.fcn(self.drop(torch.stack(outs, 1)))  # (B, T-1, V)
        return (logits, torch.stack(maps, 1)) if alphas else logits

    def step(self, tokens, state, first=False):
        """As DecoderRNN.step."""
        out, state = self.advance(self.embed(tokens), state)
        return next_word_logp(self.fcn(out), first), state


DECODERS = {"lstm": DecoderRNN, "attention": AttentionDecoder}


class Captioner(nn.Module):
    """The trained model: encoder projection and decoder, with its vocabulary and the sizes that rebuild it."""

    def __init__(self, vocab, embed_size, hidden_size, num_layers=2, dropout=0.3, image_size=224, resnet=None,
                 decoder="lstm"):
        super().__init__()
        self.vocab = vocab
        self.args = dict(decoder=decoder, embed_size=embed_size, hidden_size=hidden_size, num_layers=num_layers,
                         dropout=dropout, image_size=image_size)  # stored in checkpoints, like nanoGPT's model_args
        self.attention = decoder == "attention"
        self.encoder = EncoderCNN(embed_size, resnet, spatial=self.attention)
        self.decoder = DECODERS[decoder](embed_size, hidden_size, len(vocab), num_layers, dropout)

    def forward(self, inputs, captions):
        """The loss: cross-entropy of every next word (padding ignored), and the logits (B, T-1, V) and targets it compared.
        In training, the attention decoder adds Xu et al.'s doubly stochastic penalty: each grid cell's attention,
        summed over the caption, should be near 1 (validation loss stays the cross-entropy, comparable across
        decoders)."""
        targets, penalty = captions[:, 1:], 0.0
        if self.attention and self.training:
            logits, alphas = self.decoder(self.encoder(inputs), captions, alphas=True)  # alphas (B, T-1, L)
            looked = (alphas * (targets != Vocabulary.PAD).unsqueeze(-1)).sum(1)  # (B, L)
            penalty = DOUBLY_STOCHASTIC_WEIGHT * ((1 - looked) ** 2).mean()
        else:
            logits = self.decoder(self.encoder(inputs), captions)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),  # (B*(T-1), V)
                               ignore_index=Vocabulary.PAD)
        return loss + penalty, logits, targets

    @torch.no_grad()
    def generate(self, inputs, beam_size=3, max_len=20):
        """Captions (strings) of a batch of images or cached features; beam_size=1 is greedy decoding."""
        ids = beam_search(self.decoder, self.encoder(inputs), beam_size, max_len)
        return [self.vocab.decode(seq) for seq in ids]

    def trainable_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.resnet.")}


CHECKPOINT_KEYS = {"model_args", "model", "optimizer", "vocab", "freq_threshold", "config", "encoder_weights",
                   "encoder_weights_sha256", "epoch", "step", "batch", "best_score", "loss_sum", "loss_count",
                   "processes", "rng_state", "cuda_rng_state"}


def load_checkpoint(path):
    """A checkpoint written by this script, loaded without running any pickled code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: train one first with `python {Path(__file__).name}` "
                        f"(it writes best.pt and last.pt to output_dir), or name one with --checkpoint=FILE")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"cannot load checkpoint {path}: it is damaged or holds pickled Python objects, "
                        f"which are refused ({type(error).__name__})") from None
    missing = CHECKPOINT_KEYS - set(ckpt) if isinstance(ckpt, dict) else CHECKPOINT_KEYS
    missing |= {f"model_args.{k}" for k in ("decoder", "embed_size", "hidden_size", "num_layers", "dropout",
                                            "image_size")
                if not missing and k not in ckpt["model_args"]}
    if missing:
        raise UserError(f"{path} is not a checkpoint written by this version of the script (best.pt or last.pt): "
                        f"it lacks {', '.join(sorted(missing)[:5])}. Train afresh, or use the script that wrote it")
    return ckpt


def load_captioner(path, resnet=None, ckpt=None, decoder=None):
    """The one way a model comes back from a checkpoint (resume, --evaluate, the test report, --caption):
    rebuilt from the sizes stored in it, never from today's settings. Returns (model, checkpoint); ckpt: the
    checkpoint at path when it is already loaded; decoder: the kind the settings ask for (the other is refused)."""
    ckpt = ckpt or load_checkpoint(path)
    if decoder and ckpt["model_args"]["decoder"] != decoder:
        raise UserError(f"checkpoint {path} has the {ckpt['model_args']['decoder']!r} decoder but the settings say "
                        f"--decoder={decoder}: run with --decoder={ckpt['model_args']['decoder']}, or name another "
                        f"--checkpoint")
    model = Captioner(Vocabulary(ckpt["freq_threshold"], ckpt["vocab"]), **ckpt["model_args"], resnet=resnet)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if unexpected or any(not k.startswith("encoder.resnet.") for k in missing):  # the backbone has its own file
        raise UserError(f"{path} does not match its own model sizes: it is damaged; train afresh")
    return model, ckpt


# -----------------------------------------------------------------------------
# feature cache: the frozen encoder runs once per image, not once per caption per epoch
def features_cache_key(weights_sha, transform, image_dir, names, precision="fp32"):
    # each image's size and mtime: an image replaced under the same name must not reuse its old features
    files = [[name, *file_stamp(Path(image_dir) / name)] for name in sorted(names)]
    spec = {"weights": weights_sha, "transform": repr(transform), "image_dir": str(Path(image_dir).resolve()),
            "images": files, "precision": precision, "version": 3}  # 3: images upright, 16-bit scaled
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


def file_stamp(path):
    try:
        stat = path.stat()
    except OSError:  # gone since it was listed: it fails (and is reported) when read
        return None, None
    return stat.st_size, stat.st_mtime_ns


def tensor_sha256(tensor):
    return hashlib.sha256(tensor.contiguous().numpy()).hexdigest()  # hashed in place: no copy of a memory map


def extract_features(resnet, image_dir, names, transform, device, batch_size=64, num_workers=2, grid_cells=0,
                     into=None):
    """Pooled 2048-d ResNet50 features of each image (N, 2048) or, with grid_cells, its grid (N, L, 2048) in
    float16 (as fast as the machine allows), and the names of those that could not be read. into: a
    file that holds the features instead of RAM (the kernel writes them out as memory runs short)."""
    resnet = resnet.to(device).eval().to(memory_format=torch.channels_last)
    shape, dtype = (len(names), *([grid_cells] * bool(grid_cells)), 2048), torch.float16 if grid_cells else torch.float
    features = torch.from_file(str(into), True, math.prod(shape), dtype=dtype).view(shape) if into else \
        torch.zeros(shape, dtype=dtype)
    ok = torch.zeros(len(names), dtype=torch.bool)
    bar = tqdm(total=len(names), desc="ResNet50 features", unit="img", leave=False)
    with torch.inference_mode(), autocast(device):
        for images, index in image_batches(ImageSource(image_dir, transform), names, batch_size, num_workers,
                                           pin_memory=device.type == "cuda"):
            cells = grid(resnet, images.to(device, non_blocking=True))
            features[index] = (cells if grid_cells else cells.mean(1)).cpu().to(features.dtype)
            ok[index] = True
            bar.update(int(index[-1]) + 1 - bar.n)  # up to this batch's last image, unreadable ones included
    bar.close()
    return features, [n for n, good in zip(names, ok.tolist()) if not good]  # an unreadable image's row: zeros


def load_cached_features(path, key):
    """The cache's contents, or None when it is absent, for other inputs, or damaged in any way."""
    if not path.is_file():
        return None
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # read as pages are used
        if cache["key"] == key and tensor_sha256(cache["features"]) == cache["sha256"]:
            return cache
    except Exception:  # a truncated or corrupt file fails in many ways; all mean rebuild
        pass
    warn(f"feature cache {path} is damaged or stale: rebuilding it")
    return None


def cached_features(weights, image_dir, names, transform, cache_folder, device, batch_size=64, num_workers=2,
                    grid_cells=0):
    """The images' features from the cache, extracted (and cached) first when the cache lacks them: pooled, or
    with grid_cells the grid of each image in float16, memory-mapped so that it never has to fit in RAM."""
    key = features_cache_key(weights_sha256(weights), transform, image_dir, names,
                             ("bf16" if uses_bf16(device) else "fp32") + f" grid {grid_cells}" * bool(grid_cells))
    path = Path(cache_folder) / f"features-{key[:20]}.pt"
    cache = load_cached_features(path, key)
    if cache is not None:
        log(f"features: reusing {path} ({len(cache['images'])} images)")
        return cache
    path.parent.mkdir(parents=True, exist_ok=True)
    needed, free = len(names) * 2048 * (2 * grid_cells or 4), shutil.disk_usage(path.parent).free
    if 2 * needed > free:  # the features as extracted, and the cache file written from them
        raise UserError(f"the feature cache needs {needed / 1e9:.2f} GB in {path.parent}, and twice that while it is "
                        f"written, but only {free / 1e9:.2f} GB is free: free some space, or choose another --cache_dir")
    start, (rank, size) = time.time(), rank_and_size()
    share = names[len(names) * rank // size:len(names) * (rank + 1) // size]  # each image in one process
    scratch = path.with_name(f"{path.name}.{rank}.scratch")  # at COCO's size, a grid is too big for RAM
    scratch.unlink(missing_ok=True)
    features, failed = extract_features(load_resnet50(weights), image_dir, share, transform, device,
                                        max(batch_size, 64), num_workers, grid_cells, into=scratch)
    cache = {"key": key, "images": share, "failed": failed, "features": features}
    if size > 1:  # the shares meet in cache_dir, which every process must see (on several machines: shared)
        atomic_save(cache, path.with_name(f"{path.name}.{rank}"))
        wait_for_all()
        cache = rank == 0 and {"key": key, **gather_shares(path, size)}
    if rank == 0:
        seconds, read = time.time() - start, len(cache["images"]) - len(cache["failed"])
        log(f"features: {read} images in {seconds:.1f} s ({read / max(seconds, 1e-9):.1f} images/s"
            f"{f' in {size} processes' * (size > 1)}), cached in {path}")
        atomic_save(cache | {"sha256": tensor_sha256(cache["features"])}, path)
    del cache, features
    scratch.unlink()
    wait_for_all()
    return load_cached_features(path, key)  # memory-mapped: the extracted copy leaves RAM


def gather_shares(path, size):
    """The features, images and failures of every process's share, in order (each share read from its file, which
    is then removed). Called by process 0 once every process has written its share."""
    shares = []
    for rank in range(size):
        try:
            shares.append(torch.load(path.with_name(f"{path.name}.{rank}"), weights_only=True, mmap=True))
        except OSError:
            raise UserError(f"process {rank}'s share of the features is not in {path.parent}: with several "
                            f"machines, --cache_dir must be a shared folder that every process can read") from None
    gathered = {"features": torch.cat([s["features"] for s in shares]),
                "images": sum((s["images"] for s in shares), []), "failed": sum((s["failed"] for s in shares), [])}
    for rank in range(size):
        path.with_name(f"{path.name}.{rank}").unlink()
    return gathered


def atomic_save(obj, path):
    """torch.save to a temporary file, fsync, then rename: a crash leaves the previous file intact, and a
    failed write (a full disk) leaves no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:  # a full disk, or a second Ctrl-C in the middle of writing
        with contextlib.suppress(OSError):
            tmp.unlink()
        if not isinstance(error, OSError):
            raise
        raise UserError(f"cannot write {path}: {error.strerror or error}. Free some space or choose another "
                        f"folder; the previous {path.name}, if any, is intact") from None


# -----------------------------------------------------------------------------
# data for a run: captions, vocabulary (from the training split) and encoder inputs
@dataclasses.dataclass
class Data:
    frame: pd.DataFrame         # image, caption, tokens, split: one row per caption
    source: "ImageSource"       # encoder inputs by image name
    weights: Path               # the ResNet50 file the features come from
    feature_stats: tuple        # mean and std (2048,) of the training split's features (per channel)
    vocab: "Vocabulary" = None  # of the training split, when asked for
    resnet: nn.Module = None    # only when features are not cached: the encoder then runs every step

    def split(self, name):
        return self.frame[self.frame["split"] == name]

    def images(self, split):
        return sorted(self.split(split)["image"].unique())


RANDOM_WEIGHTS = ROOT / "resources/models/resnet50-random-init.pth"  # the demo's, without ./setup.sh


def encoder_weights_file(cfg):
    path = Path(cfg.encoder_weights)
    if path.is_file():
        return path
    if cfg.dataset != "demo":
        raise UserError(f"ResNet50 weights {path} not found: {FETCH_WEIGHTS}")
    warn(f"no ResNet50 weights at {path}: the demo uses a randomly initialised (still frozen) ResNet50. "
         f"./setup.sh downloads the ImageNet weights.")
    return random_resnet50_weights(RANDOM_WEIGHTS)


def feature_statistics(features, rows):
    """Per-channel mean and std (2048,) over some rows of pooled (N, 2048) or grid (N, L, 2048) features, a chunk
    at a time: a memory-mapped grid never has to fit in RAM."""
    chunks = (features[chunk].reshape(-1, 2048).double() for chunk in torch.as_tensor(rows).split(256))
    total, squares = sum(torch.stack([x.sum(0), x.square().sum(0)]) for x in chunks)  # (2048,) each
    n = len(rows) * features[0].numel() // 2048
    mean = total / n
    return mean.float(), ((squares - n * mean.square()) / max(n - 1, 1)).sqrt().float().clamp_min(1e-6)


def prepare_data(cfg, device, image_size, freq_threshold=None, trained=None):
    """Captions with their splits and tokens; the training split's vocabulary when freq_threshold is given; the
    encoder inputs of every image that could be read. Every check that needs no computation (the vocabulary, the
    weights of a checkpoint being resumed or evaluated: trained=(path, checkpoint)) comes before the features."""
    if cfg.dataset == "demo" and is_main_process():
        log(f"{'=' * 100}\nDEMO: no Flickr8k at {ROOT / 'resources/input/flickr8k'}, so this run trains on the built-in "
            f"demo set\n({cfg.demo_images} generated images of coloured shapes). For real captions: ./setup.sh "
            f"--flickr8k, then run this script again (README: 'Getting the data').\n{'=' * 100}")
        make_demo_dataset(cfg.data_dir, cfg.demo_images, image_size)
        if not Path(cfg.encoder_weights).is_file():  # written once, before the other processes look for it
            random_resnet50_weights(RANDOM_WEIGHTS)
    wait_for_all()  # for the demo set and its weights
    frame, image_dir = load_captions(cfg.data_dir, cfg.seed, cfg.max_images)
    frame = frame.assign(tokens=Vocabulary.tokenize_many(frame["caption"].tolist()))
    vocab = freq_threshold and build_vocabulary(frame.loc[frame["split"] == "train", "tokens"], freq_threshold)
    weights = encoder_weights_file(cfg)
    if trained:
        check_weights(trained[1], weights, trained[0])
    transform = image_transform(image_size)
    names = sorted(frame["image"].unique())
    resnet = None  # with cached features, training needs only the projection; the checkpoint records the hash
    grid_cells = math.ceil(image_size / 32) ** 2 if cfg.decoder == "attention" else 0  # halved 5 times, rounded up
    if cfg.cache_features:
        cache = cached_features(weights, image_dir, names, transform, cfg.cache_dir, device, cfg.batch_size,
                                cfg.num_workers, grid_cells)
        source, failed = ImageSource(image_dir, transform, cache["features"], cache["images"]), cache["failed"]
    else:
        resnet, source = load_resnet50(weights), ImageSource(image_dir, transform)
        failed = [n for n in tqdm(names, desc="checking images", leave=False) if not image_opens(image_dir / n)]
    if failed:
        warn(f"skipped {len(failed)} unreadable image(s): {', '.join(failed[:5])}{' ...' * (len(failed) > 5)}")
        frame = frame[~frame["image"].isin(set(failed))].reset_index(drop=True)
        check_splits(frame, cfg.data_dir)
    train_names = sorted(frame.loc[frame["split"] == "train", "image"].unique())
    if cfg.cache_features:
        stats = feature_statistics(cache["features"], [source.row[n] for n in train_names])
    else:
        sample = random.Random(cfg.seed).sample(train_names, min(512, len(train_names)))
        features, unread = extract_features(resnet, image_dir, sample, transform, device, grid_cells=grid_cells)
        stats = feature_statistics(features, [i for i, name in enumerate(sample) if name not in unread])
    return Data(frame, source, Path(weights).resolve(), stats, vocab or None, resnet)


def build_vocabulary(train_tokens, freq_threshold):
    vocab = Vocabulary(freq_threshold).build_vocab(train_tokens)
    if len(vocab) == len(Vocabulary.SPECIALS):
        raise UserError(f"--freq_threshold={freq_threshold} leaves no word in the vocabulary (no training word "
                        f"occurs that often): lower it, e.g. --freq_threshold=5")
    log(f"vocabulary: {len(vocab)} words (from the training split, threshold {freq_threshold})")
    return vocab


# -----------------------------------------------------------------------------
# training
def epoch_batches(n, batch_size, seed, epoch, max_batches=0):
    """The epoch's batches of caption indices: a fixed order per (seed, epoch), so a resumed run repeats it."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return batches[:max_batches] if max_batches else batches


def learning_rate_at(step, total_steps, cfg):
    """The learning rate of a step (1-based): a pure function of the step, so a resumed run continues it exactly."""
    if step <= cfg.warmup_steps:
        return cfg.learning_rate * step / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)  # 1 at the last step
        return cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.learning_rate


def caption_loader(dataset, batches, cfg, device):
    per_step = dataset.source.features is None
    # its own generator: a DataLoader otherwise draws from the global RNG, and a resumed run would differ
    return DataLoader(dataset, batch_sampler=batches, collate_fn=CapsCollate(), generator=torch.Generator(),
                      num_workers=cfg.num_workers if per_step else 0, pin_memory=device.type == "cuda")


@torch.no_grad()
def validation_loss(model, dataset, cfg, device):
    """Teacher-forced loss and token accuracy: the share of non-padding targets whose argmax is right."""
    model.eval()
    rank, size = rank_and_size()
    batches = [b.tolist() for b in torch.arange(len(dataset)).split(cfg.batch_size)][rank::size]
    total_loss, correct, tokens = 0.0, 0, 0
    for images, captions in caption_loader(dataset, batches, cfg, device):
        if images is None:
            continue
        loss, logits, targets = model(images.to(device), captions.to(device))
        mask = targets != Vocabulary.PAD
        total_loss += loss.item() * mask.sum().item()
        correct += ((logits.argmax(-1) == targets) & mask).sum().item()
        tokens += mask.sum().item()
    total_loss, correct, tokens = sum_over_processes([total_loss, correct, tokens], device)
    return total_loss / max(tokens, 1), correct / max(tokens, 1)


def append_csv(path, rows, columns):
    pd.DataFrame(rows, columns=columns).to_csv(path, mode="a", header=not Path(path).exists(), index=False)


def truncate_csv(path, column, last):
    """Keeps the rows up to a checkpoint, so a resumed run neither repeats nor loses any."""
    if Path(path).is_file():
        try:
            frame = pd.read_csv(path)
        except pd.errors.EmptyDataError:  # killed before its first row: nothing to keep
            Path(path).unlink()
            return
        frame[frame[column] <= last].to_csv(path, index=False)


def claim_output_dir(out):
    """Creates output_dir and locks it for this run: a second run into the same folder would interleave its CSV
    rows with ours. The lock is the kernel's (flock), so it dies with the process, even after kill -9."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "a+")
    except OSError as error:
        raise UserError(f"cannot write to --output_dir={out}: {error.strerror or error} (is it, or a folder "
                        f"above it, a file or read-only?). Choose another output_dir") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        raise UserError(f"another run (process {lock.read().strip() or '?'}) is writing to {out}: wait for it "
                        f"to finish, stop it, or choose another --output_dir") from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock  # held open until the process ends


# these decide the batches, the vocabulary or the model: a resumed run must keep them
RESUME_FIXED = ("dataset", "data_dir", "max_images", "demo_images", "image_size", "freq_threshold", "decoder",
                "embed_size", "hidden_size", "num_layers", "dropout", "batch_size", "max_batches_per_epoch", "seed",
                "best_metric")
NOT_TRAINING = ("resume", "evaluate", "checkpoint", "caption_figure", "preset", "output_dir")
RESUME_ADDED = {"best_metric": "CIDEr"}  # settings added since: what older checkpoints did


def check_resumable(ckpt, cfg, path):
    """Refuses a resume whose settings would make it another run; says which changed settings it applies."""
    old, processes = {**RESUME_ADDED, **ckpt["config"]}, rank_and_size()[1]
    if ckpt["processes"] != processes:  # each step's batch holds batch_size captions per process
        raise UserError(f"checkpoint {path} was written by a run of {ckpt['processes']} process(es), and this one "
                        f"has {processes}: resume it with as many (torchrun --nproc_per_node=...), or train afresh")
    for name in RESUME_FIXED:
        if name not in old:
            raise UserError(f"checkpoint {path} does not record {name}: another version of this script wrote it; "
                            f"train afresh (without --resume)")
        if old[name] != getattr(cfg, name):
            raise UserError(f"checkpoint {path} was trained with {name}={old.get(name)} but the config says "
                            f"{name}={getattr(cfg, name)}: set --{name}={old.get(name)} to resume it, or train "
                            f"afresh (without --resume)")
    for name in CONFIG_NAMES:
        if name not in RESUME_FIXED + NOT_TRAINING and old.get(name) != getattr(cfg, name):
            log(f"resume: {name} was {old.get(name)!r}, now {getattr(cfg, name)!r} (applied from here on)")


def check_weights(ckpt, weights, path):
    if weights_sha256(weights) != ckpt["encoder_weights_sha256"]:
        raise UserError(f"checkpoint {path} was trained on other ResNet50 weights than {weights}: use "
                        f"--encoder_weights={ckpt['encoder_weights']}, the file it was trained with")


def diverged(loss, vocab_size):
    # a fresh model's loss is about log(vocab_size); ten times that only comes from a blown-up model
    return not math.isfinite(loss) or loss > 10 * math.log(vocab_size)


class CtrlC:
    """Ctrl-C while training: the first one sets .requested, which the loop reads at the end of a step, then saves
    last.pt; a second one stops at once and leaves last.pt as the previous, consistent one. Under torchrun, whose
    agent passes the terminal's Ctrl-C on (a second signal at once) and kills what is still running 30 s later,
    every SIGINT or SIGTERM only requests the stop."""
    requested = False

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.request) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def request(self, signum, frame):
        if self.requested and "LOCAL_RANK" not in os.environ:
            raise SystemExit(130)
        if not self.requested:
            log("\nCtrl-C: saving a checkpoint after this step (press again to stop at once)")
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def save_checkpoint(path, model, optimizer, cfg, weights, counters):
    """A flat dict of state dicts and counters, loaded with weights_only=True; config.json beside it says the same."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise UserError(f"the model's weights are not finite at step {counters['step']}: {path.name} not written")
    (path.parent / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    atomic_save({"model_args": model.args, "model": model.trainable_state_dict(), "optimizer": optimizer.state_dict(),
                 "vocab": model.vocab.itos, "freq_threshold": model.vocab.freq_threshold,
                 "config": dataclasses.asdict(cfg), "encoder_weights": str(weights),
                 "encoder_weights_sha256": weights_sha256(weights), **counters, "rng_state": torch.get_rng_state(),
                 "cuda_rng_state": torch.cuda.get_rng_state_all()}, path)


def build_or_resume(cfg, data, ckpt, resume_from):
    """A new model from the settings, or the one in the checkpoint being resumed (on the same vocabulary)."""
    torch.manual_seed(cfg.seed)  # after the data: the model's initial weights never depend on what was cached
    if ckpt:
        model, _ = load_captioner(resume_from, data.resnet, ckpt, cfg.decoder)
        if model.vocab.itos != data.vocab.itos:
            raise UserError(f"checkpoint {resume_from} has a different vocabulary ({len(model.vocab)} words, now "
                            f"{len(data.vocab)}): the captions in {cfg.data_dir} changed since it was written; "
                            f"train afresh")
        return model
    model = Captioner(data.vocab, cfg.embed_size, cfg.hidden_size, cfg.num_layers, cfg.dropout, cfg.image_size,
                      data.resnet, cfg.decoder)
    model.encoder.feature_mean.copy_(data.feature_stats[0])
    model.encoder.feature_std.copy_(data.feature_stats[1])
    return model


def record_losses(pending, epoch, vocab_size, cfg, device):
    """The losses of the pending steps [(step, lr, loss on the device)], averaged over the processes, checked for
    divergence and appended to loss_per_batch.csv: one read-back from the device for log_every steps."""
    losses = sum_over_processes((torch.stack([loss for _, _, loss in pending]) / rank_and_size()[1]).tolist(), device)
    bad = [(s, v) for (s, _, _), v in zip(pending, losses) if diverged(v, vocab_size)]
    if bad:
        raise UserError(f"the training loss diverged at epoch {epoch}, step {bad[0][0]} (loss {bad[0][1]:.4g}): "
                        f"lower --learning_rate (now {cfg.learning_rate}). No checkpoint was written after that step")
    if is_main_process():
        append_csv(Path(cfg.output_dir) / "loss_per_batch.csv", [(epoch, s, r, v) for (s, r, _), v in
                                                                 zip(pending, losses)], ["epoch", "step", "lr", "loss"])
    return losses


def validate(model, data, val_set, cfg, device):
    """Validation loss, token accuracy and caption metrics (None except in process 0); on the demo also its
    demo_accuracy, from greedy captions like the demo's test figures."""
    val_loss, token_accuracy = validation_loss(model, val_set, cfg, device)
    metrics, _ = evaluate_split(model, data, "val", cfg, device)
    if cfg.dataset == "demo":  # every process captions its share
        greedy, _ = generate_captions(model, data.source, data.images("val"), cfg, device, beam_size=1)
        if metrics:
            metrics["demo_accuracy"] = demo_accuracy(greedy, Path(cfg.data_dir) / "shapes.csv", None)[0]
    return val_loss, token_accuracy, metrics


def train(cfg, device):
    """Trains, validates every epoch, keeps best.pt (by best_metric on validation) and last.pt, then reports on
    test."""
    out, (rank, size), main = Path(cfg.output_dir), rank_and_size(), is_main_process()
    lock = main and claim_output_dir(out)  # noqa: F841 (held for the whole run)
    resume_from = out / "last.pt"
    ckpt = load_checkpoint(resume_from) if cfg.resume else None
    if ckpt:
        check_resumable(ckpt, cfg, resume_from)
    data = prepare_data(cfg, device, cfg.image_size, cfg.freq_threshold, ckpt and (resume_from, ckpt))
    model = build_or_resume(cfg, data, ckpt, resume_from).to(device)
    vocab = model.vocab
    # with torchrun, DDP averages the gradients of the processes; else the model as it is
    ddp = DistributedDataParallel(model, [device] if device.type == "cuda" else None, broadcast_buffers=False) \
        if size > 1 else model  # the buffers (feature statistics) never change
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    train_set = FlickrDataset(data.split("train"), vocab, data.source, cfg.max_train_caption_len)
    val_set = FlickrDataset(data.split("val"), vocab, data.source)
    steps_per_epoch = math.ceil(len(train_set) / (cfg.batch_size * size))
    total_steps = cfg.num_epochs * min(steps_per_epoch, cfg.max_batches_per_epoch or steps_per_epoch)
    epoch, step, batch, best_score, loss_sum, loss_count = 0, 0, 0, float("-inf"), 0.0, 0
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        epoch, step, batch, best_score, loss_sum, loss_count = (ckpt[k] for k in (
            "epoch", "step", "batch", "best_score", "loss_sum", "loss_count"))
        if batch:  # mid-epoch: dropout goes on as it would have
            torch.set_rng_state(ckpt["rng_state"])
            if torch.cuda.is_available() and ckpt["cuda_rng_state"]:
                torch.cuda.set_rng_state_all(ckpt["cuda_rng_state"])
        log(f"resuming from {resume_from}: epoch {epoch} done, step {step}")
    if main:  # the logs keep their rows up to the checkpoint, or start afresh
        for name, column, last in (("loss_per_batch.csv", "step", step), ("loss_per_epoch.csv", "epoch", epoch)):
            if ckpt:
                truncate_csv(out / name, column, last)
            else:
                (out / name).unlink(missing_ok=True)
        vocab.save(out / "vocab.json")
        meteor_scorer()  # its JVM loads while the first epoch trains
    counters = lambda: dict(epoch=epoch, step=step, batch=batch, best_score=best_score,  # noqa: E731
                            loss_sum=loss_sum, loss_count=loss_count, processes=size)  # what a checkpoint records
    sample_names, per_step = data.images("val")[:3], data.source.features is None
    stopping = False
    with CtrlC() as stop:
        while epoch < cfg.num_epochs and not (stopping := any_process(stop.requested, device)):
            if batch == 0:  # epochs are reproducible one by one; each process has its own dropout
                torch.manual_seed((cfg.seed * 1000 + epoch + 1) * size + rank)
            # a single process's batches of batch_size * size captions, each shared out among the processes
            batches = [b[rank::size] for b in epoch_batches(len(train_set), cfg.batch_size * size, cfg.seed,
                                                             epoch + 1, cfg.max_batches_per_epoch) if len(b) >= size]
            model.train()
            pending = []  # (step, lr, loss on the device): reading each back would sync the host every step
            start = time.time()
            bar = tqdm(caption_loader(train_set, batches[batch:], cfg, device), total=len(batches), initial=batch,
                       desc=f"epoch {epoch + 1}/{cfg.num_epochs}", unit="batch", leave=False)
            for images, captions in bar:
                batch, step = batch + 1, step + 1
                lr = learning_rate_at(step, total_steps, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                readable = images is not None  # else every image of this share was unreadable (already reported)
                if size > 1 and per_step:  # a process skipping DDP's step would leave the others waiting in it
                    readable = not any_process(not readable, device)
                if readable:
                    images, captions = images.to(device, non_blocking=True), captions.to(device, non_blocking=True)
                    with autocast(device):
                        loss, _, _ = ddp(images, captions)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    pending.append((step, lr, loss.detach()))
                # every log_every steps (every step when alone) the processes agree whether to stop
                stopping = (batch % cfg.log_every == 0 or batch == len(batches) or size == 1) and \
                    any_process(stop.requested, device)
                if pending and (len(pending) >= cfg.log_every or batch == len(batches) or stopping):
                    losses = record_losses(pending, epoch + 1, len(vocab), cfg, device)
                    loss_sum, loss_count = loss_sum + sum(losses), loss_count + len(losses)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", avg=f"{loss_sum / loss_count:.3f}")
                    pending.clear()
                if cfg.sample_every and batch % cfg.sample_every == 0:
                    print_samples(model, data.source, sample_names, cfg, device, f"step {step}")
                if stopping:
                    break
            bar.close()
            train_seconds = time.time() - start
            if stopping or any_process(stop.requested, device):
                stopping = True
                break  # before validation: last.pt below records the batch to go on from (at the end: validation)
            epoch, batch = epoch + 1, 0
            start = time.time()
            val_loss, token_accuracy, metrics = validate(model, data, val_set, cfg, device)
            eval_seconds = time.time() - start
            train_loss, loss_sum, loss_count = loss_sum / max(loss_count, 1), 0.0, 0  # before the checkpoints
            if main:
                row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                       "val_token_accuracy": token_accuracy, **metrics, "epoch_seconds": round(train_seconds, 2),
                       "eval_seconds": round(eval_seconds, 2)}
                append_csv(out / "loss_per_epoch.csv", [row], list(row))
                score = -val_loss if cfg.best_metric == "val_loss" else metrics[cfg.best_metric]  # higher: better
                # of equals the later: on the demo's 1/300 steps ties are common, and later is more trained
                best_score, was_best = max(best_score, score), score >= best_score
                log(f"epoch {epoch}: train loss {row['train_loss']:.3f}, val loss {val_loss:.3f}, token accuracy "
                    f"{token_accuracy:.1%}, {format_metrics(metrics)}; {train_seconds:.1f} s training, "
                    f"{eval_seconds:.1f} s validation (beam {cfg.beam_size}){'; best.pt' * was_best}")
                for name in ["best.pt"] * was_best + ["last.pt"]:
                    save_checkpoint(out / name, model, optimizer, cfg, data.weights, counters())
                plot_history(out)
            print_samples(model, data.source, sample_names, cfg, device, f"end of epoch {epoch}")
        if stopping:
            if main:
                save_checkpoint(out / "last.pt", model, optimizer, cfg, data.weights, counters())
            command = shlex.join([Path(__file__).name, *(a for a in sys.argv[1:] if a != "--resume"), "--resume"])
            log(f"\ninterrupted: saved {out / 'last.pt'} at step {step}. Resume with:\n  "
                f"{'torchrun ... ' if size > 1 else 'python '}{command}")
            return 130
    wait_for_all()  # for best.pt
    best, _ = load_captioner(out / "best.pt", data.resnet)
    test_report(best.to(device), data, cfg, device, out / "best.pt")
    if device.type == "cuda":
        log(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB")
    log(f"outputs in {out}: loss_per_batch.csv, loss_per_epoch.csv, loss_graph.png, metrics_graph.png, "
        f"test_metrics.json, test_captions.csv, test_examples.png, best.pt, last.pt, vocab.json, config.json")
    return 0


# -----------------------------------------------------------------------------
# evaluation and decoding
@torch.no_grad()
def beam_search(decoder, image_embeds, beam_size, max_len):
    """Batched beam search scored by log-probability per word; beam_size=1 is exactly greedy decoding.

    decoder: anything with start(embeds) -> state and step(tokens, state, first) -> (log-probs, state), whose
    state is a tuple of tensors with the batch in dimension 1. Returns each image's best word ids."""
    n, k, dev = image_embeds.size(0), beam_size, image_embeds.device
    state = tuple(s.repeat_interleave(k, dim=1) for s in decoder.start(image_embeds))  # each (L, n*k, H)
    tokens = torch.full((n * k,), Vocabulary.SOS, device=dev)  # (n*k,)
    seqs = torch.zeros(n * k, 0, dtype=torch.long, device=dev)  # (n*k, t): the words so far of every beam
    scores = torch.full((n, k), float("-inf"), device=dev)  # (n, k): summed log-probabilities
    scores[:, 0] = 0.0  # all beams start as the same hypothesis
    best_score, best_seq = torch.full((n,), float("-inf"), device=dev), [None] * n
    finished = torch.zeros(n, dtype=torch.long, device=dev)  # (n,): hypotheses ended so far
    offsets = torch.arange(n, device=dev).unsqueeze(1) * k  # (n, 1): each image's first row in n*k
    for t in range(max_len):
        logp, state = decoder.step(tokens, state, first=t == 0)  # (n*k, V)
        vocab_size = logp.size(-1)
        candidates = (scores.unsqueeze(-1) + logp.view(n, k, -1)).view(n, -1)  # (n, k*V)
        top, index = candidates.topk(min(2 * k, k * vocab_size), 1)  # (n, 2k): enough that k go on after EOS
        beam, word = index // vocab_size, index % vocab_size  # (n, 2k) each
        rank = torch.arange(top.size(1), device=dev).expand_as(top)  # (n, 2k)
        ends = (word == Vocabulary.EOS) & (rank < k) & (finished < k).unsqueeze(1) & (top > float("-inf"))
        ended_score, ended_at = torch.where(ends, top / (t + 1), float("-inf")).max(1)  # (n,) per-word scores
        for i in (ended_score > best_score).nonzero().flatten().tolist():
            best_score[i] = ended_score[i]
            best_seq[i] = seqs[offsets[i, 0] + beam[i, ended_at[i]]].tolist()
        finished += ends.sum(1)
        keep = (rank + (word == Vocabulary.EOS) * top.size(1)).argsort(1)[:, :k]  # (n, k): best k that go on
        rows = (offsets + beam.gather(1, keep)).view(-1)  # (n*k,): the beam each survivor extends
        tokens, scores = word.gather(1, keep).view(-1), top.gather(1, keep)  # (n*k,), (n, k)
        seqs = torch.cat([seqs[rows], tokens.unsqueeze(1)], 1)  # (n*k, t+1)
        state = tuple(s[:, rows] for s in state)
        if (finished >= k).all():
            break
    for i in range(n):  # none ended within max_len: the best hypothesis still going
        if best_seq[i] is None:
            best_seq[i] = seqs[offsets[i, 0] + scores[i].argmax()].tolist()
    return best_seq


def generate_captions(model, source, names, cfg, device, beam_size=None):
    """{name: caption} for images (one encoder pass or cached row each), and the names that could not be read.
    With torchrun, each process captions its share and every process gets all the captions."""
    model.eval()
    rank, size = rank_and_size()
    share, captions = names[rank::size], {}
    for inputs, index in image_batches(source, share, 64, cfg.num_workers, desc="captioning"):
        texts = model.generate(inputs.to(device), beam_size or cfg.beam_size, cfg.max_caption_len)
        captions.update({share[i]: text for i, text in zip(index.tolist(), texts)})
    captions = merge_over_processes(captions)
    return {n: captions[n] for n in names if n in captions}, [n for n in names if n not in captions]


def metric_text(caption):
    # coco-caption's PTB tokenizer drops punctuation before scoring; so do we, with the vocabulary's tokenizer
    return " ".join(t for t in Vocabulary.tokenize(caption) if any(ch.isalnum() or ch in "<>" for ch in t))


@functools.lru_cache(maxsize=1)
def meteor_scorer():
    """One METEOR process per run: starting its JVM and paraphrase table takes seconds, scoring milliseconds."""
    from pycocoevalcap.meteor.meteor import Meteor
    if shutil.which("java"):
        return Meteor()
    warn("METEOR is not computed: it needs Java (`java` on the PATH), e.g. apt-get install default-jre")


def caption_metrics(references, hypotheses):
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr with the coco-caption scorers (METEOR None without Java)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    refs = {i: [metric_text(c) for c in references[i]] for i in hypotheses}
    hyps = {i: [metric_text(hypotheses[i])] for i in hypotheses}
    metrics = {}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their progress
        bleu, _ = Bleu(4).compute_score(refs, hyps)
        metrics.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
        meteor = meteor_scorer()
        metrics["METEOR"] = None if meteor is None else float(meteor.compute_score(refs, hyps)[0])
        metrics["ROUGE-L"] = float(Rouge().compute_score(refs, hyps)[0])
        metrics["CIDEr"] = float(Cider().compute_score(refs, hyps)[0])
    return metrics


def format_metrics(metrics):
    return ", ".join(f"{k} {'n/a' if v is None else f'{100 * v:.1f}'}" for k, v in metrics.items())


def references_of(frame):
    return frame.groupby("image")["caption"].apply(list).to_dict()


def evaluate_split(model, data, split, cfg, device):
    """Metrics of the model's captions of one split against its references (in process 0 only; None in the
    others), and the captions."""
    captions, _ = generate_captions(model, data.source, data.images(split), cfg, device)
    return is_main_process() and caption_metrics(references_of(data.split(split)), captions) or None, captions


def print_samples(model, source, names, cfg, device, label):
    was_training = model.training
    captions, _ = generate_captions(model, source, names, cfg, device)
    for name, caption in captions.items():
        log(f"  [{label}] {name}: {caption}")
    model.train(was_training)


def test_report(model, data, cfg, device, checkpoint_path):
    """Test-split metrics, captions and an example figure for a loaded model, written to output_dir."""
    out = Path(cfg.output_dir)
    start = time.time()
    metrics, captions = evaluate_split(model, data, "test", cfg, device)
    if cfg.dataset == "demo":  # in every process: each captions its share
        greedy, _ = generate_captions(model, data.source, sorted(captions), cfg, device, beam_size=1)
    if not is_main_process():
        return None
    refs = references_of(data.split("test"))
    pd.DataFrame([(n, c, " | ".join(refs[n])) for n, c in captions.items()],
                 columns=["image", "caption", "references"]).to_csv(out / "test_captions.csv", index=False)
    report = {"checkpoint": str(checkpoint_path), "split": "test", "images": len(captions),
              "beam_size": cfg.beam_size, **metrics, "seconds": round(time.time() - start, 2)}
    if cfg.dataset == "demo":
        report["demo_colour_shape_accuracy"], singles = demo_accuracy(greedy, Path(cfg.data_dir) / "shapes.csv")
        report["demo_two_shape_accuracy"], pairs = demo_accuracy(greedy, Path(cfg.data_dir) / "shapes.csv", 2)
        log(f"demo: the greedy captions name the right colour and shape of "
            f"{report['demo_colour_shape_accuracy']:.1%} of {singles} held-out single-shape images, and both shapes "
            f"with their colours on the right sides of {report['demo_two_shape_accuracy']:.1%} of {pairs} "
            f"two-shape images")
    (out / "test_metrics.json").write_text(json.dumps(report, indent=2))
    log(f"test split, {len(captions)} images, beam {cfg.beam_size} ({checkpoint_path}):\n"
        + "\n".join(f"  {k:8s} {'n/a (needs Java)' if v is None else f'{100 * v:5.1f}'}"
                    for k, v in metrics.items()))
    examples = random.Random(cfg.seed).sample(sorted(captions), min(6, len(captions)))
    items = []
    for name in examples:
        log(f"  {name}: {captions[name]}\n      reference: {refs[name][0]}")
        items.append((data.source.image_dir / name, f"generated: {captions[name]}\nreference: {refs[name][0]}"))
    maps = word_maps(model, data.source, {name: captions[name] for name in examples}, device)
    save_caption_figure(items, out / "test_examples.png", [maps.get(name) for name in examples])
    return report


@torch.no_grad()
def word_maps(model, source, captions, device):
    """{name: [(word, its attention map (h, w))]} of an attention model's captions {name: caption}, replayed with
    each caption as input (the maps it was generated with); {} for the pooled decoder."""
    if not model.attention or not captions:
        return {}
    ids = pad_sequence([torch.tensor([Vocabulary.SOS, *model.vocab.numericalize(c.split()), Vocabulary.EOS])
                        for c in captions.values()], batch_first=True).to(device)
    inputs = torch.stack([source.get(name) for name in captions]).to(device)
    _, alphas = model.decoder(model.encoder(inputs), ids, alphas=True)
    side = math.isqrt(alphas.size(-1))
    return {name: list(zip(caption.split(), a.view(-1, side, side).cpu().numpy()))  # (T-1, h, w): a map a word
            for (name, caption), a in zip(captions.items(), alphas)}


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # figures go to files; no window, no display needed
    import matplotlib.pyplot as plt
    return plt


def save_caption_figure(items, path, maps=None):
    """Images (path, caption text) three to a row; with maps (per item, [(word, attention map)] or None), each
    image starts a row, followed by every word of its caption over the part of the image the model saw, lit where
    the word's attention was (as in Show, Attend and Tell's figures)."""
    if not items:
        return
    plt = pyplot()
    if maps and any(maps):
        panels = [[(image, text, None), *((image, word, m) for word, m in words or [])]
                  for (image, text), words in zip(items, maps)]
        rows, size, width = [p[i:i + 6] for p in panels for i in range(0, len(p), 6)], (2.6, 3.1), 32
    else:
        rows = [[(*item, None) for item in items[i:i + 3]] for i in range(0, len(items), 3)]
        size, width = (4.5, 5.2), 50
    cols = max(map(len, rows))
    fig, axes = plt.subplots(len(rows), cols, figsize=(size[0] * cols, size[1] * len(rows)), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for axes_row, row in zip(axes, rows):
        for ax, (image, text, word_map) in zip(axes_row, row):
            picture = open_rgb(image)
            if maps and any(maps):  # the centre square, as image_transform crops it
                picture = ImageOps.fit(picture, (min(picture.size),) * 2)
            ax.imshow(picture)
            if word_map is not None:
                ax.imshow(word_map, cmap="gray", alpha=0.65, interpolation="bilinear",
                          extent=(0, picture.width, picture.height, 0))
            ax.set_title("\n".join(textwrap.fill(line, width) for line in text.splitlines()), fontsize=8, loc="left")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def whole_epochs(*axes):
    from matplotlib.ticker import MaxNLocator
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epoch 2, not 2.5


def plot_history(out):
    plt = pyplot()
    batches, epochs = pd.read_csv(out / "loss_per_batch.csv"), pd.read_csv(out / "loss_per_epoch.csv")
    batches["mean of 50"] = batches["loss"].rolling(50, min_periods=1).mean()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    batches.plot(x="step", y=["loss", "mean of 50"], ax=left, ylabel="training loss", title="loss per batch")
    epochs.plot(x="epoch", y=["train_loss", "val_loss"], style="o-", ax=right, ylabel="loss", title="loss per epoch")
    whole_epochs(right)
    fig.savefig(out / "loss_graph.png", dpi=90)
    plt.close(fig)
    columns = ["val_token_accuracy", "BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "demo_accuracy", "CIDEr"]
    scores = 100 * epochs.set_index("epoch")[[c for c in columns if c in epochs]].astype(float).dropna(axis=1,
                                                                                                      how="all")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    scores.drop(columns="CIDEr").plot(style="o-", ax=left, ylabel="score x 100", title="validation metrics")
    scores[["CIDEr"]].plot(style="o-", color="tab:brown", ax=right, ylabel="score x 100",
                           title="validation CIDEr")
    whole_epochs(left, right)
    fig.savefig(out / "metrics_graph.png", dpi=90)
    plt.close(fig)


def evaluate_checkpoint(cfg, device):
    """--evaluate: the test report of a checkpoint (best.pt by default), on the dataset of the settings."""
    path = Path(cfg.checkpoint or Path(cfg.output_dir) / "best.pt")
    model, ckpt = load_captioner(path, decoder=cfg.decoder)
    lock = is_main_process() and claim_output_dir(cfg.output_dir)  # noqa: F841 (held while the report is written)
    data = prepare_data(cfg, device, model.args["image_size"], trained=(path, ckpt))
    if data.resnet is not None:
        model.encoder.attach(data.resnet)
    test_report(model.to(device), data, cfg, device, path)
    return 0


# -----------------------------------------------------------------------------
# captioning new images
def collect_images(paths):
    files, missing = [], []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            files.append(path)
        else:
            missing.append(path)
    return files, missing


def caption_images(cfg, paths, weights=None, device=None):
    """--caption: prints path<TAB>caption for each image; messages go to stderr. weights: the ResNet50 file
    (default: the one the checkpoint was trained with)."""
    figure = Path(cfg.caption_figure) if cfg.caption_figure else None
    if figure:  # checked before any captioning
        from matplotlib.backend_bases import FigureCanvasBase
        if figure.suffix[1:].lower() not in FigureCanvasBase.get_supported_filetypes():
            raise UserError(f"--caption_figure={figure}: name an image file such as captions.png (or .jpg, .pdf)")
        if not figure.parent.is_dir():
            raise UserError(f"--caption_figure={figure}: its folder {figure.parent} does not exist; create it first")
    path = Path(cfg.checkpoint or Path(cfg.output_dir) / "best.pt")
    model, ckpt = load_captioner(path, decoder=cfg.decoder)
    weights = Path(weights or ckpt["encoder_weights"])
    resnet = load_resnet50(weights)  # first: a missing or damaged file is its own clear error
    check_weights(ckpt, weights, path)
    model.encoder.attach(resnet)
    files, missing = collect_images(paths)
    if not files:
        print(f"error: no images found in {' '.join(map(str, paths))}", file=sys.stderr)
    names = [str(f.resolve()) for f in files]
    source = ImageSource(Path("/"), image_transform(model.args["image_size"]))
    captions, failed = generate_captions(model.to(device), source, names, cfg, device)
    for file, name in zip(files, names):
        if name in captions:
            print(f"{file}\t{captions[name]}", flush=True)
        else:
            print(f"error: cannot read image {file}", file=sys.stderr, flush=True)
    for file in missing:
        print(f"error: no such file or folder: {file}", file=sys.stderr, flush=True)
    if figure and captions:
        maps = word_maps(model, source, captions, device)
        save_caption_figure(list(captions.items()), figure, [maps.get(name) for name in captions])
        print(f"saved {figure}", file=sys.stderr)  # stdout holds only the captions
    return 1 if failed or missing or not files else 0


# -----------------------------------------------------------------------------
def main(argv=None):
    try:
        overrides, caption_paths = parse_args(sys.argv[1:] if argv is None else argv)
        captioning = caption_paths is not None  # then stdout holds only captions
        cfg = resolve_settings(overrides, echo=(lambda m: print(m, file=sys.stderr)) if captioning else log)
        device = pick_device(cfg.device)
        if captioning and "LOCAL_RANK" in os.environ:
            raise UserError("--caption runs in one process: run it with python, not torchrun")
        if captioning:
            return caption_images(cfg, caption_paths, overrides.get("encoder_weights"), device)
        device = start_processes(device)  # under torchrun: this process's GPU, and the others
        return evaluate_checkpoint(cfg, device) if cfg.evaluate else train(cfg, device)
    except UserError as error:
        say_once(f"error: {error}")
        return 2
    except KeyboardInterrupt:  # outside the training loop (which saves first): nothing to save
        say_once("interrupted")
        return 130
    except Exception:
        say_once(None)  # another process's failure (a lost connection) is not shown as this one's
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def say_once(message):
    """Prints message to stderr. Under torchrun, a failure that every process meets (a bad setting) must show
    once: the other processes wait a few seconds first, and are stopped by torchrun when process 0 has failed."""
    if "LOCAL_RANK" in os.environ and (not is_main_process() or message is None):
        time.sleep(3)
    if message:
        print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
