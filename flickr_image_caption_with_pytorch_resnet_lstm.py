"""Image captioning on Flickr8k, Flickr30k or MS-COCO: a frozen ResNet50 and an LSTM decoder.

    .venv/bin/python flickr_image_caption_with_pytorch_resnet_lstm.py  # train (the demo if no data)
    ... --resume                  # go on from output_dir's last.pt, with its own settings
    ... --evaluate                # the test split's metrics of best.pt (or --checkpoint=FILE)
    ... --caption a.jpg dir/      # captions of new images, from best.pt (or --checkpoint=FILE)
    ... --init_from=FILE          # a new run that starts from a checkpoint's weights

Every constant below can be overridden on the command line as --name=value; --help lists them all.
"""
import argparse
import concurrent.futures
import contextlib
import csv
import dataclasses
import datetime
import difflib
import fcntl
import functools
import hashlib
import html
import importlib
import io
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import tempfile
import textwrap
import time
import tokenize
import urllib.parse
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.nn.utils.rnn import pad_sequence
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm as _tqdm


class LazyModule:
    """Imported on first use: torchvision loads torch._dynamo, a second that --help can skip."""

    def __init__(self, name):
        self.name = name

    def __getattr__(self, attribute):
        return getattr(importlib.import_module(self.name), attribute)


torchvision = LazyModule("torchvision")
T = LazyModule("torchvision.transforms.v2")
ROOT = Path(__file__).resolve().parent

# config: plain constants; override any of them as --name=value (--help shows each with its comment)
# data
dataset = "auto"            # which data; 'auto': Flickr8k if it is there, else the built-in demo
data_dir = ""               # '' means resources/input/<dataset>
encoder_weights = "resources/models/resnet50-0676ba61.pth"  # ImageNet's, from ./setup.sh
output_dir = ""             # '' means resources/output/<dataset>, or the checkpoint's folder
cache_dir = "resources/cache"  # the frozen ResNet50's features, computed once per image
image_size = 224            # images are resized and centre-cropped to this many pixels
max_images = 0              # 0 = every image; else a quick partial run on this many
demo_images = 3000          # how many images of coloured shapes the built-in demo set has
# model
decoder = "lstm"            # 'lstm' (Show and Tell: the pooled feature is the LSTM's first input)
                            # or 'attention' (Show, Attend and Tell: attention over image regions)
embed_size = 400            # the size of word embeddings and of the projected image feature
hidden_size = 512           # the LSTM's state size
num_layers = 2              # stacked LSTM layers
dropout = 0.3               # dropout before the output layer (and between LSTM layers)
freq_threshold = 5          # a word enters the vocabulary when it occurs this often in training
# training
batch_size = 32             # captions per optimizer step (per process under torchrun)
num_epochs = 2              # epochs of cross-entropy training
learning_rate = 0.0002      # Adam's; the original's 3e-4 scaled for batch size 32
lr_schedule = "constant"    # 'constant' (the original) or 'cosine' (decays to 0 by the last step)
warmup_steps = 0            # steps of linear warm-up from 0 to learning_rate, before the schedule
max_batches_per_epoch = 0   # 0 = whole epochs
seed = 42                   # the splits, the initial weights and every epoch's order
device = "auto"             # 'auto' picks cuda, then mps, then cpu
num_workers = -1            # image-decoding processes; -1: one per CPU core, at most 16
sample_every = 200          # print sample captions every this many batches (0: never)
log_every = 10              # read the loss back from the device every this many batches
resume = False              # continue from last.pt in output_dir, with the settings it records
init_from = ""              # a checkpoint whose weights start a new run (its vocabulary must match)
# self-critical sequence training (SCST): after num_epochs of cross-entropy, optimise CIDEr-D itself
scst_epochs = 0             # 0 = off; SCST epochs after the cross-entropy ones (or later: --resume)
scst_learning_rate = 0.00005  # the learning rate of the SCST epochs
scst_samples = 5            # captions sampled per image (multinomial, temperature 1)
scst_baseline = "mean"      # 'mean' of the other samples (Luo 2020) or 'greedy' (Rennie 2017)
# decoding and evaluation
max_caption_len = 20        # generated captions stop after this many words
max_train_caption_len = 100  # longer training captions are cut to this many words (Flickr8k's: 40)
beam_size = 3               # beams of the beam search (1: greedy decoding)
best_metric = "auto"        # what picks best.pt: 'CIDEr', 'BLEU-4', 'val_loss' (lowest) or
                            # 'demo_accuracy' (demo captions right); 'auto': that, or off it CIDEr
# modes
evaluate = False            # evaluate a checkpoint on the test split and exit
checkpoint = ""             # for --evaluate and --caption; '' means best.pt in output_dir
preset = "auto"             # 'auto' (the dataset's own settings: PRESETS) or 'none' (the constants)

CONFIG_NAMES = [k for k, v in globals().items()
                if not k.startswith("_") and k.islower() and isinstance(v, (bool, int, float, str))]
# Settings resolved once per run, then frozen: cfg.learning_rate, never a dictionary code changes.
Config = dataclasses.make_dataclass("Config", [(n, type(globals()[n])) for n in CONFIG_NAMES],
                                    frozen=True)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


# The demo's settings over the constants, to finish in minutes on a 2-core CPU: its 36-word
# vocabulary needs no 2-layer 512-unit LSTM, and one layer of 256 reads the shapes as well in half
# the time
PRESETS = {"demo": dict(image_size=128, num_epochs=20, batch_size=64, learning_rate=0.002,
                        lr_schedule="cosine", embed_size=128, hidden_size=256, num_layers=1,
                        max_caption_len=24)}  # room to end its longest caption: 20 words, a stop


# --------------------------------------------------------------------------------------------------
# vocabulary: spaCy's tokens, and the words of the training split that occur freq_threshold times
# hands Vocabulary (words <-> ids) to the dataset, the models and the metrics

@functools.lru_cache(maxsize=1)
def spacy_tokenizer():
    import spacy  # spacy.blank("en") tokenizes exactly as en_core_web_sm does, with no model download
    return spacy.blank("en").tokenizer


class Vocabulary:
    PAD, SOS, EOS, UNK = 0, 1, 2, 3
    SPECIALS = ["<PAD>", "<SOS>", "<EOS>", "<UNK>"]

    def __init__(self, freq_threshold=5, itos=None):
        self.freq_threshold, self.itos = freq_threshold, list(self.SPECIALS if itos is None else itos)
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
        tokenized = [s if isinstance(s, list) else self.tokenize(s) for s in sentences]
        counts = Counter(token for tokens in tokenized for token in tokens)
        self.itos += [word for word, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
                      if count >= self.freq_threshold and word not in self.stoi]
        self.stoi = {word: i for i, word in enumerate(self.itos)}
        return self

    def numericalize(self, text):
        tokens = text if isinstance(text, list) else self.tokenize(text)
        return [self.stoi.get(token, self.UNK) for token in tokens]

    def decode(self, ids):
        ids = ids[:ids.index(self.EOS)] if self.EOS in ids else ids
        return " ".join(self.itos[i] for i in ids if i not in (self.PAD, self.SOS))

    def save(self, path):
        data = {"freq_threshold": self.freq_threshold, "itos": self.itos}
        Path(path).write_text(json.dumps(data, indent=0))  # a word a line

    @classmethod
    def load(cls, path):
        return cls(**json.loads(Path(path).read_text()))  # the keys are __init__'s arguments


# --------------------------------------------------------------------------------------------------
# dataset and batches: one item per caption, its image's cached ResNet50 features and its word ids
# hands (features, padded captions) batches, in an order fixed by seed and epoch, to the training loop

def image_transform(size):
    return T.Compose([T.ToImage(), T.Resize(size, antialias=True), T.CenterCrop(size),
                      T.ToDtype(torch.float32, scale=True),
                      T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])


class ImageSource:
    """Encoder inputs by image name: cached 2048-d features when there are some, else decoded images."""

    def __init__(self, image_dir, transform, features=None, names=None):
        self.image_dir, self.transform, self.features = Path(image_dir), transform, features
        self.row = {name: i for i, name in enumerate(names or [])}

    def get(self, name):
        if self.features is not None:
            return self.features[self.row[name]]
        return load_image(self.image_dir / name, self.transform)


class FlickrDataset(Dataset):
    """One item per caption: (encoder input for its image, caption ids with <SOS> and <EOS>)."""

    def __init__(self, captions, vocab, source, max_len=None):
        self.images, self.source = captions["image"].tolist(), source
        tokens = captions["tokens"] if "tokens" in captions else Vocabulary.tokenize_many(captions["caption"])
        cut = sum(len(t) > max_len for t in tokens) if max_len else 0
        if cut:  # one 10,000-word caption once made two batches take 420 s
            tokens = [t[:max_len] for t in tokens]
            log(f"{cut} caption(s) longer than {max_len} words cut to {max_len} words")
        self.captions = [torch.tensor([vocab.SOS, *vocab.numericalize(t), vocab.EOS]) for t in tokens]
        self.lengths = torch.tensor([len(c) for c in self.captions])
        if source.features is not None:  # every batch is then indexed from these, in place
            self.padded = pad_sequence(self.captions, batch_first=True).int()  # (N, T)
            self.rows = torch.tensor([source.row[name] for name in self.images])  # (N,): feature rows

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return self.source.get(self.images[i]), self.captions[i]

    def batch(self, indices):
        """The captions at indices with their cached features, in one indexing each, without a DataLoader."""
        index = torch.tensor(indices)
        longest = int(self.lengths[index].max())  # on the host: no wait for a GPU
        features = self.source.features[self.rows[index].to(self.source.features.device)]  # (B, [L,] 2048)
        return features, self.padded[index, :longest].long()  # (B, T)


class CapsCollate:
    """Stacks a batch's images and pads its captions (with <PAD>, 0) to the longest."""

    def __call__(self, batch):
        images, captions = zip(*batch)
        return torch.stack(images), pad_sequence(captions, batch_first=True, padding_value=Vocabulary.PAD)


def caption_batches(dataset, batches, cfg, device):
    """(inputs, padded captions) on the device per batch: indexed from cached features, else decoded."""
    if dataset.source.features is not None:
        pairs = map(dataset.batch, batches)
    else:  # its own generator: a DataLoader otherwise draws from the global RNG, and resumes would differ
        pairs = DataLoader(dataset, batch_sampler=batches, collate_fn=CapsCollate(),
                           generator=torch.Generator(), num_workers=cfg.num_workers,
                           pin_memory=device.type == "cuda")
    for inputs, captions in pairs:
        yield inputs.to(device, non_blocking=True), captions.to(device, non_blocking=True)


@dataclasses.dataclass
class Data:
    frame: pd.DataFrame         # image, caption, tokens, split: one row per caption
    source: "ImageSource"       # encoder inputs by image name
    weights: Path               # the ResNet50 file the features come from
    feature_stats: tuple        # mean and std (2048,) of the training split's features (per channel)
    train_images_sha256: str    # which images the split trains on, as checkpoints record it
    vocab: "Vocabulary" = None  # of the training split, when asked for
    resnet: nn.Module = None    # only when features are not cached: the encoder then runs every step

    def split(self, name):
        return self.frame[self.frame["split"] == name]

    def images(self, split):
        return sorted(self.split(split)["image"].unique())


def epoch_batches(n, batch_size, seed, epoch, max_batches=0):
    """The epoch's batches of caption indices, in an order fixed by seed and epoch: a resume repeats it."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)][:max_batches or None]


def process_batches(n, cfg, epoch):
    """This process's share of each step's batch: any number of processes takes the same steps."""
    rank, size = rank_and_size()
    batches = epoch_batches(n, cfg.batch_size * size, cfg.seed, epoch, cfg.max_batches_per_epoch)
    return [batch[rank::size] for batch in batches if len(batch) >= size]


# --------------------------------------------------------------------------------------------------
# models: EncoderCNN projects the frozen ResNet50's features; DecoderRNN (Show and Tell) or
# AttentionDecoder (Show, Attend and Tell) writes the caption; Captioner holds both and the vocabulary

def resnet_grid(resnet, images):
    """ResNet50's last convolutional grid, L = h*w vectors (B, L, 2048); their mean is the pooled feature."""
    out = resnet(images.contiguous(memory_format=torch.channels_last)).float()  # (B, 2048*h*w)
    return out.view(out.size(0), 2048, -1).transpose(1, 2)  # (B, L, 2048)


class EncoderCNN(nn.Module):
    """Frozen ResNet50 (always in eval mode) and a trained projection of its standardised 2048-d features."""

    def __init__(self, embed_size, resnet=None, spatial=False):
        super().__init__()
        self.resnet, self.spatial = None, spatial
        if resnet is not None:
            self.attach(resnet)
        # standardising with the training set's statistics (per channel, over every grid cell for the
        # attention decoder) is what lets the decoder read random-weight features
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
            cells = resnet_grid(self.resnet, images)
            return cells if self.spatial else cells.mean(1)

    def forward(self, x):
        """Images (B, 3, H, W) or cached features (B, 2048) or grid (B, L, 2048) -> (B, E) or (B, L, E)."""
        features = x.float() if x.dim() < 4 else self.features(x)  # cached grids are float16
        return self.embed((features - self.feature_mean) / self.feature_std)


class DecoderRNN(nn.Module):
    """The image embedding is the first input step, then <SOS> and the caption's words."""

    def __init__(self, embed_size, hidden_size, vocab_size, num_layers=2, dropout=0.3):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.lstm = nn.LSTM(embed_size, hidden_size, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.to_vocab = nn.Linear(hidden_size, vocab_size)
        self.drop = nn.Dropout(dropout)

    def forward(self, image_embeds, captions):
        """Logits for captions[:, 1:] given the image (B, E) and captions[:, :-1] (B, T-1): (B, T-1, V)."""
        x = torch.cat([image_embeds.unsqueeze(1), self.drop(self.embed(captions[:, :-1]))], 1)  # (B, T, E)
        out, _ = self.lstm(x)  # (B, T, H)
        return self.to_vocab(self.drop(out[:, 1:]))  # the image step predicts nothing: (B, T-1, V)

    def start(self, image_embeds):
        """The LSTM state after reading the image: (h, c), each (num_layers, B, H)."""
        _, state = self.lstm(image_embeds.unsqueeze(1))  # (B, 1, E) in
        return state

    def step(self, tokens, state, first=False):
        """Log-probabilities (B, V) of the word after tokens (B,); never <EOS> first: no caption is empty."""
        out, state = self.lstm(self.embed(tokens).unsqueeze(1), state)  # (B, 1, H)
        return next_word_logp(self.to_vocab(out.squeeze(1)), first), state


def next_word_logp(logits, first):
    never = [Vocabulary.PAD, Vocabulary.SOS, Vocabulary.EOS] if first else [Vocabulary.PAD, Vocabulary.SOS]
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, V)
    return logp.index_fill(1, torch.tensor(never, device=logp.device), -math.inf)  # a copy: SCST's gradient


def sample_captions(decoder, image_embeds, n, max_len, greedy=False):
    """n captions per image drawn word by word: ids (B*n, T), <EOS> then <PAD>, and each word's log-prob."""
    state = tuple(s.repeat_interleave(n, dim=1) for s in decoder.start(image_embeds))  # each (L, B*n, H)
    tokens = torch.full((image_embeds.size(0) * n,), Vocabulary.SOS, device=image_embeds.device)  # (B*n,)
    ended = torch.zeros_like(tokens, dtype=torch.bool)
    words, logps = [], []
    for t in range(max_len):
        logp, state = decoder.step(tokens, state, first=t == 0)  # (B*n, V)
        tokens = logp.argmax(-1) if greedy else torch.multinomial(logp.exp(), 1).squeeze(1)  # temperature 1
        tokens = tokens.masked_fill(ended, Vocabulary.PAD)
        words.append(tokens)
        logps.append(logp.gather(1, tokens.unsqueeze(1)).squeeze(1).masked_fill(ended, 0.0))
        ended = ended | (tokens == Vocabulary.EOS)
        if ended.all():
            break
    return torch.stack(words, 1), torch.stack(logps, 1)  # (B*n, T) each


# Xu et al.'s lambda (1 in the paper): how strongly every grid cell must be looked at once per caption. Lower
# leaves the attention on the objects rather than on empty background cells (README: attention)
DOUBLY_STOCHASTIC_WEIGHT = 0.2


class AttentionDecoder(nn.Module):
    """Show, Attend and Tell's soft attention over the grid cells (Xu et al., 2015; README: attention)."""

    def __init__(self, embed_size, hidden_size, vocab_size, num_layers=2, dropout=0.3):
        super().__init__()
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.init_state = nn.Linear(embed_size, 2 * num_layers * hidden_size)
        self.key, self.query = nn.Linear(embed_size, hidden_size), nn.Linear(hidden_size, hidden_size)
        self.score, self.gate = nn.Linear(hidden_size, 1), nn.Linear(hidden_size, 1)
        # LSTM cells rather than nn.LSTM: faster one step at a time on a CPU
        self.lstm_cells = nn.ModuleList(nn.LSTMCell(hidden_size if i else 2 * embed_size, hidden_size)
                                   for i in range(num_layers))
        self.to_vocab = nn.Linear(hidden_size, vocab_size)
        self.drop = nn.Dropout(dropout)

    def start(self, cells):
        """The state before the first word, from the cells (B, L, E); the batch in dimension 1 throughout."""
        # (h, c, cells, keys, alpha): (layers, B, H) twice, (L, B, E), (L, B, H), the last attention (1, B, L)
        h, c = torch.tanh(self.init_state(cells.mean(1))).view(-1, 2 * self.num_layers, self.hidden_size) \
            .transpose(0, 1).chunk(2)  # (L, B, H) each: layers first
        cells = cells.transpose(0, 1)  # (L, B, E)
        return h.contiguous(), c.contiguous(), cells, self.key(cells), cells.new_zeros(1, *cells.shape[1::-1])

    def advance(self, words, state):
        """The top LSTM layer's output (B, H) after attending and reading the embedded words (B, E)."""
        h, c, cells, keys, _ = state
        alpha = self.score(torch.tanh(keys + self.query(h[-1]))).squeeze(-1).softmax(0)  # (L, B)
        context = torch.sigmoid(self.gate(h[-1])) * (alpha.unsqueeze(-1) * cells).sum(0)  # (B, E)
        x, layers = torch.cat([words, context], -1), []  # (B, 2E)
        for cell, h_layer, c_layer in zip(self.lstm_cells, h, c):
            layers.append(cell(x, (h_layer, c_layer)))
            x = self.drop(layers[-1][0])  # between layers, as nn.LSTM's dropout
        h, c = (torch.stack(s) for s in zip(*layers))  # (num_layers, B, H) each
        return h[-1], (h, c, cells, keys, alpha.t().unsqueeze(0))

    def forward(self, cells, captions, alphas=False):
        """Logits (B, T-1, V) for captions[:, 1:] given cells (B, L, E); with alphas, each step's map too."""
        state, words = self.start(cells), self.drop(self.embed(captions[:, :-1]))  # (B, T-1, E)
        outs, maps = [], []
        for t in range(words.size(1)):
            out, state = self.advance(words[:, t], state)
            outs.append(out)
            maps.append(state[-1][0])
        logits = self.to_vocab(self.drop(torch.stack(outs, 1)))  # (B, T-1, V)
        return (logits, torch.stack(maps, 1)) if alphas else logits

    def step(self, tokens, state, first=False):
        """As DecoderRNN.step."""
        out, state = self.advance(self.embed(tokens), state)
        return next_word_logp(self.to_vocab(out), first), state


DECODERS = {"lstm": DecoderRNN, "attention": AttentionDecoder}


class Captioner(nn.Module):
    """The trained model: encoder projection and decoder, its vocabulary and the sizes that rebuild it."""

    def __init__(self, vocab, args, resnet=None):
        super().__init__()
        self.vocab = vocab
        self.args = dict(args)  # MODEL_ARGS, as nanoGPT's model_args
        self.attention = args["decoder"] == "attention"
        self.encoder = EncoderCNN(args["embed_size"], resnet, spatial=self.attention)
        self.decoder = DECODERS[args["decoder"]](args["embed_size"], args["hidden_size"], len(vocab),
                                                 args["num_layers"], args["dropout"])

    def forward(self, inputs, captions=None, samples=1, max_len=20, greedy=False):
        """Loss (with attention's penalty in training), logits (B, T-1, V), targets; no captions: samples."""
        if captions is None:  # in forward, so that DistributedDataParallel averages SCST's gradients too
            return sample_captions(self.decoder, self.encoder(inputs), samples, max_len, greedy)
        targets, penalty = captions[:, 1:], 0.0
        if self.attention and self.training:
            logits, alphas = self.decoder(self.encoder(inputs), captions, alphas=True)  # alphas (B, T-1, L)
            looked = (alphas * (targets != Vocabulary.PAD).unsqueeze(-1)).sum(1)  # (B, L)
            penalty = DOUBLY_STOCHASTIC_WEIGHT * ((1 - looked) ** 2).mean()
        else:
            logits = self.decoder(self.encoder(inputs), captions)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1),  # (B*(T-1), V)
                               ignore_index=Vocabulary.PAD)
        return loss + penalty, logits, targets

    @torch.no_grad()
    def generate(self, inputs, beam_size=3, max_len=20):
        """Captions (strings) of a batch of images or cached features; beam_size=1 is greedy decoding."""
        ids = beam_search(self.decoder, self.encoder(inputs), beam_size, max_len)
        return [self.vocab.decode(seq) for seq in ids]

    def trainable_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.resnet.")}


# --------------------------------------------------------------------------------------------------
# training: the cross-entropy step, the self-critical (SCST) step and its CIDEr-D reward, the
# learning-rate schedule and the loop over steps; hands best.pt and the logs to validation and the report

def ngram_codes(ids, base):
    """Each n-gram (n = 1..4) of 0-padded word ids (M, T) as one integer in [base^(n-1), base^n): (M, 4T)."""
    codes, code, whole = [], torch.zeros_like(ids), torch.ones_like(ids, dtype=torch.bool)
    for n in range(4):
        word = F.pad(ids, (0, n))[:, n:]  # (M, T): the n-gram's last word
        code, whole = code * base + word, whole & (word > 0)
        codes.append(torch.where(whole, code, 0))
    return torch.cat(codes, 1)  # (M, 4T)


def pad_references(refs):
    """Each image's references (lists of word ids) in one tensor (N, R, T), 0 for padding and missing ones."""
    flat = pad_sequence([torch.tensor(r, dtype=torch.int32) for rs in refs for r in rs], True)  # (all, T)
    return pad_sequence(flat.split([len(rs) for rs in refs]), batch_first=True)  # (N, R, T)


def distinct(codes):
    """Each row's distinct nonzero codes (M, W) and their counts: (row, code, count), (P,) each."""
    # by hand: torch's unique_consecutive(dim=0) of (row, code) pairs gives the same, 7-25 times slower
    codes = codes.sort(1).values
    starts = torch.ones_like(codes, dtype=torch.bool)
    starts[:, 1:] = codes[:, 1:] != codes[:, :-1]  # where a run of equal codes starts, in every row at 0
    at = starts.flatten().nonzero().squeeze(1)  # (runs,)
    counts = torch.diff(at, append=torch.tensor([codes.numel()]))
    rows, values = at // codes.size(1), codes.flatten()[at]
    return rows[values > 0], values[values > 0], counts[values > 0].double()


class CiderD:
    """coco-caption's CIDEr-D of word ids, vectorised; document frequencies from the references, once."""

    def __init__(self, refs, vocab_size, scored=None):
        if vocab_size ** 4 >= 2 ** 63:  # an n-gram's code must fit in 64 bits
            raise UserError(f"the reward handles up to 55,108 words, and the vocabulary has {vocab_size}: "
                            f"raise --freq_threshold")
        self.base, self.scored = vocab_size, scored  # scored: which word ids count (all if None)
        padded = pad_references(refs)  # (N, R, T)
        n, r, t = padded.shape
        self.refs = self.words(padded.flatten(0, 1).long()).view(n, r, t).int()
        self.log_images = math.log(n)
        chunks = [self.refs[i:i + 4096].flatten(0, 1).long() for i in range(0, n, 4096)]  # bounded memory
        per_image = [distinct(ngram_codes(c, self.base).view(-1, r * 4 * c.size(1)))[1] for c in chunks]
        self.grams, self.df = torch.cat(per_image).unique(return_counts=True)  # each n-gram once an image
        norms = [self.norms(*distinct(ngram_codes(c, self.base)), len(c)) for c in chunks]
        self.ref_norm = torch.cat([norm for norm, _ in norms]).view(n, r, 4)
        self.ref_length = torch.cat([length for _, length in norms]).view(n, r)

    def words(self, ids):
        """The scored words of each row of ids (H, T), moved to the front, 0 after them."""
        keep = ids > 0 if self.scored is None else self.scored[ids] & (ids > 0)
        order = (~keep).to(torch.uint8).sort(dim=-1, stable=True).indices
        return torch.where(keep, ids, 0).gather(-1, order)

    def tfidf(self, grams, counts):
        place = torch.searchsorted(self.grams, grams).clamp_max(len(self.grams) - 1)
        df = torch.where(self.grams[place] == grams, self.df[place], 0)  # 0: in no reference
        return counts * (self.log_images - df.clamp_min(1).double().log())

    def norms(self, rows, grams, counts, m):
        """Each row's tf-idf norm per n-gram length (m, 4) and coco-caption's length, its bigrams (m,)."""
        size = sum(grams >= self.base ** k for k in (1, 2, 3))  # n - 1
        squares = self.tfidf(grams, counts).square()
        norm = torch.zeros(m, 4, dtype=torch.float64).index_put_((rows, size), squares, accumulate=True)
        length = torch.zeros(m, dtype=torch.float64).index_put_((rows[size == 1],), counts[size == 1], True)
        return norm.sqrt(), length

    def __call__(self, hyps, images):
        """The CIDEr-D (x10, as coco-caption's) of each caption (H, T) against its image's references."""
        h, r = len(hyps), self.refs.size(1)
        rows, grams, counts = distinct(ngram_codes(self.words(hyps), self.base))  # (P,) each
        if not len(grams):
            return torch.zeros(h, dtype=torch.float64)
        vec = self.tfidf(grams, counts)  # (P,)
        norm, length = self.norms(rows, grams, counts, h)  # (H, 4), (H,)
        used, column = grams.unique(return_inverse=True)  # the hypotheses' n-grams (U,), and each pair's
        refs = self.refs[images]  # (H, R, T)
        ref_rows, ref_grams, ref_counts = distinct(ngram_codes(refs.flatten(0, 1).long(), self.base))
        place = torch.searchsorted(used, ref_grams).clamp_max(len(used) - 1)
        hit = used[place] == ref_grams  # the references' counts of those n-grams, by (reference row, n-gram)
        keys = torch.cat([ref_rows[hit] * len(used) + place[hit], torch.tensor([2 ** 63 - 1])])
        found = torch.cat([ref_counts[hit], torch.zeros(1, dtype=torch.float64)])
        query = (rows.unsqueeze(1) * r + torch.arange(r)) * len(used) + column.unsqueeze(1)  # (P, R)
        at = torch.searchsorted(keys, query)
        ref_vec = torch.where(keys[at] == query, found[at], 0) * (vec / counts).unsqueeze(1)  # (P, R)
        clipped = torch.minimum(vec.unsqueeze(1), ref_vec) * ref_vec  # (P, R)
        size = sum(grams >= self.base ** k for k in (1, 2, 3))
        overlap = torch.zeros(h, 4, r, dtype=torch.float64).index_put_((rows, size), clipped, accumulate=True)
        ref_norm, ref_length = self.ref_norm[images], self.ref_length[images]  # (H, R, 4), (H, R)
        cosine = overlap.transpose(1, 2) / (norm.unsqueeze(1) * ref_norm).clamp_min(1e-300)  # (H, R, 4)
        delta = length.unsqueeze(1) - ref_length  # (H, R)
        score = cosine.mean(-1) * torch.exp(-delta.square() / (2 * 6.0 ** 2))  # the Gaussian length penalty
        real = refs.amax(-1) > 0  # (H, R): references, not padding
        return 10 * (score * real).sum(1) / real.sum(1)  # (H,)


def scst_data(data, vocab, max_len=0):
    """One item per training image, and the CIDEr-D reward with its captions (and <EOS>) as the references."""
    refs = data.split("train").groupby("image")["tokens"].apply(list)  # sorted by image
    images = pd.DataFrame({"image": refs.index, "tokens": [r[0] for r in refs]})
    ids = [[vocab.numericalize(t[:max_len or None]) + [Vocabulary.EOS] for t in r] for r in refs]
    # the words the metrics score (metric_text drops punctuation), and <EOS>: the model is rewarded for ending
    scored = torch.tensor([any(c.isalnum() or c in "<>" for c in w) for w in vocab.itos])
    scored[[Vocabulary.PAD, Vocabulary.SOS]] = False
    return FlickrDataset(images, vocab, data.source), CiderD(ids, len(vocab), scored)


def scst_step(ddp, model, optimizer, inputs, images, reward, lr, cfg, device):
    """One step on the sampled captions' CIDEr-D above the baseline: the loss, mean reward, greedy CIDEr-D."""
    n = cfg.scst_samples
    with autocast(device):
        words, logps = ddp(inputs, samples=n, max_len=cfg.max_caption_len)  # (B*n, T) each
    with torch.no_grad(), evaluating(model):
        greedy, _ = model(inputs, max_len=cfg.max_caption_len, greedy=True)  # (B, T)
    images = torch.as_tensor(images)
    rewards = reward(words.cpu(), images.repeat_interleave(n)).view(-1, n)  # (B, n)
    greedy_reward = reward(greedy.cpu(), images)  # (B,)
    baseline = greedy_reward.unsqueeze(1)
    if cfg.scst_baseline == "mean":
        baseline = (rewards.sum(1, keepdim=True) - rewards) / (n - 1)
    advantage = (rewards - baseline).view(-1, 1).to(device, torch.float)  # (B*n, 1)
    mask = words != Vocabulary.PAD  # the words up to and with <EOS>: the model learns where to end
    loss = -(advantage * logps * mask).sum() / mask.sum()
    optimizer_step(optimizer, loss, lr)
    figures = torch.stack([rewards.mean(), greedy_reward.mean()]).float().to(device)  # not all have float64
    return torch.cat([loss.detach().float().view(1), figures])


@dataclasses.dataclass
class Progress:
    """How far a run has come: what a checkpoint records besides the weights."""
    epoch: int = 0  # epochs trained and validated
    step: int = 0  # optimizer steps taken
    best_score: float = float("-inf")  # of best_metric, higher is better
    loss_sum: float = 0.0  # over the recorded steps of the epoch under way
    loss_count: int = 0
    reward_sum: float = 0.0  # self-critical steps: their sampled and greedy captions' CIDEr-D
    greedy_sum: float = 0.0


def count_steps(dataset, cfg, what):
    """This process's steps in an epoch of dataset; none at all is one clear error."""
    steps = len(process_batches(len(dataset), cfg, 1))
    if steps == 0:
        raise UserError(f"{len(dataset)} {what} cannot be shared by {rank_and_size()[1]} processes: use more")
    return steps


def epoch_and_batch(step, steps_per_epoch, scst_steps, cfg):
    """The 0-based epoch and batch of a step: num_epochs of cross-entropy, then the self-critical epochs."""
    cross_entropy_steps = cfg.num_epochs * steps_per_epoch
    if step < cross_entropy_steps or not scst_steps:
        return divmod(step, steps_per_epoch)
    epoch, batch = divmod(step - cross_entropy_steps, scst_steps)
    return cfg.num_epochs + epoch, batch


def learning_rate_at(step, total_steps, cfg):
    """The learning rate of a step (1-based): a function of the step alone, which a resume continues."""
    if step > total_steps and cfg.scst_epochs:  # the self-critical steps, after the cross-entropy ones
        return cfg.scst_learning_rate
    if step <= cfg.warmup_steps:
        return cfg.learning_rate * step / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)  # 1 at the last step
        return cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.learning_rate


def start_run(cfg, device, out):
    """A fresh run's data, model, optimizer and progress, or last.pt's (--resume): the one place for both."""
    model, ckpt = restore(out / "last.pt") if cfg.resume else (None, None)
    data = prepare_data(cfg, device, build_vocab=True, trained=ckpt)
    if device.type == "cuda" and data.source.features is not None:  # batches are then gathered on the GPU
        if data.source.features.nbytes < torch.cuda.mem_get_info(device)[0] // 2:
            data.source.features = data.source.features.to(device)
    torch.manual_seed(cfg.seed)  # after the data: the model's initial weights never depend on what was cached
    if ckpt:
        progress = Progress(**{f.name: ckpt[f.name] for f in dataclasses.fields(Progress)})
        if data.resnet is not None:
            model.encoder.attach(data.resnet)
    else:
        model = Captioner(data.vocab, {name: getattr(cfg, name) for name in MODEL_ARGS}, data.resnet)
        model.encoder.feature_mean.copy_(data.feature_stats[0])
        model.encoder.feature_std.copy_(data.feature_stats[1])
        progress = Progress()
        if cfg.init_from:
            init_weights(model, cfg.init_from, data.weights)
    fused = True if device.type == "cuda" else None  # one kernel for all the parameters on a GPU
    optimizer = torch.optim.Adam([p for p in model.to(device).parameters() if p.requires_grad],
                                 lr=cfg.learning_rate, fused=fused)
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng_state"])  # mid-epoch: dropout goes on as it would have
        if torch.cuda.is_available() and ckpt["cuda_rng_state"]:
            torch.cuda.set_rng_state_all(ckpt["cuda_rng_state"][:torch.cuda.device_count()])
        log(f"resuming from {ckpt['path']}: epoch {progress.epoch} done, step {progress.step}")
    if is_main_process():  # the logs keep their rows up to the checkpoint (a fresh run's folder is empty)
        truncate_csv(out / "loss_per_batch.csv", "step", progress.step)
        truncate_csv(out / "loss_per_epoch.csv", "epoch", progress.epoch)
        model.vocab.save(out / "vocab.json")
        meteor_scorer()  # its JVM loads while the first epoch trains
    return data, model, optimizer, progress


def train_step(model, optimizer, inputs, captions, lr, device):
    """One optimizer step; the loss stays on the device, as reading it would wait for the GPU every step."""
    with autocast(device):
        loss, _, _ = model(inputs, captions)
    optimizer_step(optimizer, loss, lr)
    return loss.detach()


def optimizer_step(optimizer, loss, lr):
    """One Adam step on the loss's gradient at this step's learning rate (cross-entropy and SCST alike)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def record_losses(pending, progress, vocab_size, cfg, device, bar):
    """Averages the pending steps' losses over the processes, checks them and appends them to the CSV."""
    if not pending:
        return
    stats = torch.stack([p[3] for p in pending]) / rank_and_size()[1]  # (steps,), or (steps, 3) with rewards
    stats = torch.tensor(sum_over_processes(stats.flatten().tolist(), device)).view(len(pending), -1)
    scst = stats.size(1) > 1
    phase = "self-critical" if scst else "cross-entropy"
    rows = [(epoch, step, phase, lr, *v) for (epoch, step, lr, _), v in zip(pending, stats.tolist())]
    limit = math.inf if scst else 10 * math.log(vocab_size)  # a fresh model's loss is about log(vocab_size)
    bad = [row for row in rows if not math.isfinite(row[4]) or row[4] > limit]
    if bad:
        rate = "scst_learning_rate" if scst else "learning_rate"
        epoch, step, _, _, loss = bad[0][:5]
        raise UserError(f"the training loss diverged at epoch {epoch}, step {step} (loss {loss:.4g}): lower "
                        f"--{rate} (now {getattr(cfg, rate)}). No checkpoint was written after that step")
    if is_main_process():
        columns = ["epoch", "step", "phase", "lr", "loss"] + (["reward", "greedy_cider"] if scst else [])
        append_csv(Path(cfg.output_dir) / "loss_per_batch.csv", rows, columns)
    progress.loss_sum += float(stats[:, 0].sum())
    progress.loss_count += len(stats)
    if scst:
        progress.reward_sum += float(stats[:, 1].sum())
        progress.greedy_sum += float(stats[:, 2].sum())
    average = ("avg reward", progress.reward_sum) if scst else ("avg", progress.loss_sum)
    bar.set_postfix({"loss": f"{stats[-1, 0]:.3f}", average[0]: f"{average[1] / progress.loss_count:.3f}"})
    pending.clear()


def end_epoch(model, optimizer, data, val_set, progress, train_seconds, cfg, device):
    """Validation, the epoch's row and log line, best.pt when it is the best yet, last.pt, graphs, samples."""
    start = time.time()
    val_loss, token_accuracy = validation_loss(model, val_set, cfg, device)
    metrics, _ = evaluate_split(model, data, "val", cfg, device)
    metrics |= demo_scores(model, data, "val", cfg, device)
    eval_seconds = time.time() - start
    progress.epoch += 1
    count, scst = max(progress.loss_count, 1), progress.epoch > cfg.num_epochs
    train = {"phase": "self-critical" if scst else "cross-entropy", "train_loss": progress.loss_sum / count}
    said = f"train loss {train['train_loss']:.3f}"
    if scst:  # the loss of a self-critical step is no cross-entropy: the rewards say how it goes
        train |= {"reward": progress.reward_sum / count, "greedy_cider": progress.greedy_sum / count}
        reward, greedy = 100 * train["reward"], 100 * train["greedy_cider"]
        said = f"self-critical: reward {reward:.1f}, greedy CIDEr-D {greedy:.1f}"
    progress.loss_sum = progress.reward_sum = progress.greedy_sum = 0.0  # before the checkpoints
    progress.loss_count = 0
    if is_main_process():
        out = Path(cfg.output_dir)
        row = {"epoch": progress.epoch, **train, "val_loss": val_loss,
               "val_token_accuracy": token_accuracy, **metrics, "epoch_seconds": round(train_seconds, 2),
               "eval_seconds": round(eval_seconds, 2)}
        append_csv(out / "loss_per_epoch.csv", [row], list(row))
        metric = cfg.best_metric
        if scst and metric in ("demo_accuracy", "val_loss"):  # SCST raises the cross-entropy: its epochs
            metric = "CIDEr"  # are compared among themselves by the figure they optimise
            if progress.epoch == cfg.num_epochs + 1:
                progress.best_score = float("-inf")
        score = -val_loss if metric == "val_loss" else metrics[metric]
        # of equals the later: on the demo ties are common, and the later epoch is more trained
        best = score >= progress.best_score
        progress.best_score = max(progress.best_score, score)
        log(f"epoch {progress.epoch}: {said}, val loss {val_loss:.3f}, token accuracy "
            f"{token_accuracy:.1%}, {format_metrics(metrics)}; {train_seconds:.1f} s training, "
            f"{eval_seconds:.1f} s validation (beam {cfg.beam_size}){'; best.pt' if best else ''}")
        if best:
            save_checkpoint(out / "best.pt", model, optimizer, cfg, data, progress)
        save_checkpoint(out / "last.pt", model, optimizer, cfg, data, progress)
        plot_history(out)
    print_samples(model, data.source, data.images("val")[:3], cfg, device, f"end of epoch {progress.epoch}")


def train(cfg, device):
    """Trains, validates every epoch, keeps best.pt (by best_metric) and last.pt, then reports on test."""
    out, size = Path(cfg.output_dir), rank_and_size()[1]
    lock = claim_output_dir(out, fresh=not cfg.resume) if is_main_process() else None
    data, model, optimizer, progress = start_run(cfg, device, out)
    # with torchrun, DDP averages the gradients of the processes; else the model as it is
    ddp = DistributedDataParallel(model, [device] if device.type == "cuda" else None) if size > 1 else model
    train_set = FlickrDataset(data.split("train"), model.vocab, data.source, cfg.max_train_caption_len)
    val_set = FlickrDataset(data.split("val"), model.vocab, data.source)
    steps_per_epoch = count_steps(train_set, cfg, "training captions")
    scst_set, reward, scst_steps = None, None, 0
    if cfg.scst_epochs:
        scst_set, reward = scst_data(data, model.vocab, cfg.max_train_caption_len)
        scst_steps = count_steps(scst_set, cfg, "training images")
    total_steps, all_epochs = cfg.num_epochs * steps_per_epoch, cfg.num_epochs + cfg.scst_epochs
    pending, batches, bar, epoch_start = [], None, tqdm(disable=True), time.time()
    model.train()
    with CtrlC() as stop:
        try:
            while True:
                epoch, batch = epoch_and_batch(progress.step, steps_per_epoch, scst_steps, cfg)  # next step's
                scst = epoch >= cfg.num_epochs
                epoch_steps = scst_steps if scst else steps_per_epoch
                # every process stops at the same step; asking the others is a collective, so not every step
                asking = size == 1 or batch % cfg.log_every == 0  # batch 0 too
                if asking and any_process(stop.requested, device):
                    break
                if batch == 0 and epoch > progress.epoch:  # the previous epoch's training is done
                    bar.close()
                    seconds = time.time() - epoch_start
                    end_epoch(model, optimizer, data, val_set, progress, seconds, cfg, device)
                if epoch >= all_epochs:  # num_epochs may be lowered on resume
                    break
                if batch == 0 or batches is None:  # a new epoch, or the first batch of a resumed one
                    dataset = scst_set if scst else train_set
                    batches, bar = open_epoch(dataset, epoch, batch, epoch_steps, all_epochs, cfg, device)
                    epoch_start = time.time()
                indices, (inputs, captions) = next(batches)
                progress.step += 1
                lr = learning_rate_at(progress.step, total_steps, cfg)
                if scst:
                    stats = scst_step(ddp, model, optimizer, inputs, indices, reward, lr, cfg, device)
                else:
                    stats = train_step(ddp, optimizer, inputs, captions, lr, device)
                pending.append((epoch + 1, progress.step, lr, stats))
                bar.update()
                if len(pending) >= cfg.log_every or batch + 1 == epoch_steps:
                    record_losses(pending, progress, len(model.vocab), cfg, device, bar)
                if cfg.sample_every and progress.step % cfg.sample_every == 0:
                    label = f"step {progress.step}"
                    print_samples(model, data.source, data.images("val")[:3], cfg, device, label)
        except UnreadableImage as error:  # gone since the run began: what was trained so far is kept
            if size == 1:  # under torchrun the others wait in DDP: no collective, torchrun stops them
                stop_and_save(out, model, optimizer, cfg, data, progress, pending, bar, device)
            # from a DataLoader worker the message holds a traceback whose source line matches first: the last
            raise UserError(re.findall(r"cannot read image .*", str(error))[-1]) from None
        finally:
            bar.close()  # before any error's one line, which must start a line of its own
        if any_process(stop.requested, device):  # also during the last validation: no test report then
            stop_and_save(out, model, optimizer, cfg, data, progress, pending, bar, device)
            return resume_hint(out, progress.step, size)
    wait_for_all()  # for best.pt
    test_report(restore(out / "best.pt"), data, cfg, device)
    if device.type == "cuda":
        log(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB")
    log(f"outputs in {out}: report.html (open it in a browser), loss_per_batch.csv, loss_per_epoch.csv, "
        f"loss_graph.png, metrics_graph.png, test_metrics.json, test_captions.csv, test_captions.json, "
        f"best.pt, last.pt, vocab.json, config.json")
    del lock
    return 0


def open_epoch(dataset, epoch, batch, epoch_steps, all_epochs, cfg, device):
    """The epoch's batches from batch on (with each one's indices into dataset), and its progress bar."""
    rank, size = rank_and_size()
    if batch == 0:  # epochs are reproducible one by one; each process has its own dropout
        torch.manual_seed((cfg.seed * 1000 + epoch + 1) * size + rank)
    shares = process_batches(len(dataset), cfg, epoch + 1)[batch:]
    phase = " (self-critical)" if epoch >= cfg.num_epochs else ""
    bar = tqdm(total=epoch_steps, initial=batch, unit="batch", leave=False,
               desc=f"epoch {epoch + 1}/{all_epochs}{phase}")
    return zip(shares, caption_batches(dataset, shares, cfg, device)), bar


def stop_and_save(out, model, optimizer, cfg, data, progress, pending, bar, device):
    """last.pt at the last step taken, with its losses recorded, so that --resume goes on from there."""
    record_losses(pending, progress, len(model.vocab), cfg, device, bar)
    if is_main_process():
        save_checkpoint(out / "last.pt", model, optimizer, cfg, data, progress)


# --------------------------------------------------------------------------------------------------
# validation, beam search and the metrics papers report (coco-caption's BLEU, METEOR, ROUGE-L, CIDEr)

@torch.no_grad()
def validation_loss(model, dataset, cfg, device):
    """Teacher-forced loss and token accuracy: the share of non-padding targets whose argmax is right."""
    rank, size = rank_and_size()
    batches = [b.tolist() for b in torch.arange(len(dataset)).split(cfg.batch_size)][rank::size]
    total_loss, correct, tokens = 0.0, 0, 0
    with evaluating(model):
        for inputs, captions in caption_batches(dataset, batches, cfg, device):
            loss, logits, targets = model(inputs, captions)
            mask = targets != Vocabulary.PAD
            total_loss += loss.item() * mask.sum().item()
            correct += ((logits.argmax(-1) == targets) & mask).sum().item()
            tokens += mask.sum().item()
    total_loss, correct, tokens = sum_over_processes([total_loss, correct, tokens], device)
    return total_loss / max(tokens, 1), correct / max(tokens, 1)


@torch.no_grad()
def beam_search(decoder, image_embeds, beam_size, max_len):
    """Each image's best word ids by log-probability per word; beam_size=1 is exactly greedy decoding."""
    # decoder: start(embeds) -> state and step(tokens, state, first) -> (log-probs, state), whose state is a
    # tuple of tensors with the batch in dimension 1: any decoder with these two methods works
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
        place = torch.arange(top.size(1), device=dev).expand_as(top)  # (n, 2k): each candidate's place in top
        ends = (word == Vocabulary.EOS) & (place < k) & (finished < k).unsqueeze(1) & (top > float("-inf"))
        ended_score, ended_at = torch.where(ends, top / (t + 1), float("-inf")).max(1)  # (n,) per-word scores
        for i in (ended_score > best_score).nonzero().flatten().tolist():
            best_score[i] = ended_score[i]
            best_seq[i] = seqs[offsets[i, 0] + beam[i, ended_at[i]]].tolist()
        finished += ends.sum(1)
        keep = (place + (word == Vocabulary.EOS).long() * top.size(1)).argsort(1)[:, :k]  # (n, k) survivors
        rows = (offsets + beam.gather(1, keep)).view(-1)  # (n*k,): the beam each survivor extends
        tokens, scores = word.gather(1, keep).view(-1), top.gather(1, keep)  # (n*k,), (n, k)
        seqs = torch.cat([seqs[rows], tokens.unsqueeze(1)], 1)  # (n*k, t+1)
        state = tuple(s[:, rows] for s in state)
        if (finished >= k).all():
            break
    going = seqs[offsets[:, 0] + scores.argmax(1)].tolist()  # each image's best still going: where none ended
    return [seq if seq is not None else best_going for seq, best_going in zip(best_seq, going)]


def generate_captions(model, source, names, cfg, device, beam_size=None):
    """{name: caption} of the images and the unreadable names; under torchrun, shared out and gathered."""
    rank, size = rank_and_size()
    share, captions = names[rank::size], {}
    with evaluating(model):
        for inputs, index in image_batches(source, share, 64, max(0, cfg.num_workers), desc="captioning"):
            texts = model.generate(inputs.to(device), beam_size or cfg.beam_size, cfg.max_caption_len)
            captions.update({share[i]: text for i, text in zip(index.tolist(), texts)})
    captions = merge_over_processes(captions)
    return {n: captions[n] for n in names if n in captions}, [n for n in names if n not in captions]


@contextlib.contextmanager
def evaluating(model):
    """The model in eval mode (no dropout) inside; after, in the mode it was."""
    was_training = model.training
    try:
        yield model.eval()
    finally:
        model.train(was_training)


def metric_text(caption):
    # coco-caption's PTB tokenizer drops punctuation before scoring; so do we, with the vocabulary's tokenizer
    return " ".join(t for t in Vocabulary.tokenize(caption) if any(ch.isalnum() or ch in "<>" for ch in t))


@functools.lru_cache(maxsize=1)
def meteor_scorer():
    """One METEOR process per run: its JVM takes seconds to start, scoring milliseconds."""
    from pycocoevalcap.meteor.meteor import Meteor
    if shutil.which("java"):
        return Meteor()
    warn("METEOR is not computed: it needs Java (`java` on the PATH), e.g. apt-get install default-jre")


def caption_metrics(references, hypotheses):
    """coco-caption's BLEU-1..4, METEOR (None without Java), ROUGE-L, CIDEr; {image: its CIDEr, BLEU-4}."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    refs = {i: [metric_text(c) for c in references[i]] for i in hypotheses}
    hyps = {i: [metric_text(hypotheses[i])] for i in hypotheses}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their progress
        bleu, bleu_each = Bleu(4).compute_score(refs, hyps)
        meteor = meteor_scorer()
        metrics = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
        metrics["METEOR"] = None if meteor is None else float(meteor.compute_score(refs, hyps)[0])
        metrics["ROUGE-L"] = float(Rouge().compute_score(refs, hyps)[0])
        cider, cider_each = Cider().compute_score(refs, hyps)
    metrics["CIDEr"] = float(cider)
    each = zip(hyps, cider_each, bleu_each[3])  # in the order of hyps
    return metrics, {name: {"CIDEr": float(c), "BLEU-4": float(b)} for name, c, b in each}


def format_metrics(metrics):
    return ", ".join(f"{k} {'n/a' if v is None else f'{100 * v:.1f}'}" for k, v in metrics.items())


def references_of(frame):
    return frame.groupby("image")["caption"].apply(list).to_dict()


def evaluate_split(model, data, split, cfg, device):
    """The metrics (in process 0; {} in the others) and captions of the model on a split."""
    captions, _ = generate_captions(model, data.source, data.images(split), cfg, device)
    if not is_main_process():
        return {}, captions
    return caption_metrics(references_of(data.split(split)), captions)[0], captions


def print_samples(model, source, names, cfg, device, label):
    captions, _ = generate_captions(model, source, names, cfg, device)
    for name, caption in captions.items():
        log(f"  [{label}] {name}: {caption}")


# ==================================================================================================
# ==== plumbing: a first reading can stop here. Below: settings, data formats, the demo set, the
# feature cache, checkpoints, torchrun, the results page, --caption and main.
# ==================================================================================================


# --------------------------------------------------------------------------------------------------
# settings: the constants, a preset, a checkpoint's settings and the command line, in one Config

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


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """One line, with the nearest valid name for an unknown one, instead of a usage block."""
        unknown = re.match(r"unrecognized arguments: -*([^\s=]+)", message)
        if unknown:
            near = difflib.get_close_matches(unknown[1], CONFIG_NAMES, 1)
            hint = f"did you mean --{near[0]}? " if near else ""
            message += f" ({hint}valid: {' '.join('--' + n for n in CONFIG_NAMES)} --caption)"
        raise UserError(message)


def parse_args(argv):
    """({name: value} for each --name=value given, type-checked; the --caption paths or None)."""
    parser = ArgumentParser(description=__doc__, allow_abbrev=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            usage="%(prog)s [--name=value ...] [--caption PATH ...]",
                            argument_default=argparse.SUPPRESS)
    groups = {}
    for name, (section, comment) in setting_comments().items():
        if section not in groups:  # as the constants are grouped at the top of the script
            groups[section] = parser.add_argument_group(section)
        default = globals()[name]
        bare = dict(nargs="?", const=True) if isinstance(default, bool) else {}  # --flag sets it
        kind = parse_bool if isinstance(default, bool) else type(default)
        groups[section].add_argument(f"--{name}", type=kind, metavar=type(default).__name__.upper(),
                                     help=setting_help(name, comment), **bare)
    parser.add_argument("--caption", nargs="+", metavar="PATH",
                        help="caption these image files or folders, from --checkpoint")
    overrides = vars(parser.parse_args(argv))
    return overrides, overrides.pop("caption", None)


def setting_comments():
    """{name: [its section, the comment beside its constant]}, from the top of this file."""
    comments, section, name = {}, "", None
    with open(__file__, "rb") as source:
        for token in tokenize.tokenize(source.readline):
            if token.string == "CONFIG_NAMES":  # the constants end here
                break
            text = token.string.lstrip("# ")
            first = token.start[1] == 0  # in the line's first column
            if token.type == tokenize.COMMENT and first:
                section = text
            elif token.type == tokenize.NAME and first and token.string in CONFIG_NAMES:
                name = token.string
                comments[name] = [section, ""]
            elif token.type == tokenize.COMMENT and name:  # beside its constant, or on lines below
                comments[name][1] = f"{comments[name][1]} {text}".strip()
    return comments


def setting_help(name, comment):
    """--help's text for a setting: its comment, the values it takes, its default and a preset's."""
    rules = "".join(f"; must be {must_be}" for names, _, must_be in SETTING_RULES if name in names)
    presets = "".join(f", {key} preset: {values[name]!r}" for key, values in PRESETS.items()
                      if name in values)
    return f"{comment}{rules}. default: {globals()[name]!r}{presets}".replace("%", "%%")


PATHS = ("data_dir", "encoder_weights", "output_dir", "cache_dir", "checkpoint", "init_from")


def resolve_settings(overrides=None, trained=None, echo=None):
    """The constants < the dataset's preset < a checkpoint's settings < the command line."""
    overrides = dict(overrides or {})
    trained = dict(trained or {})
    values = {name: globals()[name] for name in CONFIG_NAMES}
    origin = {}
    given = values | trained | overrides
    dataset, why = pick_dataset(given)
    chosen = dataset if given["preset"] == "auto" else given["preset"]
    preset_origin = f"{chosen} preset; --preset=none keeps the constants"
    layer(values, origin, PRESETS.get(chosen, {}), preset_origin)
    layer(values, origin, trained, "the checkpoint's")
    layer(values, origin, overrides, "command line")
    if why:  # it was 'auto'
        layer(values, origin, {"dataset": dataset}, why)
    fill_in(values, origin, overrides)
    for name in RESUME_FIXED if values["resume"] else MODEL_ARGS:  # where its weights fit no other
        if name in trained and values[name] != trained[name]:
            raise UserError(f"--{name}={values[name]}, but the checkpoint was trained with "
                            f"{name}={trained[name]}: leave --{name} out, and its own is used")
    check_settings(values)
    show_settings(values, origin, trained, echo)
    return Config(**values)


def pick_dataset(given):
    """--dataset, and why where it was 'auto': Flickr8k where its data is, else the demo."""
    if given["dataset"] != "auto":
        return given["dataset"], None
    if given["data_dir"]:
        return "flickr8k", "--data_dir given"
    where = "resources/input/flickr8k"
    found = (ROOT / where).is_dir()
    return "flickr8k" if found else "demo", f"{'found' if found else 'no'} {where}"


def fill_in(values, origin, overrides):
    """What 'auto' and '' mean once the dataset is known; every path made absolute."""
    if values["best_metric"] == "auto":  # the demo's CIDEr rewards one of three arbitrary phrasings
        metric = "demo_accuracy" if values["dataset"] == "demo" else "CIDEr"
        layer(values, origin, {"best_metric": metric}, "auto")
    for name in PATHS:  # the defaults are in the project; a user's own, relative to where they are
        if values[name]:
            values[name] = str((Path.cwd() if name in overrides else ROOT) / values[name])
    for name, folder in (("data_dir", "input"), ("output_dir", "output")):
        if not values[name]:
            default = str(ROOT / "resources" / folder / values["dataset"])
            layer(values, origin, {name: default}, f"default for {values['dataset']}")


def layer(values, origin, new, where):
    values.update(new)
    origin.update(dict.fromkeys(new, where))


def show_settings(values, origin, trained, echo):
    """Each setting that differs from its constant (or the checkpoint's), and where it came from."""
    lines = []
    for name in CONFIG_NAMES:
        before = trained.get(name, globals()[name])
        if name in origin and values[name] != before:
            was = f"; the checkpoint's: {before!r}" if name in trained else ""
            lines.append(f"  {name:15s} = {values[name]!r:30s} ({origin[name]}{was})")
    against = "the checkpoint's, or else from " if trained else ""
    if echo and lines:
        echo(f"settings that differ from {against}the constants at the top of the script:\n"
             + "\n".join(lines))


def valid_best_metric(value, values):
    demo = (value, values["dataset"]) == ("demo_accuracy", "demo")
    return value in ("CIDEr", "BLEU-4", "val_loss") or demo


DATASETS = ("auto", "demo", "flickr8k", "flickr30k", "coco")
SETTING_RULES = [  # (names, valid(value, values), what the value must be)
    (["dataset"], lambda v, _: v in DATASETS, ", ".join(DATASETS)),
    (["preset"], lambda v, _: v in ("auto", "none", *PRESETS),
     "'auto', 'none' or a preset, such as 'demo'"),
    (["batch_size", "num_epochs", "beam_size", "max_caption_len", "embed_size", "hidden_size",
      "num_layers", "freq_threshold", "image_size", "log_every", "demo_images"],
     lambda v, _: v >= 1, "at least 1"),
    (["max_images", "max_batches_per_epoch", "sample_every", "warmup_steps",
      "max_train_caption_len", "scst_epochs"], lambda v, _: v >= 0, "0 or more"),
    (["num_workers"], lambda v, _: v >= -1, "-1 or more"),
    (["learning_rate", "scst_learning_rate"], lambda v, _: 0 < v <= 1,
     "a positive number up to 1, such as 0.0002"),
    (["scst_baseline"], lambda v, _: v in ("mean", "greedy"), "'mean' or 'greedy'"),
    (["scst_samples"], lambda v, values: (2 if values["scst_baseline"] == "mean" else 1) <= v <= 20,
     "from 1 to 20 (a batch's samples are decoded at once), and at least 2 with "
     "scst_baseline='mean' (the baseline is the other samples' mean)"),
    (["dropout"], lambda v, _: 0 <= v < 1, "at least 0 and below 1, such as 0.3"),
    (["seed"], lambda v, _: 0 <= v < 2 ** 32, f"between 0 and {2 ** 32 - 1}"),
    (["lr_schedule"], lambda v, _: v in ("constant", "cosine"), "'constant' or 'cosine'"),
    (["decoder"], lambda v, _: v in ("lstm", "attention"), "'lstm' or 'attention'"),
    (["best_metric"], valid_best_metric,
     "'CIDEr', 'BLEU-4', 'val_loss' or, on the demo, 'demo_accuracy'"),
    (["cache_dir"], lambda v, _: v != "", "a folder, such as resources/cache"),
    (["device"], lambda v, _: re.fullmatch(r"auto|cpu|mps|cuda(:[1-9]?\d)?", v),
     "auto, cpu, cuda, cuda:N or mps"),  # torch.device refuses cuda:01, turns cuda:128 into -128
    (["demo_images"], lambda v, values: v >= 30 or values["dataset"] != "demo",
     "at least 30 on the demo (every split needs images of one and of two shapes)"),
]


def check_settings(values):
    """Impossible values, each refused before any work with one line that says what it must be."""
    for names, valid, must_be in SETTING_RULES:
        for name in names:
            if not valid(values[name], values):
                raise UserError(f"--{name}={values[name]}: must be {must_be}")
    out = Path(values["output_dir"]).resolve()
    if out in (Path("/"), ROOT, Path.home()):
        raise UserError(f"--output_dir={out}: a run writes a dozen files there; choose a folder of "
                        f"its own, such as resources/output/mine")
    if values["dataset"] == "demo" and out.is_relative_to(Path(values["data_dir"]).resolve()):
        raise UserError(f"--output_dir={values['output_dir']} lies in the demo's data folder "
                        f"{values['data_dir']}, which the demo rewrites: choose one outside it")


def uses_bf16(device):
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def autocast(device):
    """bf16 mixed precision on GPUs that support it natively; full precision elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device))


def pick_device(name):
    """The device --device names (SETTING_RULES checked the name); a GPU not here is refused."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
                 "cpu": True}
    if name == "auto":
        name = next(kind for kind, present in available.items() if present)  # cuda, mps, then cpu
    device = torch.device(name)
    if not available[device.type]:
        gpu = "CUDA GPU" if device.type == "cuda" else "Apple GPU (MPS)"
        raise UserError(f"--device={name}: this machine has no {gpu} that torch can use; "
                        f"try --device=cpu")
    return device


# --------------------------------------------------------------------------------------------------
# dataset formats and splits: Flickr8k/30k caption files, Karpathy's JSON (COCO), split by image

CAPTION_FILES = ["dataset_flickr8k.json", "dataset_flickr30k.json", "dataset_coco.json", "captions.txt",
                 "results.csv", "Flickr8k.token.txt"]


IMAGE_DIRS = ["Images", "flickr30k_images/flickr30k_images", "flickr30k_images", "Flicker8k_Dataset",
              "Flickr8k_Dataset"]


SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}


TOKEN_LINE = re.compile(r"(?P<image>[^\t#,|]+)#\d+\t(?P<caption>.*)")  # Flickr8k.token.txt


RESULTS_LINE = re.compile(r"\s*(?P<image>[^|]+?)\s*\|\s*\d+\s*\|?(?P<caption>.*)")  # even without its 2nd '|'


def read_text(path):
    """The file's text in its encoding (UTF-16, UTF-8 with or without a BOM, else cp1252), \n line endings."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-16" if raw.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    return re.sub(r"\r\n?", "\n", text)  # also inside a quoted caption


def read_captions(path):
    """Any supported caption file: (DataFrame of image, caption[, split]; counts of what was dropped)."""
    text = read_text(path)
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    header = re.sub(r"\s", "", first).lower()
    if first.lstrip().startswith("{"):
        rows, bad_lines = karpathy_rows(path, text), []
    elif TOKEN_LINE.match(first) or header == "image_name|comment_number|comment":
        pattern = TOKEN_LINE if TOKEN_LINE.match(first) else RESULTS_LINE
        matches = [(n, line, pattern.match(line)) for n, line in enumerate(lines, 1)]
        rows = [match.groups() for _, _, match in matches if match]
        bad_lines = [n for n, line, match in matches if not match and line.strip() and line is not first]
    elif header == "image,caption":
        reader = csv.reader(io.StringIO(text, newline=""))  # newline="": \r\n and old Mac \r, even mixed
        numbered = [(reader.line_num, row) for row in reader][1:]  # a caption's unquoted commas: 3+ fields
        rows = [(row[0].strip(), ",".join(row[1:])) for _, row in numbered if len(row) >= 2]
        bad_lines = [n for n, row in numbered if len(row) == 1]
    else:
        raise UserError(f"{path}: unknown caption format (first line {first[:120]!r}); accepted formats: "
                        f"captions.txt ('image,caption'), Flickr8k.token.txt ('name.jpg#0<TAB>caption'), "
                        f"results.csv ('image_name| comment_number| comment') or Karpathy's dataset_*.json")
    frame = pd.DataFrame(rows, columns=["image", "caption", "split"][:len(rows[0]) if rows else 2])
    frame["caption"] = frame["caption"].str.strip()
    empty = frame["caption"] == ""
    wordless = ~frame["caption"].str.contains(r"\w")  # punctuation alone: nothing to learn or score
    kept = frame[~wordless].drop_duplicates(["image", "caption"]).reset_index(drop=True)
    dropped = Counter(blank_lines=sum(not line.strip() for line in lines), empty_captions=int(empty.sum()),
                      captions_without_words=int((wordless & ~empty).sum()),
                      duplicate_rows=int((~wordless).sum()) - len(kept), malformed_rows=len(bad_lines))
    if bad_lines:
        warn(f"{path}: skipped {len(bad_lines)} malformed line(s): {bad_lines[:10]}")
    if kept.empty:
        raise UserError(f"{path} holds no caption with a word in it ({dict(+dropped) or 'no rows'}): fix it")
    return kept, dict(+dropped)


def karpathy_rows(path, text):
    """(image, caption, split) rows of a Karpathy-format JSON file; a malformed entry is one clear error."""
    try:
        images = json.loads(text)["images"]
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path}: not a Karpathy-format JSON file ({error!r})") from None
    if not isinstance(images, list):
        raise UserError(f"{path}: 'images' is a {type(images).__name__}, not a list: not Karpathy's format")
    rows = []
    for i, image in enumerate(images):
        valid = (isinstance(image, dict) and image.get("split") in ("train", "restval", "val", "test")
                 and isinstance(image.get("filename"), str) and image["filename"] != ""
                 and isinstance(image.get("sentences"), list) and image["sentences"] != []
                 and all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in image["sentences"]))
        if not valid:
            raise UserError(f"{path}: images[{i}] {image!r:.80} is not an object with a 'filename', 'split' "
                            f"(train/restval/val/test), 'sentences' of {{'raw': caption}}: fix or remove it")
        split = {"restval": "train"}.get(image["split"], image["split"])
        name = f"{image['filepath']}/{image['filename']}" if image.get("filepath") else image["filename"]
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
        listed = [(n, split) for split, f in SPLIT_FILES.items() for n in read_text(Path(folder) / f).split()]
        split_of = dict(listed)  # an image in two lists goes in the last
        repeated = sorted(n for n, lists in Counter(n for n, _ in set(listed)).items() if lists > 1)
        if repeated:
            named = ", ".join(f"{n} (put in {split_of[n]})" for n in repeated[:5])
            warn(f"{len(repeated)} image(s) are in more than one of the split lists in {folder}, each put in "
                 f"the last list that names it: {named}")
        frame = frame.assign(split=frame["image"].map(split_of))
        unlisted = frame["split"].isna()
        if unlisted.any():
            log(f"{frame.loc[unlisted, 'image'].nunique()} images are in no official split list: left out")
        return frame[~unlisted].reset_index(drop=True), "from the official Flickr8k lists"
    images = sorted(frame["image"].unique())
    random.Random(seed).shuffle(images)
    n = max(1, round(holdout_fraction * len(images)))
    split_of = {name: "test" if i < n else "val" if i < 2 * n else "train" for i, name in enumerate(images)}
    return frame.assign(split=frame["image"].map(split_of)), f"random by image, seed {seed}"


def load_captions(folder, seed, max_images=0):
    """Caption table with a split column, for images that exist; reports everything it dropped."""
    caption_file, image_dir = find_dataset_files(folder)
    frame, dropped = read_captions(caption_file)
    names, inside = frame["image"].unique(), image_dir.resolve()
    outside = sorted(n for n in names if not (image_dir / n).resolve().is_relative_to(inside))
    missing = sorted(n for n in set(names) - set(outside) if not (image_dir / n).is_file())
    for bad, why in ((outside, f"point outside {image_dir}"), (missing, f"are not in {image_dir}")):
        if bad:
            warn(f"{len(bad)} image name(s) in {caption_file.name} {why}, skipped: {', '.join(bad[:5])}")
    frame = frame[~frame["image"].isin(outside + missing)]
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


def open_rgb(path):
    """The image as 8-bit RGB, upright as its EXIF orientation says; 16- and 32-bit greys are scaled."""
    with Image.open(path) as image:
        with contextlib.suppress(Exception):  # a damaged EXIF block must not lose an otherwise good image
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of every upright image
        if image.mode.startswith("I"):  # 'I;16', 'I;16B', 'I': convert() would clip them at 255, almost white
            pixels = np.asarray(image, dtype=np.float64)
            # 'I' is how some Pillow versions open 16-bit PNGs: values that fit 16 bits are taken as 16-bit
            top = 65535 if image.mode.startswith("I;16") or pixels.max() <= 65535 else 2 ** 31 - 1
            image = Image.fromarray(np.clip(np.round(pixels * (255 / top)), 0, 255).astype(np.uint8))
        return image.convert("RGB")


class UnreadableImage(UserError):
    """An image that could be read when the run began and cannot be now."""


def load_image(path, transform):
    try:
        return transform(open_rgb(path))
    except Exception:  # PIL raises OSError, ValueError or others by format and damage
        raise UnreadableImage(f"cannot read image {path} any more (it was readable when the run began): "
                              f"put it back, then continue with --resume") from None


def image_opens(path):
    """A cheap check (no full decode) for the per-step encoder."""
    with contextlib.suppress(Exception), Image.open(path) as image:
        image.verify()
        return True
    return False


def stack_readable(source, batch):
    """(inputs of the readable images among a batch of (index, name), or None; their indices)."""
    images, index = [], []
    for i, name in batch:
        with contextlib.suppress(UnreadableImage):
            images.append(source.get(name))
            index.append(i)
    return (torch.stack(images) if images else None), torch.tensor(index, dtype=torch.long)


def image_batches(source, names, batch_size, num_workers=0, pin_memory=False, desc=None):
    """(inputs, indices into names) per batch of the readable images: where unreadable ones are found."""
    workers = 0 if source.features is not None else num_workers
    loader = DataLoader(list(enumerate(names)), batch_size, num_workers=workers, pin_memory=pin_memory,
                        collate_fn=functools.partial(stack_readable, source), generator=torch.Generator())
    for inputs, index in tqdm(loader, desc=desc, unit="batch", leave=False, disable=desc is None):
        if len(index):
            yield inputs, index


# --------------------------------------------------------------------------------------------------
# the built-in demo set: coloured shapes with captions, in the Flickr8k layout

DEMO_COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230), "yellow": (240, 210, 30)}


DEMO_BACKGROUNDS = {"white": (240, 240, 240), "grey": (128, 128, 128), "black": (15, 15, 15)}


DEMO_SHAPES = ["circle", "square", "triangle"]


DEMO_SINGLE_SHARE = 2 / 3   # the rest have two shapes, one on each side


DEMO_SHADE = 15             # each channel of a shape's colour varies by up to this much (0-255)


DEMO_BACKGROUND_SHADE = 20  # and the background's grey level by up to this much


# by number of shapes, in fractions of the image: each shape's x range (left to right), every shape's y and
# size ranges. One shape large and central (what a random-weight encoder can still tell apart); two, one in
# each half, each at its own height, never touching
DEMO_PLACES = {1: ([(0.45, 0.55)], (0.45, 0.55), (0.5, 0.75)),
               2: ([(0.24, 0.26), (0.74, 0.76)], (0.35, 0.65), (0.4, 0.46))}


DEMO_CAPTIONS_PER_IMAGE = 3  # of the templates below, drawn without repeats


ONE_SHAPE_CAPTIONS = ["a {c} {s} .", "a {c} {s} on a {bg} background .",
                      "there is a {c} {s} on a {bg} background .",
                      "a large {c} {s} in the middle of the picture .", "a picture of a {c} {s} .",
                      "one big {c} {s} in the centre ."]


# every two-shape caption names the left shape first and says which is where, in words that demo_placement
# reads back: one word order is easier to learn than six ways of saying the same
TWO_SHAPE_CAPTIONS = ["a {c} {s} on the left and a {c2} {s2} on the right .",
                      "a {c} {s} to the left of a {c2} {s2} .",
                      "two shapes on a {bg} background : a {c} {s} on the left and a {c2} {s2} on the right ."]


DEMO_IMAGES = "demo_[0-9][0-9][0-9][0-9][0-9].jpg"  # the demo's own images: any other file in Images/ stays


def make_demo_dataset(folder, n_images, size, seed=0):
    """Writes Images/, captions.txt and shapes.csv deterministically; again only when the settings change."""
    folder, stamp = Path(folder), {"images": n_images, "size": size, "seed": seed, "version": 9}
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--data_dir={folder} is a file and the demo needs a folder: choose another one")
    if (folder / "demo.json").is_file() and json.loads((folder / "demo.json").read_text()) == stamp:
        return folder
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "demo.json").is_file():
        raise UserError(f"{folder} holds files but no demo set: choose an empty or new --data_dir")
    (folder / "Images").mkdir(parents=True, exist_ok=True)
    # the folder may also hold the user's own files: only the demo's are replaced. A stamp that matches no
    # settings goes first, so that an interrupted rebuild is redone on the next run
    (folder / "demo.json").write_text(json.dumps({"incomplete": True}))
    for old in (folder / "Images").glob(DEMO_IMAGES):
        old.unlink()
    write_demo_set(folder, n_images, size, seed)
    (folder / "demo.json").write_text(json.dumps(stamp))
    return folder


def shift(rgb, offsets):
    return tuple(min(255, max(0, round(v + o))) for v, o in zip(rgb, offsets))


def write_demo_set(folder, n_images, size, seed):
    """The demo's images, captions.txt and shapes.csv in folder, every drawing varied (README: the demo)."""
    from PIL import ImageDraw
    rng = random.Random(seed)
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
        xs, ys, extents = DEMO_PLACES[n_shapes]
        places = [(rng.uniform(*x), rng.uniform(*ys), rng.uniform(*extents)) for x in xs]
        for (colour, shape), (x, y, extent) in zip(objects, places):
            shade = [rng.uniform(-DEMO_SHADE, DEMO_SHADE) for _ in range(3)]
            x, y, r, fill = x * big, y * big, extent * big / 2, shift(DEMO_COLOURS[colour], shade)
            if shape == "triangle":
                draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
            elif shape == "circle":
                draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
            else:
                draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
        image.resize((size, size), Image.LANCZOS).save(folder / "Images" / name, quality=92)
        (c, s), (c2, s2) = objects[0], objects[-1]
        chosen = rng.sample([ONE_SHAPE_CAPTIONS, TWO_SHAPE_CAPTIONS][n_shapes - 1], DEMO_CAPTIONS_PER_IMAGE)
        captions += [(name, t.format(c=c, s=s, c2=c2, s2=s2, bg=bg)) for t in chosen]
        shapes.append((name, ";".join(f"{c} {s}" for c, s in objects)))  # left to right
    pd.DataFrame(captions, columns=["image", "caption"]).to_csv(folder / "captions.txt", index=False)
    pd.DataFrame(shapes, columns=["image", "shapes"]).to_csv(folder / "shapes.csv", index=False)


# the side a phrase after a shape puts it on and, for 'X to the left of Y', the side of Y
SIDES = {"on the left": ["left"], "on the right": ["right"], "to the left of": ["left", "right"],
         "to the right of": ["right", "left"]}


def demo_placement(caption):
    """'left colour shape;right colour shape' as the caption places two shapes, or None if it hedges."""
    words = caption.split()
    pairs = [i for i in range(len(words) - 1) if words[i] in DEMO_COLOURS and words[i + 1] in DEMO_SHAPES]
    if len(pairs) != 2 or sum(w in DEMO_COLOURS or w in DEMO_SHAPES for w in words) != 4:
        return None  # one shape, three, or a colour or shape word that belongs to neither: hedging
    claims = set()
    for k, i in enumerate(pairs):
        after = " ".join(words[i + 2:i + 6]) + " "
        for phrase, sides in SIDES.items():
            if after.startswith(phrase + " "):
                claims |= {(k if j == 0 else 1 - k, side) for j, side in enumerate(sides)}  # 1 - k: the other
    side = dict(claims)
    if len(claims) != 2 or sorted(side.values()) != ["left", "right"]:
        return None
    return ";".join(" ".join(words[pairs[k]:pairs[k] + 2]) for k in sorted(side, key=lambda k: side[k]))


def demo_accuracy(captions_by_image, shapes_file, n_shapes=1):
    """The share of the images with n_shapes shapes (None: any) captioned right, and their number."""
    right = demo_right(captions_by_image, shapes_file, n_shapes)
    return sum(right.values()) / max(1, len(right)), len(right)


def demo_judgement(cfg, captions):
    """On the demo, whether each caption names its image's shapes right ({} elsewhere)."""
    return demo_right(captions, Path(cfg.data_dir) / "shapes.csv") if cfg.dataset == "demo" else {}


def demo_right(captions_by_image, shapes_file, n_shapes=None):
    """{image: whether its caption names its shapes right} for the images with n_shapes shapes (None: any)."""
    truth = pd.read_csv(shapes_file).set_index("image")["shapes"].to_dict()  # as write_demo_set drew them
    right = {}
    for name, caption in captions_by_image.items():
        if n_shapes not in (None, truth[name].count(";") + 1):
            continue
        if ";" in truth[name]:
            right[name] = demo_placement(caption) == truth[name]
        else:  # colours and shapes are different words: this colour and this shape, and no other
            right[name] = set(caption.split()) & {*DEMO_COLOURS, *DEMO_SHAPES} == set(truth[name].split())
    return right


DEMO_WEIGHTS = ROOT / "resources/models/resnet50-random-init.pth"  # without ./setup.sh's download


def prepare_demo(cfg):
    """On the demo: says so and makes its data set (in process 0, while the others wait)."""
    if cfg.dataset == "demo" and is_main_process():
        log(f"{'=' * 100}\nDEMO: no Flickr8k at {ROOT / 'resources/input/flickr8k'}, so this run trains on "
            f"the built-in demo set\n({cfg.demo_images} generated images of coloured shapes). For real "
            f"captions: ./setup.sh --flickr8k, then run this again (README: 'Getting the data').\n{'=' * 100}")
        make_demo_dataset(cfg.data_dir, cfg.demo_images, cfg.image_size)
    wait_for_all()


def encoder_weights_file(cfg):
    """--encoder_weights or, on the demo without them at the default path, a fixed random-init ResNet50."""
    path = Path(cfg.encoder_weights)
    if path.is_file():
        return path
    if cfg.dataset != "demo" or path != ROOT / encoder_weights:
        raise UserError(f"ResNet50 weights {path} not found: {FETCH_WEIGHTS}")
    warn(f"no ResNet50 weights at {path}: the demo uses a randomly initialised (still frozen) ResNet50. "
         f"./setup.sh downloads the ImageNet weights.")
    if is_main_process():  # written once, before the other processes read it
        random_resnet50_weights(DEMO_WEIGHTS)
    wait_for_all()
    return DEMO_WEIGHTS


def demo_scores(model, data, split, cfg, device, by_kind=False):
    """The demo's figures from greedy captions ({} elsewhere); every process calls it."""
    if cfg.dataset != "demo":
        return {}
    greedy, _ = generate_captions(model, data.source, data.images(split), cfg, device, beam_size=1)
    shapes = Path(cfg.data_dir) / "shapes.csv"
    if not by_kind:
        return {"demo_accuracy": demo_accuracy(greedy, shapes, None)[0]}
    (single, n_single), (two, n_two) = demo_accuracy(greedy, shapes, 1), demo_accuracy(greedy, shapes, 2)
    log(f"demo: the greedy captions name the right colour and shape of {single:.1%} of {n_single} held-out "
        f"single-shape images, and both shapes with their colours on the right sides of {two:.1%} of {n_two} "
        f"two-shape images")
    return {"demo_colour_shape_accuracy": single, "demo_two_shape_accuracy": two}


# --------------------------------------------------------------------------------------------------
# feature cache: the frozen ResNet50 runs once per image, and its features are cached by content

FETCH_WEIGHTS = "run ./setup.sh to download it (or see the README)"


WEIGHTS_NAME = re.compile(r"resnet50-([0-9a-f]{8,64})\.pth")  # torchvision's names carry a sha256 prefix


def weights_sha256(path):
    try:
        stat = Path(path).stat()  # size and time are in the cache key: a changed file is hashed again
        return stamped_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    except OSError as error:
        raise UserError(f"cannot read ResNet50 weights {path}: {error.strerror or error}") from None


@functools.lru_cache(maxsize=8)
def stamped_sha256(path, size, mtime):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_sha256(path):
    """The file's sha256, or None when it cannot be read (an image is then named where it is decoded)."""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_resnet50(weights_path):
    """torchvision ResNet50 without its classifier, from a local .pth, never unpickling anything."""
    path = Path(weights_path)
    if not path.is_file():
        raise UserError(f"ResNet50 weights {path} not found: {FETCH_WEIGHTS}")
    named_hash = WEIGHTS_NAME.fullmatch(path.name)
    if named_hash and not weights_sha256(path).startswith(named_hash[1]):
        raise UserError(f"{path} is corrupt or incomplete (its sha256 does not start with {named_hash[1]}): "
                        f"delete it and {FETCH_WEIGHTS}")
    try:  # weights_only: tensors and plain containers; a file that needs more could run code, and is refused
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"{path} cannot be read as plain tensors ({type(error).__name__}): it is damaged, in "
                        f"torch.hub's old format (resnet50-19c8e357.pth) or not a weights file; "
                        f"{FETCH_WEIGHTS} (resnet50-0676ba61.pth)") from None
    # built on the meta device: no random init, which would waste time and draw from the global RNG (a run
    # would then train differently with and without a feature cache); strict loading makes every tensor real
    with torch.device("meta"):
        model = torchvision.models.resnet50(weights=None)
    try:
        model.load_state_dict(state, assign=True)
    except Exception as error:
        reason = " ".join(str(error).split())[:200]  # one line: torch's message spans several
        raise UserError(f"{path} does not hold ResNet50 weights ({reason}): {FETCH_WEIGHTS}") from None
    model.avgpool = model.fc = nn.Identity()  # its output is the last convolutional grid, flattened
    return model.float()  # assign keeps the file's dtype; copying into the model converted it to float32


def random_resnet50_weights(path, seed=0):
    """A fixed random-init ResNet50 for the demo without downloads, saved: its captions can be reproduced."""
    path = Path(path)
    if not path.is_file():
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            state = torchvision.models.resnet50(weights=None).state_dict()
        atomic_save(state, path)
    return path


def features_cache_key(weights_sha, transform, image_dir, names, precision="fp32"):
    # each image's content: an image replaced under the same name, even with its old size and time, is new
    names = sorted(names)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        hashes = list(tqdm(pool.map(file_sha256, [Path(image_dir) / n for n in names]), total=len(names),
                           desc="hashing images", unit="img", leave=False, mininterval=1))
    spec = {"weights": weights_sha, "transform": repr(transform), "image_dir": str(Path(image_dir).resolve()),
            "images": dict(zip(names, hashes)), "precision": precision, "version": 4}  # 4: keyed by content
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


def tensor_sha256(tensor):
    return hashlib.sha256(tensor.contiguous().numpy()).hexdigest()  # hashed in place: no copy of a memory map


def extract_features(resnet, image_dir, names, transform, device, batch_size=64, num_workers=2, grid_cells=0,
                     into=None):
    """Pooled (N, 2048) or, with grid_cells, float16 grid (N, L, 2048) features, and the unreadable names."""
    resnet = resnet.to(device).eval().to(memory_format=torch.channels_last)
    shape = (len(names), grid_cells, 2048) if grid_cells else (len(names), 2048)
    dtype = torch.float16 if grid_cells else torch.float
    if into:  # the kernel writes the features out to the file as memory runs short
        features = torch.from_file(str(into), True, math.prod(shape), dtype=dtype).view(shape)
    else:
        features = torch.zeros(shape, dtype=dtype)
    read = torch.zeros(len(names), dtype=torch.bool)
    if device.type == "cuda":  # the CPU cores cannot decode JPEGs as fast as a GPU runs ResNet50
        batches = jpeg_batches(image_dir, names, transform, device, batch_size, num_workers)
    else:
        batches = image_batches(ImageSource(image_dir, transform), names, batch_size, num_workers)
    bar = tqdm(total=len(names), desc="ResNet50 features", unit="img", leave=False)
    with torch.inference_mode(), autocast(device), bar:
        for images, index in batches:
            cells = resnet_grid(resnet, images.to(device, non_blocking=True))  # (B, L, 2048)
            features[index] = (cells if grid_cells else cells.mean(1)).cpu().to(features.dtype)
            read[index] = True
            bar.update(int(index[-1]) + 1 - bar.n)  # up to this batch's last image, unreadable ones included
    return features, [name for name, ok in zip(names, read.tolist()) if not ok]


class ImageFiles(Dataset):
    """One item per image: its file's bytes (read by the workers, decoded on the device), and its index."""

    def __init__(self, image_dir, names):
        self.image_dir, self.names = Path(image_dir), list(names)

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        with contextlib.suppress(OSError, RuntimeError):
            return torchvision.io.read_file(str(self.image_dir / self.names[i])), i
        return None, i


def jpeg_batches(image_dir, names, transform, device, batch_size=64, num_workers=2):
    """As image_batches, with JPEGs decoded and transformed on the device (nvJPEG on a GPU), others by PIL."""
    files = DataLoader(ImageFiles(image_dir, names), batch_size, num_workers=num_workers, collate_fn=list)
    for batch in files:
        images = {i: decode_on(device, data, Path(image_dir) / names[i], transform) for data, i in batch}
        index = [i for i, image in images.items() if image is not None]
        if index:
            yield torch.stack([images[i] for i in index]), torch.tensor(index)  # (B, 3, H, W) on the device


def decode_on(device, data, path, transform):
    """The transformed image on the device from its file's bytes, or None when it cannot be read."""
    with contextlib.suppress(Exception):  # not a JPEG, damaged, CMYK on nvJPEG, ...: as any other image
        return transform(torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB,
                                                    apply_exif_orientation=True, device=device))
    with contextlib.suppress(UnreadableImage):
        return load_image(path, transform).to(device)


def load_cached_features(path, key):
    """The cache's contents, or None when it is absent, for other inputs, or damaged in any way."""
    if not path.is_file():
        return None
    with contextlib.suppress(Exception):  # a truncated or corrupt file fails in many ways; all mean rebuild
        cache = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # read as pages are used
        if cache["key"] == key and tensor_sha256(cache["features"]) == cache["sha256"]:
            return cache
    warn(f"feature cache {path} is damaged or stale: rebuilding it")
    return None


def try_lock(file):
    """Takes the kernel's lock (flock) on an open file, or says False when another process holds it."""
    with contextlib.suppress(OSError):
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the process ends, even by kill -9
        return True
    return False


@contextlib.contextmanager
def exclusive(path):
    """A kernel lock (flock) on path's .lock file, taken after any run that holds it; kill -9 releases it."""
    try:
        lock = open(f"{path}.lock", "a+")
    except OSError:  # a read-only folder: nothing can be written there to race over
        yield
        return
    with lock:
        if not try_lock(lock):
            log(f"features: waiting for another run that is writing {path}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in path.parent.glob(f"{path.name}.*"):  # a killed run's: only the lock holder writes one
            if stale.suffix in (".scratch", ".tmp") or stale.suffix[1:].isdigit():  # a share
                stale.unlink()
        yield


def cached_features(weights, image_dir, names, transform, cache_folder, device, batch_size=64, num_workers=2,
                    grid_cells=0):
    """The images' features, memory-mapped from the cache; extracted and cached first when it lacks them."""
    precision = ("bf16" if uses_bf16(device) else "fp32") + (f" grid {grid_cells}" if grid_cells else "")
    key = {}
    if is_main_process():  # hashing every image once, not once per process
        key = {"key": features_cache_key(weights_sha256(weights), transform, image_dir, names, precision)}
    key = merge_over_processes(key)["key"]
    path = Path(cache_folder) / f"features-{key[:20]}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(path) if is_main_process() else contextlib.nullcontext():
        wait_for_all()
        cache = load_cached_features(path, key)
        if cache is None:
            write_feature_cache(weights, image_dir, names, transform, path, key, device, batch_size,
                                num_workers, grid_cells)
            cache = load_cached_features(path, key)  # memory-mapped: the extracted copy leaves RAM
        else:
            log(f"features: reusing {path} ({len(cache['images'])} images)")
        wait_for_all()  # the lock is held until every process has read the cache
    return cache


def write_feature_cache(weights, image_dir, names, transform, path, key, device, batch_size, num_workers,
                        grid_cells):
    needed = len(names) * 2048 * (2 * grid_cells if grid_cells else 4) / 1e9  # GB; grids in float16
    free = shutil.disk_usage(path.parent).free / 1e9
    if 2 * needed > free:  # the features as extracted, and the cache file written from them
        raise UserError(f"the feature cache needs {needed:.2f} GB in {path.parent}, and twice that while it "
                        f"is written, but only {free:.2f} GB is free: free some space or use another "
                        f"--cache_dir")
    start, (rank, size) = time.time(), rank_and_size()
    share = names[len(names) * rank // size:len(names) * (rank + 1) // size]  # each image in one process
    scratch = path.with_name(f"{path.name}.{os.getpid()}.scratch")  # at COCO's size a grid outgrows RAM
    try:  # the scratch file goes also when the cache cannot be written (a full disk) or the run is stopped
        features, failed = extract_features(load_resnet50(weights), image_dir, share, transform, device,
                                            max(batch_size, 64), num_workers, grid_cells, into=scratch)
        cache = {"key": key, "images": share, "failed": failed, "features": features}
        if size > 1:  # the shares meet in cache_dir, which every process must see (on several machines too)
            atomic_save(cache, path.with_name(f"{path.name}.{rank}"))
            wait_for_all()
            cache = gather_shares(path, key, size) if rank == 0 else None
        if rank == 0:
            seconds, read = time.time() - start, len(cache["images"]) - len(cache["failed"])
            processes = f" in {size} processes" if size > 1 else ""
            atomic_save(cache | {"sha256": tensor_sha256(cache["features"])}, path)
            log(f"features: {read} images in {seconds:.1f} s ({read / max(seconds, 1e-9):.1f} images/s"
                f"{processes}), cached in {path}")
    finally:
        scratch.unlink(missing_ok=True)
    wait_for_all()


def gather_shares(path, key, size):
    """Process 0's cache from every process's share (features, images, failures) in order; their files go."""
    files = [path.with_name(f"{path.name}.{rank}") for rank in range(size)]
    missing = [rank for rank, file in enumerate(files) if not file.is_file()]
    if missing:
        raise UserError(f"process {missing[0]}'s share of the features is not in {path.parent}: with several "
                        f"machines, --cache_dir must be a shared folder that every process can read")
    shares = [torch.load(file, weights_only=True, mmap=True) for file in files]
    cache = {"key": key, "features": torch.cat([s["features"] for s in shares]),
             **{k: [name for s in shares for name in s[k]] for k in ("images", "failed")}}
    for file in files:
        file.unlink()
    return cache


def atomic_save(obj, path):
    """torch.save to this process's temporary file, fsync, rename: a crash leaves the previous file intact."""
    path, tmp = Path(path), Path(f"{path}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:  # a full disk (torch says RuntimeError), or a second Ctrl-C while writing
        with contextlib.suppress(OSError):  # also where nothing was written (read-only, a file in the way)
            tmp.unlink()
        if not isinstance(error, (OSError, RuntimeError)):
            raise
        reason = getattr(error, "strerror", None) or "the disk may be full"
        raise UserError(f"cannot write {path}: {reason}. Free some space or choose another folder; the "
                        f"previous {path.name}, if any, is intact") from None


def feature_statistics(features, rows):
    """Per-channel mean and std (2048,) over some rows of pooled or grid features, a chunk at a time."""
    chunks = (features[chunk].reshape(-1, 2048).double() for chunk in torch.as_tensor(rows).split(256))
    total, squares = sum(torch.stack([x.sum(0), x.square().sum(0)]) for x in chunks)  # (2048,) each
    n = len(rows) * features[0].numel() // 2048
    mean = total / n
    return mean.float(), ((squares - n * mean.square()) / max(n - 1, 1)).sqrt().float().clamp_min(1e-6)


def names_sha256(names):
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()


def prepare_data(cfg, device, build_vocab=False, trained=None):
    """Captions, splits, tokens, the training vocabulary (build_vocab) and every readable image's inputs."""
    prepare_demo(cfg)
    frame, image_dir = load_captions(cfg.data_dir, cfg.seed, cfg.max_images)
    frame = frame.assign(tokens=Vocabulary.tokenize_many(frame["caption"].tolist()))
    training = frame[frame["split"] == "train"]
    train_sha256 = names_sha256(training["image"].unique())
    vocab = build_vocabulary(training["tokens"], cfg.freq_threshold) if build_vocab else None
    weights = encoder_weights_file(cfg)
    if trained:
        check_data(trained, vocab, weights, train_sha256, cfg.data_dir)
    transform, names = image_transform(cfg.image_size), sorted(frame["image"].unique())
    grid_cells = math.ceil(cfg.image_size / 32) ** 2 if cfg.decoder == "attention" else 0  # halved 5 times
    # with cached features, training needs only the projection; the checkpoint records the weights' hash
    resnet = None if True else load_resnet50(weights)
    if True:
        cache = cached_features(weights, image_dir, names, transform, cfg.cache_dir, device, cfg.batch_size,
                                max(0, cfg.num_workers), grid_cells)
        source = ImageSource(image_dir, transform, cache["features"], cache["images"])
        failed = cache["failed"]
    else:
        source = ImageSource(image_dir, transform)
        checking = tqdm(names, desc="checking images", leave=False)
        failed = [n for n in checking if not image_opens(image_dir / n)]
    if failed:
        more = " ..." if len(failed) > 5 else ""
        warn(f"skipped {len(failed)} unreadable image(s): {', '.join(failed[:5])}{more}")
        frame = frame[~frame["image"].isin(set(failed))].reset_index(drop=True)
        check_splits(frame, cfg.data_dir)
    train_names = sorted(frame.loc[frame["split"] == "train", "image"].unique())
    if True:
        stats = feature_statistics(cache["features"], [source.row[n] for n in train_names])
    else:
        sample = random.Random(cfg.seed).sample(train_names, min(512, len(train_names)))
        features, bad = extract_features(resnet, image_dir, sample, transform, device, grid_cells=grid_cells)
        stats = feature_statistics(features, [i for i, name in enumerate(sample) if name not in bad])
    return Data(frame, source, Path(weights).resolve(), stats, train_sha256, vocab, resnet)


def build_vocabulary(train_tokens, freq_threshold):
    vocab = Vocabulary(freq_threshold).build_vocab(train_tokens)
    if len(vocab) == len(Vocabulary.SPECIALS):
        raise UserError(f"--freq_threshold={freq_threshold} leaves no word in the vocabulary (no training "
                        f"word occurs that often): lower it, e.g. --freq_threshold=2")
    log(f"vocabulary: {len(vocab)} words (from the training split, threshold {freq_threshold})")
    return vocab


# --------------------------------------------------------------------------------------------------
# checkpoints and the output folder: a checkpoint is one flat dict, as nanoGPT's, loaded with
# weights_only=True; its settings drive --resume, --evaluate and --caption, its weights --init_from

# the model's shape: every mode takes it from a checkpoint, as nanoGPT forces its model_args, since
# its weights fit no other; a command line that contradicts one of these is refused
MODEL_ARGS = ("decoder", "embed_size", "hidden_size", "num_layers", "dropout", "image_size")
# --resume keeps these as well, or it would be another run: they decide the batches (as
# max_train_caption_len cuts them), the vocabulary, or which epoch best.pt keeps
RESUME_FIXED = MODEL_ARGS + ("dataset", "data_dir", "max_images", "demo_images", "freq_threshold",
                             "seed", "batch_size", "max_batches_per_epoch", "max_train_caption_len",
                             "best_metric")
# how and where this command runs, never taken from a checkpoint; --resume, --evaluate and --caption
# take every other setting from it, --init_from takes MODEL_ARGS
THIS_COMMAND = ("resume", "evaluate", "checkpoint", "init_from", "preset", "output_dir",
                "cache_dir", "device", "num_workers")
# what a fresh run sets aside, and nothing else: a cache_dir may share the folder
RUN_OUTPUTS = ["loss_per_*.csv", "*_graph.png", "vocab.json", "config.json", "best*.pt", "last.pt",
               "test_*", "report*"]


def settings_and_checkpoint(overrides, captioning):
    """The run's Config, and the checkpoint it starts from, as restore gives it, or None."""
    given = {name: globals()[name] for name in CONFIG_NAMES} | overrides
    from_checkpoint = [given[name] for name in ("resume", "evaluate", "init_from", "checkpoint")]
    if not captioning and not any(from_checkpoint):
        return resolve_settings(overrides, echo=log), None  # a fresh run's, resolved once
    cfg = resolve_settings(overrides)  # first: where the checkpoint is (output_dir, --checkpoint)
    path = checkpoint_of(cfg, captioning)
    restored = restore(path)
    names = MODEL_ARGS if cfg.init_from else [n for n in CONFIG_NAMES if n not in THIS_COMMAND]
    trained = {name: restored[1]["config"][name] for name in names}
    if not Path(trained.get("encoder_weights", "")).is_file():  # moved since: the one given is
        trained.pop("encoder_weights", None)  # checked against the sha256 the checkpoint records
    if not cfg.init_from and not overrides.get("output_dir", output_dir):
        trained["output_dir"] = str(path.parent)  # --caption and --evaluate write beside it
    cfg = resolve_settings(overrides, trained, stderr if captioning else log)
    if cfg.resume and not (captioning or cfg.evaluate):
        check_resume(restored[1], cfg)
    return cfg, restored


def checkpoint_of(cfg, captioning):
    """The checkpoint of --evaluate and --caption, --resume's last.pt, or --init_from's."""
    if cfg.init_from and (captioning or cfg.evaluate or cfg.resume):
        raise UserError(f"--init_from={cfg.init_from} starts a new training run: leave it out of "
                        f"--resume, --evaluate and --caption (which take --checkpoint)")
    if captioning or cfg.evaluate:
        return Path(cfg.checkpoint or Path(cfg.output_dir) / "best.pt")
    if cfg.checkpoint:
        raise UserError(f"--checkpoint={cfg.checkpoint} is for --evaluate and --caption: to train "
                        f"on from a checkpoint, use --resume (its run goes on) or --init_from")
    return Path(cfg.output_dir) / "last.pt" if cfg.resume else Path(cfg.init_from)


def check_resume(ckpt, cfg):
    """Refuses a resume whose steps would count otherwise: other processes, moved SCST epochs."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # a step's batch is batch_size a process
    if ckpt["processes"] != processes:
        raise UserError(f"checkpoint {ckpt['path']} was written by {ckpt['processes']} process(es),"
                        f" and this run has {processes}: resume it with as many (torchrun)")
    trained = ckpt["config"]["num_epochs"]
    began = ckpt["config"]["scst_epochs"] > 0 and ckpt["epoch"] >= trained  # SCST steps taken
    past = cfg.scst_epochs > 0 and ckpt["epoch"] >= cfg.num_epochs  # would be taken for SCST's
    if cfg.num_epochs != trained and (began or past):
        raise UserError(f"--num_epochs={cfg.num_epochs}: {ckpt['path']} trained {ckpt['epoch']} "
                        f"epochs of num_epochs={trained}; keep it, for its SCST epochs to follow")


def save_checkpoint(path, model, optimizer, cfg, data, progress):
    """What a run needs to go on, or a model to be rebuilt; config.json beside it."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise UserError(f"the model's weights are not finite at step {progress.step}: "
                        f"{path.name} unwritten")
    (path.parent / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    ckpt = {
        "model_args": model.args,  # MODEL_ARGS: Captioner(vocab, model_args) rebuilds the model
        "model": model.trainable_state_dict(),  # its weights, without the frozen ResNet50's
        "vocab": model.vocab.itos,
        "config": dataclasses.asdict(cfg),  # every setting it was trained with
        "optimizer": optimizer.state_dict(),
        **dataclasses.asdict(progress),  # epoch, step, best_score and the epoch's running sums
        "rng_state": torch.get_rng_state(),  # mid-epoch, dropout goes on as it would have
        "cuda_rng_state": torch.cuda.get_rng_state_all(),
        "processes": rank_and_size()[1],  # a step's batch: batch_size captions a process
        "encoder_weights": str(data.weights),  # the ResNet50 file its features came from
        "encoder_weights_sha256": weights_sha256(data.weights),
        "train_images_sha256": data.train_images_sha256,  # what --evaluate must not score
    }
    atomic_save(ckpt | {"model_sha256": model_sha256(ckpt)}, path)


def model_sha256(ckpt):
    """sha256 of what makes the model: its args, vocabulary, settings and its weights' bytes."""
    made_of = [ckpt["model_args"], ckpt["vocab"], ckpt["config"]]
    digest = hashlib.sha256(json.dumps(made_of, sort_keys=True).encode())
    for name in sorted(ckpt["model"]):
        digest.update(name.encode())
        digest.update(ckpt["model"][name].cpu().reshape(-1).view(torch.uint8).numpy())  # raw bytes
    return digest.hexdigest()


def restore(path):
    """A checkpoint: its model (from model_args, its weights loaded strictly) and its dict."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: train one first with `.venv/bin/python "
                        f"{Path(__file__).name}` (it writes best.pt and last.pt to output_dir)")
    try:  # unreadable, damaged, tampered with, of other types or shapes: one line naming the file
        with zipfile.ZipFile(path) as archive:  # torch.save's zip keeps each part's CRC32
            damaged = archive.testzip()
        if damaged:
            raise ValueError(f"its part {damaged} fails its CRC32")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # runs no pickled code
        if ckpt["model_sha256"] != model_sha256(ckpt):
            raise ValueError("its weights or settings are not those its sha256 was taken of")
        config = ckpt["config"]
        for field in dataclasses.fields(Config):  # its settings, typed as the command line's are
            value = config[field.name]
            if type(value) is not field.type:
                raise TypeError(f"config {field.name}={value!r}: not {field.type.__name__}")
        check_settings(config)
        args = {name: config[name] for name in MODEL_ARGS}  # typed and checked
        if ckpt["model_args"] != args:
            raise ValueError("its model_args are not its config's")
        model = Captioner(Vocabulary(config["freq_threshold"], ckpt["vocab"]), args)
        model.load_state_dict(ckpt["model"])
    except Exception as error:
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]  # torch's span lines
        raise UserError(f"checkpoint {path} is damaged or not one of this script's ({reason}): "
                        f"use another, or train afresh") from None
    return model, ckpt | {"path": path}


def check_weights(ckpt, weights):
    """Refuses ResNet50 weights other than the checkpoint's: its projection fits their features."""
    if weights_sha256(weights) != ckpt["encoder_weights_sha256"]:
        file = ckpt["encoder_weights"]
        gone = "" if Path(file).is_file() else ", no longer there: put it back"
        raise UserError(f"checkpoint {ckpt['path']} was trained on other ResNet50 weights than "
                        f"{weights}: use --encoder_weights={file}, the file it was trained "
                        f"with{gone}")


def check_data(ckpt, vocab, weights, train_sha256, data_dir):
    """Refuses data other than the checkpoint was trained on, before any feature is computed."""
    if vocab is not None and vocab.itos != ckpt["vocab"]:
        raise UserError(f"checkpoint {ckpt['path']} has a different vocabulary "
                        f"({len(ckpt['vocab'])} words, now {len(vocab)}): the captions in "
                        f"{data_dir} changed; train afresh")
    check_weights(ckpt, weights)
    if train_sha256 != ckpt["train_images_sha256"]:
        raise UserError(f"the training split of {data_dir} is not the one {ckpt['path']} was "
                        f"trained on: its test split may hold training images. Use its data, or "
                        f"train afresh")


def init_weights(model, path, weights):
    """--init_from: a new run's model takes a checkpoint's weights, if their vocabulary is its."""
    trained, ckpt = restore(path)
    if ckpt["vocab"] != model.vocab.itos:
        raise UserError(f"--init_from={path}: its vocabulary ({len(ckpt['vocab'])} words) is not "
                        f"this run's ({len(model.vocab)}): train on the captions it was trained "
                        f"on, with --freq_threshold={ckpt['config']['freq_threshold']}")
    check_weights(ckpt, weights)
    model.load_state_dict(trained.state_dict())  # its feature statistics too: its weights fit them
    log(f"starting from the weights of {path} (epoch {ckpt['epoch']}), with a fresh optimizer")


def claim_output_dir(out, fresh=False):
    """Creates and locks output_dir for this run; a fresh run sets an earlier run's files aside."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "a+")
    except OSError as error:
        raise UserError(f"cannot write to --output_dir={out}: {error.strerror or error} (is it, "
                        f"or a folder above it, a file or read-only?). Choose another "
                        f"output_dir") from None
    if not try_lock(lock):
        lock.seek(0)
        holder = lock.read().strip() or "?"
        raise UserError(f"another run (process {holder}) is writing to {out}: wait for it to "
                        f"finish, stop it, or choose another --output_dir") from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    # only this run may write its outputs here now: their temporary files are a dead run's
    for stale in {p for pattern in RUN_OUTPUTS for p in out.glob(f"{pattern}.*tmp")}:
        stale.unlink()
    earlier = [p for pattern in RUN_OUTPUTS for p in out.glob(pattern)]
    if fresh and earlier:  # never a folder that mixes two runs, and nothing of the earlier one lost
        stamp = f"previous-{datetime.datetime.now():%Y%m%d-%H%M%S}-"
        aside = Path(tempfile.mkdtemp(prefix=stamp, dir=out))
        for path in earlier:
            os.replace(path, aside / path.name)
        log(f"{out} held an earlier run: its files are now in {aside} (--resume continues a run)")
    return lock  # held open until the process ends


class CtrlC:
    """Ctrl-C or SIGTERM asks the loop to save last.pt and stop; a second one stops at once."""
    # under torchrun, whose agent passes one Ctrl-C on twice, every signal only asks
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


def append_csv(path, rows, columns):
    """Appends rows in the file's column order; a file lacking columns is rewritten, atomically."""
    frame = pd.DataFrame(rows, columns=columns)
    path = Path(path)
    if not path.is_file():
        frame.to_csv(path, index=False)
        return
    with open(path) as f:
        header = f.readline().strip().split(",")
    if set(columns) <= set(header):
        frame.reindex(columns=header).to_csv(path, mode="a", header=False, index=False)
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # SCST's columns, or an older version's
    pd.concat([pd.read_csv(path), frame]).to_csv(tmp, index=False)
    os.replace(tmp, path)


def truncate_csv(path, column, last):
    """Keeps the rows up to a checkpoint, so a resumed run neither repeats nor loses any."""
    if Path(path).is_file():
        try:
            frame = pd.read_csv(path)
        except pd.errors.EmptyDataError:  # killed before its first row: nothing to keep
            Path(path).unlink()
            return
        frame[frame[column] <= last].to_csv(path, index=False)


def resume_hint(out, step, size):
    """The command that resumes an interrupted run, as a user can paste it; exit code 130."""
    arguments = [a for a in sys.argv[1:] if a != "--resume"]
    command = shlex.join([Path(__file__).name, *arguments, "--resume"])
    runner = "torchrun ... " if size > 1 else ".venv/bin/python "
    log(f"\ninterrupted: saved {out / 'last.pt'} at step {step}. Resume with:\n  {runner}{command}")
    return 130


# --------------------------------------------------------------------------------------------------
# several processes (torchrun): the same loop in each, on its share of every batch; rank 0 writes

def start_processes(device):
    """Under torchrun, joins the process group and returns this process's device; else the device as it is."""
    if "LOCAL_RANK" not in os.environ:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # the others wait while process 0 writes the feature cache: at COCO's size, longer than NCCL's 10 minutes
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


# --------------------------------------------------------------------------------------------------
# the results page: report.html, every test image with its caption, references and scores

def test_report(restored, data, cfg, device, tag=""):
    """Test metrics, captions (with each image's scores) and report.html, tag in their names."""
    model, ckpt = restored
    out, start = Path(cfg.output_dir), time.time()
    if data.resnet is not None:  # no cached features: the backbone encodes every image
        model.encoder.attach(data.resnet)
    model.to(device)
    captions, _ = generate_captions(model, data.source, data.images("test"), cfg, device)
    demo = demo_scores(model, data, "test", cfg, device, by_kind=True)  # in every process: each does a share
    if not is_main_process():
        return
    refs = references_of(data.split("test"))
    metrics, scores = caption_metrics(refs, captions)
    for name, right in demo_judgement(cfg, captions).items():
        scores[name]["right"] = right
    pd.DataFrame([{"image": n, "caption": c, "references": " | ".join(refs[n]), **scores[n]}
                  for n, c in captions.items()]).to_csv(out / f"test_captions{tag}.csv", index=False)
    coco = [{"image_id": coco_image_id(n), "caption": c} for n, c in captions.items()]  # COCO's format
    (out / f"test_captions{tag}.json").write_text(json.dumps(coco))
    report = {"checkpoint": str(ckpt["path"]), "split": "test", "images": len(captions),
              "beam_size": cfg.beam_size, **metrics, **demo, "seconds": round(time.time() - start, 2)}
    (out / f"test_metrics{tag}.json").write_text(json.dumps(report, indent=2))
    log(f"test split, {len(captions)} images, beam {cfg.beam_size} ({ckpt['path']}): "
        f"{format_metrics(metrics)}")
    for name in random.Random(cfg.seed).sample(sorted(captions), min(6, len(captions))):
        log(f"  {name}: {captions[name]}\n      reference: {refs[name][0]}")
    maps = word_maps(model, data.source, captions, device)
    rows = [{"path": data.source.image_dir / n, "name": n, "caption": c, "references": refs[n],
             "scores": scores[n], "maps": maps.get(n)} for n, c in captions.items()]
    title = f"{cfg.dataset}: the test split's {len(rows)} images"
    page = write_report(out, f"report{tag}", title, report_header(cfg, ckpt, metrics | demo), rows)
    log(f"results page: {page}")


@torch.no_grad()
def word_maps(model, source, captions, device):
    """{name: [(word, its attention map (h, w))]} of an attention model's captions, replayed; {} if pooled."""
    if not model.attention:
        return {}
    maps, items = {}, [(name, caption.split()) for name, caption in captions.items()]
    for chunk in (items[i:i + 64] for i in range(0, len(items), 64)):
        ids = pad_sequence([torch.tensor([Vocabulary.SOS, *model.vocab.numericalize(w), Vocabulary.EOS])
                            for _, w in chunk], batch_first=True).to(device)  # (N, T)
        inputs = torch.stack([source.get(name) for name, _ in chunk]).to(device)
        with evaluating(model):
            _, alphas = model.decoder(model.encoder(inputs), ids, alphas=True)  # (N, T-1, L)
        side = math.isqrt(alphas.size(-1))
        maps |= {name: list(zip(words, a.view(-1, side, side).cpu().numpy()))  # (T-1, h, w): a map a word
                 for (name, words), a in zip(chunk, alphas)}
    return maps


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # figures go to files; no window, no display needed
    import matplotlib.pyplot as plt
    return plt


def save_caption_figure(items, path, maps=None):
    """Images (path, caption) three to a row; with attention maps, each image then its words, one a panel."""
    plt, attention = pyplot(), any(maps or [])
    if attention:  # each image, then a panel per word
        groups = [[(image, text, None), *((image, word, m) for word, m in words or [])]
                  for (image, text), words in zip(items, maps)]
        per_row, (width, height), wrap = 6, (2.6, 3.1), 32
    else:
        groups = [[(*item, None) for item in items]]
        per_row, (width, height), wrap = 3, (4.5, 5.2), 50
    rows = [group[i:i + per_row] for group in groups for i in range(0, len(group), per_row)]
    cols = max(map(len, rows))
    fig, axes = plt.subplots(len(rows), cols, figsize=(width * cols, height * len(rows)), squeeze=False,
                             layout="constrained", subplot_kw=dict(frame_on=False, xticks=[], yticks=[]))
    for axes_row, row in zip(axes, rows):
        for ax, (image, text, word_map) in zip(axes_row, row):
            picture = open_rgb(image)
            picture.thumbnail((1024, 1024))  # a figure needs no more pixels, and a huge image no copies
            if attention:  # the centre square, as image_transform crops it
                picture = ImageOps.fit(picture, (min(picture.size),) * 2)
            ax.imshow(picture)
            if word_map is not None:
                ax.imshow(word_map, cmap="gray", alpha=0.65, interpolation="bilinear",
                          extent=(0, picture.width, picture.height, 0))
            ax.set_title(textwrap.fill(text, wrap), fontsize=8, loc="left")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def plot_history(out):
    from matplotlib.ticker import MaxNLocator
    plt = pyplot()
    batches, epochs = pd.read_csv(out / "loss_per_batch.csv"), pd.read_csv(out / "loss_per_epoch.csv")
    scst = batches.get("phase", pd.Series(dtype=str)).reindex(batches.index) == "self-critical"
    epochs.loc[epochs["phase"] == "self-critical", "train_loss"] = None
    per_batch = batches[~scst].assign(**{"mean of 50": lambda b: b["loss"].rolling(50, min_periods=1).mean()})
    panels = 3 if scst.any() else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), layout="constrained")
    per_batch.plot(x="step", y=["loss", "mean of 50"], ax=axes[0], ylabel="training loss",
                   title="loss per batch")
    epochs.plot(x="epoch", y=["train_loss", "val_loss"], style="o-", ax=axes[1], ylabel="loss",
                title="loss per epoch")
    if scst.any():
        batches[scst].plot(x="step", y=["reward", "greedy_cider"], ylabel="CIDEr-D (training images)",
                           ax=axes[2], title="self-critical: sampled and greedy captions")
    columns = ["val_token_accuracy", "BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "demo_accuracy", "CIDEr"]
    scores = 100 * epochs.set_index("epoch").filter(columns).astype(float).dropna(axis=1, how="all")
    metrics_fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    scores.drop(columns="CIDEr").plot(style="o-", ax=left, ylabel="score x 100", title="validation metrics")
    scores[["CIDEr"]].plot(style="o-", color="tab:brown", ax=right, ylabel="score x 100",
                           title="validation CIDEr")
    for ax in (axes[1], left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epoch 2, not 2.5
    fig.savefig(out / "loss_graph.png", dpi=90)
    metrics_fig.savefig(out / "metrics_graph.png", dpi=90)
    plt.close("all")


def evaluate_checkpoint(cfg, device, restored):
    """--evaluate: the test report of a checkpoint, on the data it was trained on (refused if not)."""
    lock = claim_output_dir(cfg.output_dir) if is_main_process() else None
    data = prepare_data(cfg, device, trained=restored[1])
    test_report(restored, data, cfg, device, f"-{restored[1]['path'].stem}-beam{cfg.beam_size}")
    del lock
    return 0


REPORT_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; } .name { color: #777; margin: 0; }
[hidden] { display: none !important; } .row img { width: 160px; } .maps canvas { width: 112px; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ccc; padding: 2px 8px; }
.graphs img { max-width: 48%; } .controls { position: sticky; top: 0; background: #fff; padding: .5em 0; }
.row { display: flex; gap: 1em; border-top: 1px solid #ddd; padding: .6em 0; } .scores { min-width: 9em; }
.text { flex: 1; } .right { color: #080; } .wrong { color: #b00; }
.caption { font-size: 1.15em; margin: 0; } .row ul { margin: .3em 0; padding-left: 1.2em; color: #555; }
.maps figure { display: inline-block; margin: 2px; } .maps figcaption { text-align: center; }
"""


REPORT_SCRIPT = """
const list = document.getElementById('rows'), rows = [...list.children];
const keys = new Map(rows.map(row => [row, {...JSON.parse(row.dataset.scores), name: row.dataset.name}]));
const sort = document.getElementById('sort'), filter = document.getElementById('filter');
function update() {
  const [by, direction] = sort.value.split('|'), sign = direction === 'desc' ? -1 : 1;
  const words = filter.value.toLowerCase().split(/\\s+/).filter(Boolean);
  const order = (a, b) => sign * ((keys.get(a)[by] > keys.get(b)[by]) - (keys.get(a)[by] < keys.get(b)[by]));
  rows.slice().sort(order).forEach(row => list.append(row));
  rows.forEach(row => { row.hidden = !words.every(word => (' ' + row.dataset.words).includes(' ' + word)); });
  const shown = rows.filter(row => !row.hidden).length;
  document.getElementById('count').textContent = `${shown} of ${rows.length} images`;
}
list.addEventListener('click', async event => {  // each word's attention, as --caption_figure draws it
  if (!event.target.matches('.show-maps')) return;
  const row = event.target.closest('.row'), box = row.querySelector('.maps');
  const image = row.querySelector('img'), loaded = await image.decode().then(() => true, () => false);
  for (const [word, map] of box.children.length ? [] : JSON.parse(row.dataset.maps)) {  // drawn once
    const side = Math.sqrt(map.length), low = Math.min(...map), high = Math.max(...map);
    const pixels = new ImageData(side, side);
    map.forEach((v, i) => pixels.data.set([0, 0, 0, 166 * (1 - (v - low) / (high - low || 1))], 4 * i));
    const figure = box.appendChild(document.createElement('figure'));
    const canvas = figure.appendChild(document.createElement('canvas')), context = canvas.getContext('2d');
    figure.appendChild(document.createElement('figcaption')).textContent = word;
    canvas.width = canvas.height = 224;
    if (loaded) context.drawImage(image, 0, 0, 224, 224);  // a missing thumbnail: the maps alone
    context.drawImage(await createImageBitmap(pixels), 0, 0, 224, 224);
  }
  box.hidden = !box.hidden;
});
sort.onchange = filter.oninput = update;
update();
"""


def write_report(out, name, title, header, rows):
    """out/name.html, thumbnails in out/name/: the header, then a row per image, sortable and filterable."""
    out, folder = Path(out), Path(out) / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    entries = [report_row(row, folder / f"{i:05d}.jpg", out) for i, row in
               enumerate(tqdm(rows, desc="results page", unit="img", leave=False))]
    keys = list(dict.fromkeys(k for row in rows for k in row.get("scores", {})))
    orders = [f"{k}|{d}" for d in ("asc", "desc") for k in keys] + ["name|asc"]  # the first: worst first
    options = "".join(f'<option value="{o}">{o.replace("|", ", ")}ending</option>' for o in orders)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}'
            f'</title><style>{REPORT_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{header}\n'
            f'<div class="controls"><label>sort by <select id="sort">{options}</select></label> '
            f'<label>captions with the word <input id="filter" type="search" placeholder="e.g. dog"></label> '
            f'<span id="count"></span></div>\n<div id="rows">\n' + "\n".join(entries) +
            f'\n</div>\n<script>{REPORT_SCRIPT}</script></body></html>\n')
    (out / f"{name}.html").write_text(page, encoding="utf-8")
    return out / f"{name}.html"


def report_row(row, thumbnail, out):
    """One image's entry: its thumbnail (written now), caption, references, scores and attention maps."""
    with contextlib.suppress(Exception):  # an image gone since it was captioned: the row stays, without it
        picture = open_rgb(row["path"])
        if row.get("maps"):  # the centre square, which the model saw and its maps cover
            picture = ImageOps.fit(picture, (min(picture.size),) * 2)
        picture.thumbnail((256, 256))  # shown at 160 px: sharp on a high-density screen too
        picture.save(thumbnail, quality=80)
    scores, maps = row.get("scores", {}), row.get("maps")
    data = dict(name=row["name"], words=" ".join(row["caption"].lower().split()), scores=json.dumps(scores),
                maps=json.dumps([[w, m.astype(float).round(3).flatten().tolist()] for w, m in maps or []]))
    attributes = " ".join(f'data-{k}="{html.escape(v)}"' for k, v in data.items())
    verdict = {True: '<span class="right">right</span>', False: '<span class="wrong">wrong</span>'}
    shown = [verdict[v] if k == "right" else f"{k} {100 * v:.1f}" for k, v in scores.items()]
    references = "".join(f"<li>{html.escape(r)}</li>" for r in row.get("references", []))
    button = '<button class="show-maps">attention</button><div class="maps" hidden></div>' if maps else ""
    name, link = html.escape(row["name"]), urllib.parse.quote(os.path.relpath(row["path"], out))
    src = urllib.parse.quote(thumbnail.relative_to(out).as_posix())  # quoted: no " & < left to escape
    return (f'<div class="row" {attributes}><a href="{link}"><img loading="lazy" src="{src}" alt="{name}">'
            f'</a><div class="text"><p class="caption">{html.escape(row["caption"])}</p><ul>{references}</ul>'
            f'<p class="name">{name}</p>{button}</div><div class="scores">{"<br>".join(shown)}</div></div>')


def report_header(cfg, ckpt, metrics=None):
    """The top of the page: checkpoint, data, metrics, the settings that differ from the constants, graphs."""
    changed = "".join(f"<tr><td>{n}</td><td>{html.escape(repr(getattr(cfg, n)))}</td></tr>"
                      for n in CONFIG_NAMES if getattr(cfg, n) != globals()[n])
    names = "".join(f"<th>{k}</th>" for k in metrics or {})
    values = "".join(f"<td>{'n/a' if v is None else f'{100 * v:.1f}'}</td>" for v in (metrics or {}).values())
    graphs = "".join(f'<img src="{g}" alt="{g}">' for g in ("loss_graph.png", "metrics_graph.png")
                     if (Path(cfg.output_dir) / g).is_file())
    return (f"<p>checkpoint {html.escape(str(ckpt['path']))} (epoch {ckpt['epoch']}, "
            f"{ckpt['model_args']['decoder']} decoder), beam {cfg.beam_size}; trained on "
            f"{html.escape(ckpt['config']['dataset'])} ({html.escape(ckpt['config']['data_dir'])})</p>\n"
            + (f"<table><tr>{names}</tr><tr>{values}</tr></table>\n" if metrics else "")
            + f"<details><summary>settings that differ from the script's constants</summary><table>{changed}"
            f'</table></details>\n<p class="graphs">{graphs}</p>')


def coco_image_id(name):
    """COCO's integer image id from its file name (COCO_val2014_000000391895.jpg: 391895); else the name."""
    match = re.fullmatch(r"(?:.*/)?COCO_[a-z]+\d*_0*(\d+)\.jpg", name)
    return int(match[1]) if match else name


# --------------------------------------------------------------------------------------------------
# --caption: captions for new images from a checkpoint

def check_figure_path(figure, inputs):
    """--caption_figure, refused before any captioning if it cannot be written or would overwrite an input."""
    from matplotlib.backend_bases import FigureCanvasBase
    if figure.suffix[1:].lower() not in FigureCanvasBase.get_supported_filetypes():
        raise UserError(f"--caption_figure={figure}: name an image file such as captions.png (or .jpg, .pdf)")
    if figure.is_dir():
        raise UserError(f"--caption_figure={figure} is a folder: name a file, e.g. {figure / 'captions.png'}")
    if figure.resolve() in {p.resolve() for p in inputs}:
        raise UserError(f"--caption_figure={figure} is one of the images to caption: name another file")
    try:  # writable for real: permissions alone do not tell (a read-only mount, /proc); nor a missing folder
        tempfile.TemporaryFile(dir=figure.parent).close()
    except OSError as error:
        raise UserError(f"--caption_figure={figure}: cannot write in {figure.parent} "
                        f"({error.strerror or error}): choose another folder") from None


def record_path(path):
    """The path as one field of a line: tab, newline, CR and backslash escaped as Python does."""
    return str(path).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def caption_images(cfg, paths, restored, device):
    """--caption: prints path<TAB>caption for each image; stdout holds nothing else, messages go to stderr."""
    given = [Path(p) for p in paths]
    missing = [p for p in given if not p.is_dir() and not p.is_file()]
    files = [f for p in given for f in (sorted(p.iterdir()) if p.is_dir() else [p])
             if f.is_file() and (f == p or f.suffix.lower() in IMAGE_EXTENSIONS)]  # named: any suffix
    weights = encoder_weights_file(cfg)
    resnet = load_resnet50(weights)  # first: a missing or damaged file is its own clear error
    model, ckpt = restored
    check_weights(ckpt, weights)
    model.encoder.attach(resnet)
    if not files:
        stderr(f"error: no images found in {' '.join(map(str, paths))}")
    names = [str(f.resolve()) for f in files]
    source = ImageSource(Path("/"), image_transform(model.args["image_size"]))
    captions, failed = generate_captions(model.to(device), source, names, cfg, device)
    for file, name in zip(files, names):
        if name in captions:
            print(f"{record_path(file)}\t{captions[name]}", flush=True)
        else:
            stderr(f"error: cannot read image {record_path(file)}")
    for file in missing:
        stderr(f"error: no such file or folder: {record_path(file)}")
    if not captions:
        return 1
    maps = word_maps(model, source, captions, device)
    rows = [{"path": Path(name), "name": str(file), "caption": captions[name], "maps": maps.get(name)}
            for file, name in zip(files, names) if name in captions]
    try:  # report-captions.html; the captions are out: a folder that cannot be written only warns
        page = write_report(cfg.output_dir, "report-captions", f"{len(rows)} images captioned",
                            report_header(cfg, ckpt), rows)
        stderr(f"results page: {page}")
    except OSError as error:
        stderr(f"warning: no results page in {cfg.output_dir}: {error.strerror or error}")
    return 1 if failed or missing else 0


# --------------------------------------------------------------------------------------------------
# main: settings, then training, --evaluate or --caption

def main(argv=None):
    """Settings, then a mode: --caption, --evaluate or training (fresh, resumed or from weights)."""
    try:
        overrides, caption_paths = parse_args(sys.argv[1:] if argv is None else argv)
        captioning = caption_paths is not None  # then stdout holds only captions
        if captioning and "LOCAL_RANK" in os.environ:
            raise UserError("--caption runs in one process: run it without torchrun")
        cfg, restored = settings_and_checkpoint(overrides, captioning)
        device = pick_device(cfg.device)
        if captioning:
            return caption_images(cfg, caption_paths, restored, device)
        device = start_processes(device)  # under torchrun: this process's GPU, and the others
        if cfg.evaluate:
            return evaluate_checkpoint(cfg, device, restored)
        return train(cfg, device)
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


def stderr(message):
    print(message, file=sys.stderr)


def say_once(message):
    """Prints message to stderr; under torchrun once: the others wait while process 0 fails."""
    if "LOCAL_RANK" in os.environ and (not is_main_process() or message is None):
        time.sleep(3)
    if message:
        stderr(message)


if __name__ == "__main__":
    sys.exit(main())
