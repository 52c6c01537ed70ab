"""Image captioning on Flickr8k, Flickr30k or MS-COCO: a frozen ResNet50 and an LSTM decoder.

    .venv/bin/python flickr_image_caption_with_pytorch_resnet_lstm.py  # train (the demo if no data)
    ... --resume                  # go on from output_dir's last.pt, with its own settings
    ... --evaluate                # the test split's metrics of best.pt (or --checkpoint=FILE)
    ... --caption a.jpg dir/      # captions of new images, from best.pt (or --checkpoint=FILE)
    ... --init_from=FILE          # a new run that starts from a checkpoint's weights

Every constant below can be overridden on the command line as --name=value; --help lists them all.
"""
import argparse
import atexit
import concurrent.futures
import contextlib
import csv
import dataclasses
import datetime
import difflib
import fcntl
import functools
import hashlib
import io
import json
import math
import os
import random
import re
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import time
import unicodedata
import tokenize
import urllib.parse
import zipfile
from collections import Counter
from pathlib import Path
from typing import NamedTuple

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


ROOT = Path(__file__).resolve().parent

# config: plain constants; override any of them as --name=value (--help shows each with its comment)
# data
dataset = "auto"            # which data; 'auto': Flickr8k if it is there, else the built-in demo
data_dir = ""               # '' means resources/input/<dataset>
encoder_weights = "resources/models/resnet50-0676ba61.pth"  # ImageNet's, from ./setup.sh
                            # ('random': a random ResNet50, to check the pipeline without them)
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
label_smoothing = 0.0       # the training cross-entropy's label smoothing (val_loss stays plain)
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
length_penalty = 0.0        # GNMT's alpha: beams rank by log p / ((5 + |Y|) / 6)^alpha; 0: per word
block_trigrams = False      # beam search never repeats a trigram a caption already holds
learned_endings = False     # no caption ends on a word no training caption ends on ('a', 'with')
suppress_unk = True         # <UNK> is never generated (beam search, greedy, SCST's samples)
best_metric = "auto"        # what picks best.pt: 'CIDEr', 'BLEU-4', 'val_loss' (lowest) or the
                            # demo's 'demo_accuracy'; 'auto': demo_accuracy on the demo, else CIDEr
# modes
evaluate = False            # evaluate a checkpoint on the test split and exit
checkpoint = ""             # for --evaluate and --caption; '' means best.pt in output_dir
caption_format = "text"     # --caption's lines: 'text' (path, tab, caption) or 'json' (an object
                            # an image: path, caption, the beam's n-best with log-probabilities)
preset = "auto"             # 'auto' (the dataset's own settings: PRESETS) or 'none' (the constants)

CONFIG_NAMES = [k for k, v in globals().items()
                if not k.startswith("_") and k.islower() and isinstance(v, (bool, int, float, str))]
DEFAULTS = {name: globals()[name] for name in CONFIG_NAMES}  # the constants as written above
# Settings resolved once per run, then frozen: cfg.learning_rate, never a dictionary code changes.
Config = dataclasses.make_dataclass("Config", [(n, type(v)) for n, v in DEFAULTS.items()],
                                    frozen=True)


# The demo's settings over the constants, to finish in minutes on a 2-core CPU: its 36 words need
# no 2-layer 512-unit LSTM, and one layer of 256 reads the shapes as well in half the time
PRESETS = {"demo": dict(image_size=128, num_epochs=20, batch_size=64, learning_rate=0.002,
                        lr_schedule="cosine", embed_size=128, hidden_size=256, num_layers=1,
                        max_caption_len=24)}  # room to end its longest caption: 20 words, a stop


# --------------------------------------------------------------------------------------------------
# vocabulary: spaCy's tokens, and the words of the training split that occur freq_threshold times
# hands Vocabulary (words <-> ids) to the dataset, the models and the metrics

@functools.lru_cache(maxsize=1)
def spacy_tokenizer():
    import spacy  # spacy.blank("en") tokenizes as en_core_web_sm does, with no model download
    return spacy.blank("en").tokenizer


class Vocabulary:
    PAD, SOS, EOS, UNK = 0, 1, 2, 3
    SPECIALS = ["<PAD>", "<SOS>", "<EOS>", "<UNK>"]

    def __init__(self, freq_threshold=5, itos=None, endings=()):
        self.freq_threshold = freq_threshold
        self.endings = list(endings)  # what training captions end on: last words, punctuation after
        self.itos = list(self.SPECIALS if itos is None else itos)
        if self.itos[:4] != self.SPECIALS:
            raise ValueError(f"a vocabulary must start with {self.SPECIALS}")
        self.stoi = {word: i for i, word in enumerate(self.itos)}

    def __len__(self):
        return len(self.itos)

    @staticmethod
    def tokenize(text):
        # spaCy makes tokens of "\n", "\t", " " and U+2028 too: whitespace is never a word
        return [token.text.lower() for token in spacy_tokenizer()(text) if not token.is_space]

    def build_vocab(self, sentences):
        """Counts words in sentences (strings, or lists of tokens already split)."""
        tokenized = [s if isinstance(s, list) else self.tokenize(s) for s in sentences]
        counts = Counter(token for tokens in tokenized for token in tokens)
        new = [w for w, n in counts.items() if n >= self.freq_threshold and w not in self.stoi]
        self.itos += sorted(new, key=lambda word: (-counts[word], word))  # the most frequent first
        self.stoi = {word: i for i, word in enumerate(self.itos)}
        return self

    def numericalize(self, text):
        tokens = text if isinstance(text, list) else self.tokenize(text)
        return [self.stoi.get(token, self.UNK) for token in tokens]

    def decode(self, ids):
        if self.EOS in ids:
            ids = ids[:ids.index(self.EOS)]
        return " ".join(self.itos[i] for i in ids if i not in (self.PAD, self.SOS))


# --------------------------------------------------------------------------------------------------
# dataset and batches: one item per caption, its image's cached ResNet50 features and its word ids
# hands (features, padded captions) batches, in an order fixed by seed and epoch, to training

def image_transform(size):
    """What the frozen ResNet50 sees: resized, centre-cropped, normalised as for ImageNet."""
    from torchvision.transforms import v2 as T  # here, not above: --help skips its second
    return T.Compose([T.ToImage(), T.Resize(size, antialias=True), T.CenterCrop(size),
                      T.ToDtype(torch.float32, scale=True),
                      T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])


class ImageSource:
    """The frozen ResNet50's features by image name: pooled (N, 2048) or grids (N, L, 2048)."""

    def __init__(self, image_dir, features, names):
        self.image_dir = Path(image_dir)
        self.features = features
        self.row = {name: i for i, name in enumerate(names)}


class FlickrDataset:
    """One item per caption: its image's features and its word ids, <SOS> first and <EOS> last."""

    def __init__(self, captions, vocab, source, max_len=None):
        self.images = captions["image"].tolist()
        self.source = source
        tokens = captions["tokens"]  # prepare_data's
        cut = sum(len(t) > max_len for t in tokens) if max_len else 0
        if cut:  # one 10,000-word caption once made two batches take 420 s
            tokens = [t[:max_len] for t in tokens]
            log(f"{cut} caption(s) longer than {max_len} words cut to {max_len} words")
        ids = [[vocab.SOS, *vocab.numericalize(t), vocab.EOS] for t in tokens]
        self.lengths = torch.tensor([len(c) for c in ids])  # (N,)
        # every batch is indexed from these two, in place: no DataLoader, no copies per item
        self.padded = torch.zeros(len(ids), int(self.lengths.max()), dtype=torch.int)  # (N, T)
        words = torch.arange(self.padded.size(1)) < self.lengths[:, None]  # (N, T): not padding
        self.padded[words] = torch.tensor([i for c in ids for i in c], dtype=torch.int)
        self.rows = torch.tensor([source.row[name] for name in self.images])  # (N,) feature rows

    def __len__(self):
        return len(self.lengths)

    def batch(self, indices, device="cpu"):
        """The captions at indices, cut to the longest, with their images' features, on device."""
        index = torch.tensor(indices)
        longest = int(self.lengths[index].max())  # on the host: no wait for a GPU
        rows = self.rows[index].to(self.source.features.device)
        features = self.source.features[rows]  # (B, 2048) or (B, L, 2048)
        captions = self.padded[index, :longest].long()  # (B, T)
        return features.to(device, non_blocking=True), captions.to(device, non_blocking=True)


@dataclasses.dataclass
class Data:
    """What a run trains and is scored on."""
    frame: pd.DataFrame         # image, caption, tokens, split: one row per caption
    source: ImageSource         # every readable image's features
    weights: Path               # the ResNet50 file the features come from
    feature_stats: tuple        # mean and std (2048,) of the training split's features
    train_images_sha256: str    # which images the split trains on, as checkpoints record it
    vocab: "Vocabulary" = None  # of the training split, when asked for
    shapes: dict = None         # the demo's: each image's shapes as drawn, which score captions

    def split(self, name):
        return self.frame[self.frame["split"] == name]

    def images(self, split):
        return sorted(self.split(split)["image"].unique())


def epoch_batches(n, batch_size, seed, epoch, max_batches=0):
    """The epoch's batches of caption indices, in an order fixed by seed and epoch."""
    # a resume repeats the order exactly: the generator is seeded by the epoch, never global
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return batches[:max_batches or None]


def process_batches(n, cfg, epoch):
    """This process's share of each step's batch: any number of processes takes the same steps."""
    rank, size = rank_and_size()
    batches = epoch_batches(n, cfg.batch_size * size, cfg.seed, epoch, cfg.max_batches_per_epoch)
    shares = [batch[rank::size] for batch in batches if len(batch) >= size]
    if not shares:
        raise UserError(f"{n} training items cannot be shared by {size} processes: use fewer")
    return shares


# --------------------------------------------------------------------------------------------------
# models: EncoderCNN projects the frozen ResNet50's features; DecoderRNN (Show and Tell) or
# AttentionDecoder (Show, Attend and Tell) writes the caption; Captioner holds both and the
# vocabulary, and hands training a loss, SCST sampled captions, and validation beam search's words

class EncoderCNN(nn.Module):
    """The frozen ResNet50 (from the local .pth) and the trained projection of its features."""
    # the ResNet50 runs once per image, to fill the feature cache (and on --caption's new images):
    # training reads its cached features, and a checkpoint holds only what was trained

    def __init__(self, embed_size, resnet=None):
        super().__init__()
        # in a tuple, not a submodule: neither Adam nor a checkpoint ever sees the frozen weights
        self.resnet = (resnet,) if resnet else ()
        # standardising with the training set's statistics (per channel, over every grid cell for
        # the attention decoder) is what lets the decoder read random-weight features
        self.register_buffer("feature_mean", torch.zeros(2048))
        self.register_buffer("feature_std", torch.ones(2048))
        self.embed = nn.Linear(2048, embed_size)

    @torch.inference_mode()
    def grid(self, images):
        """ResNet50's last convolutional grid of images: L = h*w vectors (B, L, 2048)."""
        images = images.contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
        out = self.resnet[0](images).float()  # (B, 2048*L): the pooled mean is the grid's
        return out.view(out.size(0), 2048, -1).transpose(1, 2)  # (B, L, 2048)

    def forward(self, features):
        """Pooled features (B, 2048) or grids (B, L, 2048) -> (B, E) or (B, L, E)."""
        features = features.float()  # cached grids are float16
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
        """Logits (B, T-1, V) for captions[:, 1:] given the image (B, E) and captions[:, :-1]."""
        words = self.drop(self.embed(captions[:, :-1]))  # (B, T-1, E)
        x = torch.cat([image_embeds.unsqueeze(1), words], 1)  # (B, T, E)
        out, _ = self.lstm(x)  # (B, T, H)
        return self.to_vocab(self.drop(out[:, 1:]))  # (B, T-1, V): the image step predicts nothing

    def start(self, image_embeds):
        """The LSTM's state after reading the image (B, E): (h, c), each (num_layers, B, H)."""
        _, state = self.lstm(image_embeds.unsqueeze(1))  # (B, 1, E) in
        return state

    def step(self, tokens, state, first=False):
        """Log-probabilities (B, V) of the word after tokens (B,), and the state after them."""
        out, state = self.lstm(self.embed(tokens).unsqueeze(1), state)  # (B, 1, H)
        return next_word_logp(self.to_vocab(out.squeeze(1)), first), state

    @staticmethod
    def reorder(state, rows):
        """The state of the batch rows given, in their order: (h, c), each (num_layers, rows, H)."""
        return tuple(s[:, rows] for s in state)


def next_word_logp(logits, first):
    """Log-probabilities (B, V) of the next word, never <PAD> or <SOS>, nor <EOS> first."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, V)
    # ids 0 <PAD> and 1 <SOS> never come; 2 <EOS> not first, as no caption may be empty
    never = torch.arange(3 if first else 2, device=logp.device)
    return logp.index_fill(1, never, -math.inf)  # a copy: SCST's gradient needs the original


def sample_captions(decoder, image_embeds, samples=1, max_len=20, greedy=False, never=()):
    """n samples an image, word by word: ids (B*n, T), <EOS> then <PAD>; each word's log-prob."""
    rows = torch.arange(len(image_embeds), device=image_embeds.device).repeat_interleave(samples)
    state = decoder.reorder(decoder.start(image_embeds), rows)  # rows (B*n,): 0, .., 0, 1, ..
    tokens = torch.full_like(rows, Vocabulary.SOS)  # (B*n,)
    ended = torch.zeros_like(tokens, dtype=torch.bool)  # (B*n,)
    words, logps = [], []  # each step's (B*n,)
    for t in range(max_len):
        logp, state = decoder.step(tokens, state, first=t == 0)  # (B*n, V)
        logp[:, never] = -math.inf  # in place: next_word_logp's copy, which no gradient needs
        if greedy:
            tokens = logp.argmax(-1)  # (B*n,)
        else:  # at temperature 1
            tokens = torch.multinomial(logp.exp(), 1).squeeze(1)  # (B*n,)
        tokens = tokens.masked_fill(ended, Vocabulary.PAD)  # (B*n,): padding after <EOS>
        words.append(tokens)
        logp = logp.gather(1, tokens.unsqueeze(1)).squeeze(1)  # (B*n,): the drawn word's
        logps.append(logp.masked_fill(ended, 0.0))
        ended = ended | (tokens == Vocabulary.EOS)  # (B*n,)
        if ended.all():
            break
    return torch.stack(words, 1), torch.stack(logps, 1)  # (B*n, T) each


# Xu et al.'s lambda (1 in the paper): how strongly every grid cell must be looked at once per
# caption. Lower leaves the attention on the objects rather than on empty background cells
DOUBLY_STOCHASTIC_WEIGHT = 0.2


class AttentionState(NamedTuple):
    """The attention decoder's state between words; every tensor has the batch in dimension 1."""
    h: torch.Tensor  # (layers, B, H): each LSTM layer's output
    c: torch.Tensor  # (layers, B, H): and its cell
    cells: torch.Tensor  # (L, B, E): the image's grid cells, the same at every word
    keys: torch.Tensor  # (L, B, H): their projections, which each word's query is added to
    alpha: torch.Tensor  # (1, B, L): the last word's attention over the cells


class AttentionDecoder(nn.Module):
    """Show, Attend and Tell's soft attention over the grid cells (Xu et al., 2015)."""

    def __init__(self, embed_size, hidden_size, vocab_size, num_layers=2, dropout=0.3):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.init_state = nn.Linear(embed_size, 2 * num_layers * hidden_size)
        self.key = nn.Linear(embed_size, hidden_size)
        self.query = nn.Linear(hidden_size, hidden_size)
        self.score = nn.Linear(hidden_size, 1)
        self.gate = nn.Linear(hidden_size, 1)
        # LSTM cells rather than nn.LSTM: faster one step at a time on a CPU
        self.lstm_cells = nn.ModuleList(
            nn.LSTMCell(2 * embed_size if i == 0 else hidden_size, hidden_size)
            for i in range(num_layers))
        self.to_vocab = nn.Linear(hidden_size, vocab_size)
        self.drop = nn.Dropout(dropout)

    def start(self, cells):
        """The state before the first word, from the image's grid cells (B, L, E)."""
        pooled = cells.mean(1)  # (B, E)
        init = torch.tanh(self.init_state(pooled))  # (B, 2*layers*H)
        init = init.view(len(cells), 2 * len(self.lstm_cells), -1)  # (B, 2*layers, H)
        h, c = init.transpose(0, 1).chunk(2)  # (layers, B, H) each
        cells = cells.transpose(0, 1)  # (L, B, E)
        keys = self.key(cells)  # (L, B, H)
        alpha = cells.new_zeros(1, cells.size(1), cells.size(0))  # (1, B, L): no word yet
        return AttentionState(h.contiguous(), c.contiguous(), cells, keys, alpha)

    def advance(self, words, state):
        """The top LSTM layer's output (B, H), after attending, for the embedded words (B, E)."""
        query = self.query(state.h[-1])  # (B, H): from the top layer's last output
        energy = torch.tanh(state.keys + query)  # (L, B, H)
        scores = self.score(energy).squeeze(-1)  # (L, B)
        alpha = scores.softmax(0)  # (L, B): over the cells
        gate = torch.sigmoid(self.gate(state.h[-1]))  # (B, 1): how much of the image the word needs
        weighted = alpha.unsqueeze(-1) * state.cells  # (L, B, E)
        context = gate * weighted.sum(0)  # (B, E)
        x = torch.cat([words, context], -1)  # (B, 2E)
        layers = []
        for cell, h, c in zip(self.lstm_cells, state.h, state.c):
            layers.append(cell(x, (h, c)))  # this layer's (h, c), (B, H) each
            # between layers, as nn.LSTM's dropout; the top layer's x is not used, but its dropout
            # draws random numbers, and dropping it would change every later draw
            x = self.drop(layers[-1][0])
        h, c = (torch.stack(s) for s in zip(*layers))  # (layers, B, H) each
        return h[-1], AttentionState(h, c, state.cells, state.keys, alpha.t().unsqueeze(0))

    def forward(self, cells, captions, alphas=False):
        """Logits (B, T-1, V) for captions[:, 1:] given cells (B, L, E); with alphas, the maps."""
        state = self.start(cells)
        words = self.drop(self.embed(captions[:, :-1]))  # (B, T-1, E)
        outs, maps = [], []  # each word's (B, H) and (B, L)
        for t in range(words.size(1)):
            out, state = self.advance(words[:, t], state)  # (B, H)
            outs.append(out)
            maps.append(state.alpha[0])  # (B, L)
        logits = self.to_vocab(self.drop(torch.stack(outs, 1)))  # (B, T-1, V)
        return (logits, torch.stack(maps, 1)) if alphas else logits

    def step(self, tokens, state, first=False):
        """As DecoderRNN.step."""
        out, state = self.advance(self.embed(tokens), state)  # (B, H)
        return next_word_logp(self.to_vocab(out), first), state

    @staticmethod
    def reorder(state, rows):
        """As DecoderRNN.reorder."""
        return AttentionState(*(s[:, rows] for s in state))


DECODERS = {"lstm": DecoderRNN, "attention": AttentionDecoder}


# the model's shape: every mode takes it from a checkpoint, as nanoGPT forces its model_args, since
# its weights fit no other; a command line that contradicts one of these is refused
MODEL_ARGS = ("decoder", "embed_size", "hidden_size", "num_layers", "dropout", "image_size")
class Rules(NamedTuple):
    """What decoding never emits beyond next_word_logp's bans, and how ended beams rank."""
    never: tuple = ()  # ids never generated: <UNK> with suppress_unk
    length_penalty: float = 0.0  # GNMT's alpha; 0: log-probability per token
    block_trigrams: bool = False
    ends: torch.Tensor = None  # (V,) bool, learned_endings: the tokens training captions end on,
    closing: torch.Tensor = None  # (V,) bool: which alone may follow them: <EOS>, a final "."

    def forbid(self, logp, seqs, tokens):
        """logp (R, V) of the word after seqs (R, t) ending in tokens (R,), -inf where forbidden."""
        logp[:, self.never] = -math.inf
        if self.block_trigrams:  # the pair that ends seqs began a trigram before: its third word
            repeats = (seqs[:, :-2] == seqs[:, -2:-1]) & (seqs[:, 1:-1] == seqs[:, -1:])  # (R, t-2)
            hits = torch.zeros_like(logp).scatter_add(1, seqs[:, 2:], repeats.float())  # (R, V)
            logp = logp.masked_fill(hits > 0, -math.inf)
        if self.ends is not None:  # learned_endings: neither <EOS> nor a final "." after 'the'
            logp = logp.masked_fill(~self.ends[tokens].unsqueeze(1) & self.closing, -math.inf)
        return logp


class Captioner(nn.Module):
    """The trained model: the encoder's projection, the decoder, the vocabulary and the sizes."""

    def __init__(self, vocab, args):
        super().__init__()
        self.vocab = vocab
        self.args = args  # a dict of MODEL_ARGS, which rebuild the model, as nanoGPT's model_args
        self.attention = args["decoder"] == "attention"
        self.label_smoothing = 0.0  # the training loss's; start_run sets the run's
        self.encoder = EncoderCNN(args["embed_size"])
        decoder = DECODERS[args["decoder"]]
        self.decoder = decoder(args["embed_size"], args["hidden_size"], len(vocab),
                               args["num_layers"], args["dropout"])

    def forward(self, inputs, captions=None, **sampling):
        """DistributedDataParallel's way in, which a step must take for DDP to average its
        gradients: loss(inputs, captions), or without captions, sample(inputs, **sampling)."""
        if captions is None:
            return self.sample(inputs, **sampling)
        return self.loss(inputs, captions)

    def loss(self, inputs, captions):
        """Cross-entropy (with attention's penalty in training), logits (B, T-1, V) and targets."""
        embeds = self.encoder(inputs)  # (B, E), or (B, L, E) for the attention decoder
        targets = captions[:, 1:]  # (B, T-1): each word after the ones before it
        penalty = 0.0
        if self.attention and self.training:
            logits, alphas = self.decoder(embeds, captions, alphas=True)  # alphas (B, T-1, L)
            words = (targets != Vocabulary.PAD).unsqueeze(-1)  # (B, T-1, 1)
            looked = (alphas * words).sum(1)  # (B, L): each cell's attention over the caption
            penalty = DOUBLY_STOCHASTIC_WEIGHT * ((1 - looked) ** 2).mean()  # each cell once
        else:
            logits = self.decoder(embeds, captions)  # (B, T-1, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1),  # (B*(T-1), V)
                               ignore_index=Vocabulary.PAD,  # validation's loss: plain
                               label_smoothing=self.label_smoothing if self.training else 0.0)
        return loss + penalty, logits, targets

    def sample(self, inputs, **sampling):
        """Captions drawn word by word (greedy: the likeliest), as sample_captions says."""
        return sample_captions(self.decoder, self.encoder(inputs), **sampling)

    @torch.no_grad()
    def generate(self, inputs, beam_size=3, max_len=20, n_best=False, rules=Rules()):
        """Captions (strings) of cached features; beam_size=1 is greedy decoding. n_best: each
        image's beam_search hypotheses, best first: (caption, log-probability, that per token)."""
        found = beam_search(self.decoder, self.encoder(inputs), beam_size, max_len, n_best, rules)
        if n_best:
            return [[(self.vocab.decode(ids), *scores) for ids, *scores in hypotheses]
                    for hypotheses in found]
        return [self.vocab.decode(ids) for ids in found]


# --------------------------------------------------------------------------------------------------
# training: the cross-entropy step, the self-critical (SCST) step and its CIDEr-D reward, the
# learning-rate schedule, and the whole run: set-up, the loop over steps, the epoch's end, the test

# The reward: coco-caption's CIDEr-D (Vedantam et al., 2015) of a caption c of an image whose
# references are s_1..s_m, among N training images, as pycocoevalcap's Cider computes it:
#
#   g_n(x)[w] = count of n-gram w in x * (log N - log max(1, df(w)))   x's tf-idf vector, n-grams
#               df(w) = how many images have w in at least one reference
#   CIDEr-D_n = 1/m sum_j  sum_w min(g_n(c)[w], g_n(s_j)[w]) * g_n(s_j)[w] / (|g_n(c)| |g_n(s_j)|)
#                          * exp(-(l(c) - l(s_j))^2 / (2 * 6^2))    clipped cosine, length penalty
#   CIDEr-D   = 10 * 1/4 sum_{n=1..4} CIDEr-D_n                 l(x) = x's number of bigrams
#
# Vectorised, each n-gram is one integer code whose digits in base V are its word ids:
#
#   ids (V = 10)  3  5  7  0      code = w1*V^(n-1) + ... + wn, in [V^(n-1), V^n) as ids are >= 1,
#   n = 1         3  5  7  0      so n - 1 = the number of k in 1..3 with code >= V^k;
#   n = 2        35 57  0  0      0 where the n-gram runs into padding.
#   n = 3       357  0  0  0      A row of T ids gives 4T codes (ngram_codes), and distinct()
#   n = 4         0  0  0  0      makes them (row, code, count) triples: sparse count vectors.

def ngram_codes(ids, base):
    """Each n-gram (n = 1..4) of 0-padded word ids (M, T) as one integer (as above): (M, 4T)."""
    codes = []
    code = torch.zeros_like(ids)  # (M, T): the n-gram that starts at each column
    whole = torch.ones_like(ids, dtype=torch.bool)  # (M, T): no padding in it
    for n in range(4):
        word = F.pad(ids, (0, n))[:, n:]  # (M, T): the n-gram's last word
        code = code * base + word  # (M, T): one more digit
        whole = whole & (word > 0)
        codes.append(torch.where(whole, code, 0))
    return torch.cat(codes, 1)  # (M, 4T)


def pad_references(refs):
    """Each image's references (lists of word ids) in one tensor (N, R, T), 0-padded."""
    flat = [torch.tensor(r, dtype=torch.int32) for rs in refs for r in rs]
    flat = pad_sequence(flat, batch_first=True)  # (all references, T)
    return pad_sequence(flat.split([len(rs) for rs in refs]), batch_first=True)  # (N, R, T)


def distinct(codes):
    """Each row's distinct nonzero codes (M, W) and their counts: (row, code, count), (P,) each."""
    # by hand: torch's unique_consecutive(dim=0) of (row, code) pairs gives the same, 7-25x slower
    codes = codes.sort(1).values  # (M, W)
    starts = torch.ones_like(codes, dtype=torch.bool)  # (M, W): where a run of equal codes starts,
    starts[:, 1:] = codes[:, 1:] != codes[:, :-1]  # in every row at column 0
    at = starts.flatten().nonzero().squeeze(1)  # (runs,): flat index of each run's start
    counts = torch.diff(at, append=torch.tensor([codes.numel()]))  # (runs,): to the next start
    rows = at // codes.size(1)  # (runs,): flat index = row * W + column
    values = codes.flatten()[at]  # (runs,)
    real = values > 0  # 0 is no n-gram
    return rows[real], values[real], counts[real].double()


class CiderD:
    """coco-caption's CIDEr-D of word ids, vectorised; the references' document frequencies once."""

    def __init__(self, refs, vocab_size, scored=None):
        if vocab_size ** 4 >= 2 ** 63:  # an n-gram's code must fit in 64 bits
            raise UserError(f"the reward handles up to 55,108 words, and the vocabulary has "
                            f"{vocab_size}: raise --freq_threshold")
        self.base = vocab_size
        self.scored = scored  # which word ids count (all if None)
        padded = pad_references(refs)  # (N, R, T)
        n, r, t = padded.shape
        self.refs = self.words(padded.flatten(0, 1).long()).view(n, r, t).int()  # (N, R, T)
        self.log_images = math.log(n)
        # 4,096 images at a time, as (images*R, T): the codes take 32 bytes a word
        chunks = [self.refs[i:i + 4096].flatten(0, 1).long() for i in range(0, n, 4096)]
        per_image = [distinct(ngram_codes(c, self.base).view(-1, r * 4 * c.size(1)))[1]
                     for c in chunks]  # each image's n-grams, once
        self.grams, self.df = torch.cat(per_image).unique(return_counts=True)  # (G,) sorted; df(w)
        norms = [self.norms(*distinct(ngram_codes(c, self.base)), len(c)) for c in chunks]
        self.ref_norm = torch.cat([norm for norm, _ in norms]).view(n, r, 4)  # (N, R, 4)
        self.ref_length = torch.cat([length for _, length in norms]).view(n, r)  # (N, R)

    def words(self, ids):
        """The scored words of each row of ids (H, T), moved to the front, 0 after them."""
        keep = ids > 0 if self.scored is None else self.scored[ids] & (ids > 0)  # (H, T)
        order = (~keep).to(torch.uint8).sort(dim=-1, stable=True).indices  # (H, T): kept ones first
        return torch.where(keep, ids, 0).gather(-1, order)

    def tfidf(self, grams, counts):
        """g_n(x)[w] of n-grams grams (P,) that occur counts (P,) times in x."""
        place = torch.searchsorted(self.grams, grams).clamp_max(len(self.grams) - 1)  # (P,)
        df = torch.where(self.grams[place] == grams, self.df[place], 0)  # (P,): 0 in no reference
        return counts * (self.log_images - df.clamp_min(1).double().log())

    def sizes(self, grams):
        """n - 1 of each n-gram's code (P,): its length less one (picture above)."""
        return sum(grams >= self.base ** k for k in (1, 2, 3))

    def norms(self, rows, grams, counts, m):
        """Each row's |g_n| (m, 4), and coco-caption's length l (m,), from (row, n-gram, count)s."""
        size = self.sizes(grams)  # (P,)
        squares = self.tfidf(grams, counts).square()  # (P,)
        norm = torch.zeros(m, 4, dtype=torch.float64).index_put_(  # (m, 4): summed by row and n
            (rows, size), squares, accumulate=True)
        length = torch.zeros(m, dtype=torch.float64).index_put_(  # (m,): bigrams, summed by row
            (rows[size == 1],), counts[size == 1], True)
        return norm.sqrt(), length

    def reference_counts(self, refs, rows, grams):
        """The count (P, R) of each caption's n-gram (P,) in each of its references (H, R, T)."""
        used, column = grams.unique(return_inverse=True)  # (U,) the captions' n-grams; (P,) which
        codes = ngram_codes(refs.flatten(0, 1).long(), self.base)  # (H*R, 4T)
        ref_rows, ref_grams, ref_counts = distinct(codes)  # (Q,) each: by reference row, sorted
        place = torch.searchsorted(used, ref_grams).clamp_max(len(used) - 1)  # (Q,)
        hit = used[place] == ref_grams  # (Q,): the n-grams that some caption has
        # a lookup table of sorted keys: reference row i*R + j and n-gram u make the key
        # (i*R + j)*U + u, ascending as distinct() gives rows in order and each row's codes sorted;
        # the last key is larger than any query, so that searchsorted never runs off the end
        keys = torch.cat([ref_rows[hit] * len(used) + place[hit], torch.tensor([2 ** 63 - 1])])
        found = torch.cat([ref_counts[hit], torch.zeros(1, dtype=torch.float64)])  # (keys,)
        reference = rows.unsqueeze(1) * refs.size(1) + torch.arange(refs.size(1))  # (P, R): i*R + j
        query = reference * len(used) + column.unsqueeze(1)  # (P, R)
        at = torch.searchsorted(keys, query)  # (P, R)
        return torch.where(keys[at] == query, found[at], 0)  # (P, R): 0 where the key is absent

    def __call__(self, hyps, images):
        """CIDEr-D (x10, as coco-caption's) of captions (H, T) against their images' references."""
        h = len(hyps)
        codes = ngram_codes(self.words(hyps), self.base)  # (H, 4T)
        rows, grams, counts = distinct(codes)  # (P,) each: P (caption, n-gram) pairs
        if not len(grams):
            return torch.zeros(h, dtype=torch.float64)
        vec = self.tfidf(grams, counts)  # (P,): g_n(c)[w]
        norm, length = self.norms(rows, grams, counts, h)  # (H, 4), (H,)
        refs = self.refs[images]  # (H, R, T)
        ref_counts = self.reference_counts(refs, rows, grams)  # (P, R)
        ref_vec = ref_counts * (vec / counts).unsqueeze(1)  # (P, R): g_n(s_j)[w], its count * idf
        products = torch.minimum(vec.unsqueeze(1), ref_vec) * ref_vec  # (P, R): clipped
        overlap = torch.zeros(h, 4, refs.size(1), dtype=torch.float64).index_put_(  # (H, 4, R)
            (rows, self.sizes(grams)), products, accumulate=True)  # summed over each n's n-grams
        norms = norm.unsqueeze(1) * self.ref_norm[images]  # (H, R, 4)
        cosine = overlap.transpose(1, 2) / norms.clamp_min(1e-300)  # (H, R, 4): 0 if a norm is 0
        delta = length.unsqueeze(1) - self.ref_length[images]  # (H, R)
        penalty = torch.exp(-delta.square() / (2 * 6.0 ** 2))  # (H, R): sigma = 6
        score = cosine.mean(-1) * penalty  # (H, R)
        real = refs.amax(-1) > 0  # (H, R): references, not padding
        return 10 * (score * real).sum(1) / real.sum(1)  # (H,): the mean over the references, x10


def scst_data(data, vocab, max_len=0):
    """An item per training image, and the CIDEr-D reward: its captions and <EOS> the references."""
    refs = data.split("train").groupby("image")["tokens"].apply(list)  # sorted by image
    images = pd.DataFrame({"image": refs.index, "tokens": [r[0] for r in refs]})
    ids = [[vocab.numericalize(t[:max_len or None]) + [Vocabulary.EOS] for t in r] for r in refs]
    # the words the metrics score (metric_text drops punctuation), and <EOS>: it rewards ending
    scored = torch.tensor([is_word(w) for w in vocab.itos])
    scored[[Vocabulary.PAD, Vocabulary.SOS]] = False
    return FlickrDataset(images, vocab, data.source), CiderD(ids, len(vocab), scored)


def scst_step(run, inputs, images, lr):
    """A step on sampled captions' CIDEr-D above a baseline: loss, mean reward, greedy CIDEr-D."""
    n = run.cfg.scst_samples
    max_len = run.cfg.max_caption_len
    never = [Vocabulary.UNK] if run.cfg.suppress_unk else []
    with autocast(run.device):
        words, logps = run.ddp(inputs, samples=n, max_len=max_len, never=never)  # (B*n, T) each
    with torch.no_grad(), evaluating(run.model):
        greedy, _ = run.model.sample(inputs, max_len=max_len, greedy=True, never=never)  # (B, T)
    images = torch.as_tensor(images)  # (B,)
    rewards = run.reward(words.cpu(), images.repeat_interleave(n)).view(-1, n)  # (B, n)
    greedy_reward = run.reward(greedy.cpu(), images)  # (B,)
    baseline = greedy_reward.unsqueeze(1)  # (B, 1): Rennie et al.'s
    if run.cfg.scst_baseline == "mean":  # Luo's: the mean of the image's other samples' rewards,
        # b_i = (sum_j r_j - r_i) / (n - 1), so that reward_i - b_i has expectation 0 for every i
        baseline = (rewards.sum(1, keepdim=True) - rewards) / (n - 1)  # (B, n)
    advantage = (rewards - baseline).view(-1, 1).to(run.device, torch.float)  # (B*n, 1)
    mask = words != Vocabulary.PAD  # (B*n, T): up to and with <EOS>, so that it learns where to end
    loss = -(advantage * logps * mask).sum() / mask.sum()  # REINFORCE: -advantage * log p(word)
    optimizer_step(run.optimizer, loss, lr)
    # recorded x100, as every metric the outputs store and show; float32: not all have float64
    figures = 100 * torch.stack([rewards.mean(), greedy_reward.mean()]).float()  # (2,)
    return loss.detach().float(), *figures.to(run.device)


class StepFigures(NamedTuple):
    """A training step's row of loss_per_batch.csv; tensors on the device until read back."""
    epoch: int  # 1-based, as the CSVs count
    step: int
    phase: str  # 'cross-entropy' or 'self-critical'
    lr: float
    loss: float
    reward: float = None  # self-critical: its sampled captions' mean CIDEr-D x100
    greedy_cider: float = None  # and its greedy captions', Rennie et al.'s baseline


@dataclasses.dataclass
class Progress:
    """How far a run has come: what a checkpoint records besides the weights."""
    epoch: int = 0  # epochs trained and validated
    step: int = 0  # optimizer steps taken
    best_score: float = float("-inf")  # of best_metric, higher is better
    best_step: int = 0  # the step best.pt was saved at
    best_epoch: int = 0
    best_metric: str = ""  # what picked it: best_metric, or CIDEr among SCST's epochs (is_best)
    loss_sum: float = 0.0  # over the recorded steps of the epoch under way
    loss_count: int = 0
    reward_sum: float = 0.0  # self-critical steps: their sampled and greedy captions' CIDEr-D
    greedy_sum: float = 0.0
    history: list = dataclasses.field(default_factory=list)  # each epoch's loss_per_epoch.csv row


def epoch_and_batch(step, steps_per_epoch, scst_steps, cfg):
    """The 0-based epoch and batch of a step: num_epochs of cross-entropy, then SCST epochs."""
    cross_entropy_steps = cfg.num_epochs * steps_per_epoch
    if step < cross_entropy_steps or not scst_steps:
        return divmod(step, steps_per_epoch)
    epoch, batch = divmod(step - cross_entropy_steps, scst_steps)
    return cfg.num_epochs + epoch, batch


def learning_rate_at(step, total_steps, cfg):
    """The learning rate of a step (1-based): a function of the step alone, as resuming needs."""
    if step > total_steps and cfg.scst_epochs:  # the self-critical steps, after cross-entropy's
        return cfg.scst_learning_rate
    if step <= cfg.warmup_steps:
        return cfg.learning_rate * step / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)  # 1 at last
        return cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.learning_rate


@dataclasses.dataclass
class Run:
    """What the training loop and its helpers share, made once by start_run."""
    cfg: Config
    device: torch.device
    data: Data
    model: Captioner
    optimizer: torch.optim.Optimizer
    progress: Progress
    ddp: nn.Module = None  # the model, or its DistributedDataParallel wrapper under torchrun
    train_set: FlickrDataset = None  # a caption an item
    val_set: FlickrDataset = None
    scst_set: FlickrDataset = None  # an image an item
    reward: CiderD = None  # SCST's reward
    pending: list = dataclasses.field(default_factory=list)  # StepFigures not read back yet
    bar: object = None  # the epoch's progress bar


def start_run(cfg, device, restored):
    """A fresh run's data, model, Adam, progress and datasets, or last.pt's (--resume): a Run."""
    model, ckpt = restored or (None, None)
    # refuses data, vocabulary or ResNet50 weights the checkpoint does not fit: before any image
    data = prepare_data(cfg, device, build_vocab=True, trained=ckpt)
    features = data.source.features
    if device.type == "cuda" and features.nbytes < torch.cuda.mem_get_info(device)[0] // 2:
        data.source.features = features.to(device)  # batches are then gathered on the GPU
    torch.manual_seed(cfg.seed)  # after the data: the initial weights never depend on the cache
    progress = Progress()
    if cfg.resume:
        progress = Progress(**{f.name: ckpt[f.name] for f in dataclasses.fields(Progress)})
    else:
        fresh = Captioner(data.vocab, {name: getattr(cfg, name) for name in MODEL_ARGS})
        fresh.encoder.feature_mean.copy_(data.feature_stats[0])
        fresh.encoder.feature_std.copy_(data.feature_stats[1])
        if cfg.init_from:  # its weights go on here, with the feature statistics they fit
            fresh.load_state_dict(model.state_dict())
            log(f"starting from the weights of {cfg.init_from} (epoch {ckpt['epoch']}), with a "
                f"fresh optimizer")
        model = fresh
    model.label_smoothing = cfg.label_smoothing  # in training only: validation's stays plain
    fused = True if device.type == "cuda" else None  # one kernel for all the parameters on a GPU
    optimizer = torch.optim.Adam(model.to(device).parameters(), lr=cfg.learning_rate, fused=fused)
    if cfg.resume:
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng_state"])  # mid-epoch: dropout goes on as it would have
        if torch.cuda.is_available() and ckpt["cuda_rng_state"]:
            torch.cuda.set_rng_state_all(ckpt["cuda_rng_state"][:torch.cuda.device_count()])
        log(f"resuming from {ckpt['path']}: epoch {progress.epoch} done, step {progress.step}")
        if progress.epoch >= cfg.num_epochs + cfg.scst_epochs:
            log(f"nothing is left to train: its {progress.epoch} epochs are all done (raise "
                f"--num_epochs or --scst_epochs to train on); best.pt's test report follows")
    run = Run(cfg, device, data, model, optimizer, progress)
    # with torchrun, DDP averages the gradients of the processes; else the model as it is
    run.ddp = model
    if rank_and_size()[1] > 1:
        run.ddp = DistributedDataParallel(model, [device] if device.type == "cuda" else None)
    run.train_set = FlickrDataset(data.split("train"), model.vocab, data.source,
                                  cfg.max_train_caption_len)
    run.val_set = FlickrDataset(data.split("val"), model.vocab, data.source)
    if cfg.scst_epochs:
        run.scst_set, run.reward = scst_data(data, model.vocab, cfg.max_train_caption_len)
    return run


def train(cfg, device, restored=None):
    """The whole run: set-up, the loop over steps with each epoch's end, then the test report."""
    out, size = Path(cfg.output_dir), rank_and_size()[1]
    lock = claim_output_dir(out) if is_main_process() else None
    # ---- set-up
    run = start_run(cfg, device, restored)
    prepare_outputs(run, out)  # the logs as last.pt left them; vocab.json and config.json
    steps_per_epoch = len(process_batches(len(run.train_set), cfg, 1))
    scst_steps = len(process_batches(len(run.scst_set), cfg, 1)) if cfg.scst_epochs else 0
    total_steps = cfg.num_epochs * steps_per_epoch  # of cross-entropy: the schedule's length
    all_epochs = cfg.num_epochs + cfg.scst_epochs
    progress = run.progress
    batches = None
    epoch_start = time.time()
    run.bar = tqdm(disable=True)
    run.model.train()
    # ---- the loop over steps: each step's epoch and batch follow from the step alone
    stop = CtrlC()
    with signals_to(stop.request):  # Ctrl-C, SIGTERM and SIGHUP ask the loop to save and stop
        try:
            while True:
                epoch, batch = epoch_and_batch(progress.step, steps_per_epoch, scst_steps, cfg)
                scst = epoch >= cfg.num_epochs
                epoch_steps = scst_steps if scst else steps_per_epoch
                # every process stops at the same step; asking is a collective, so not every step
                asking = size == 1 or batch % cfg.log_every == 0  # batch 0 too
                if asking and any_process(stop.requested, device):
                    break
                # ---- the epoch's end: validation, last.pt, best.pt, the CSV row and the graphs
                if batch == 0 and epoch > progress.epoch:  # the previous epoch's training is done
                    run.bar.close()
                    end_epoch(run, time.time() - epoch_start)
                if epoch >= all_epochs:  # num_epochs may be lowered on resume
                    break
                if scst and epoch == cfg.num_epochs and batch == 0:  # SCST's first step
                    keep_cross_entropy_results(run)
                # a new epoch, or the first batch of a resumed one
                if batch == 0 or batches is None:
                    batches = open_epoch(run, epoch, batch, epoch_steps, all_epochs)
                    epoch_start = time.time()
                indices, (inputs, captions) = next(batches)
                progress.step += 1
                lr = learning_rate_at(progress.step, total_steps, cfg)
                if scst:
                    figures = scst_step(run, inputs, indices, lr)
                else:
                    figures = [train_step(run, inputs, captions, lr)]
                phase = "self-critical" if scst else "cross-entropy"
                run.pending.append(StepFigures(epoch + 1, progress.step, phase, lr, *figures))
                run.bar.update()
                if len(run.pending) >= cfg.log_every or batch + 1 == epoch_steps:
                    record_losses(run)
                if cfg.sample_every and progress.step % cfg.sample_every == 0:
                    print_samples(run, f"step {progress.step}")
        finally:
            run.bar.close()  # before any error's one line, which must start a line of its own
        if any_process(stop.requested, device):  # also during the last validation: no test report
            record_losses(run)  # then last.pt at the last step taken: --resume goes on from there
            save_checkpoint(out / "last.pt", run.model, run.optimizer, cfg, run.data, progress)
            return resume_hint(out, progress.step, size)
    # ---- the test report, of best.pt
    wait_for_all()  # for best.pt
    test_report(restore(out / "best.pt"), run.data, cfg, device)
    if device.type == "cuda":
        log(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB")
    xe = ", with the cross-entropy run's: best-xe.pt, report-xe.html, test_*-xe.*"  # SCST kept
    xe = xe if cfg.scst_epochs else ""
    log(f"outputs in {out}: report.html (open it in a browser), loss_per_batch.csv, "
        f"loss_per_epoch.csv, loss_graph.png, metrics_graph.png, test_metrics.json, "
        f"test_captions.csv, test_captions.json, test_references.json, best.pt, last.pt, "
        f"vocab.json, config.json{xe}")
    del lock
    return 0


def open_epoch(run, epoch, batch, epoch_steps, all_epochs):
    """The epoch's batches from batch on, each with its dataset indices; its progress bar."""
    cfg = run.cfg
    rank, size = rank_and_size()
    scst = epoch >= cfg.num_epochs
    if batch == 0:  # epochs are reproducible one by one; each process has its own dropout
        torch.manual_seed((cfg.seed * 1000 + epoch + 1) * size + rank)
    dataset = run.scst_set if scst else run.train_set
    shares = process_batches(len(dataset), cfg, epoch + 1)[batch:]
    phase = " (self-critical)" if scst else ""
    run.bar = tqdm(total=epoch_steps, initial=batch, unit="batch", leave=False,
                   desc=f"epoch {epoch + 1}/{all_epochs}{phase}")
    return ((indices, dataset.batch(indices, run.device)) for indices in shares)


def train_step(run, inputs, captions, lr):
    """One optimizer step; the loss stays on the device, as reading it would wait for the GPU."""
    with autocast(run.device):
        loss, _, _ = run.ddp(inputs, captions)
    optimizer_step(run.optimizer, loss, lr)
    return loss.detach()


def optimizer_step(optimizer, loss, lr):
    """One Adam step on the loss's gradient at the step's learning rate (cross-entropy and SCST)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def record_losses(run):
    """Reads back the pending steps' figures, checks them, appends them to loss_per_batch.csv."""
    if not run.pending:
        return
    # one wait for the GPU; each figure averaged over the processes
    measured = [torch.stack([f for f in row[4:] if f is not None]) for row in run.pending]
    stats = torch.stack(measured) / rank_and_size()[1]  # (steps, 1), or (steps, 3) with SCST's
    totals = sum_over_processes(stats.flatten().tolist(), run.device)
    stats = torch.tensor(totals).view(len(run.pending), -1)  # (steps, 1 or 3)
    rows = [StepFigures(*row[:4], *figures) for row, figures in zip(run.pending, stats.tolist())]
    run.pending.clear()
    scst = rows[0].phase == "self-critical"  # an epoch's last step reads back: never both
    check_losses(rows, scst, run)
    if is_main_process():
        columns = StepFigures._fields if scst else StepFigures._fields[:5]  # SCST's add two
        append_csv(Path(run.cfg.output_dir) / "loss_per_batch.csv",
                   [row[:len(columns)] for row in rows], columns)
    progress = run.progress
    # one at a time, in float64: a resume that groups steps otherwise sums the same
    for row in rows:
        progress.loss_sum += row.loss
        progress.loss_count += 1
        if scst:
            progress.reward_sum += row.reward
            progress.greedy_sum += row.greedy_cider
    average = (progress.reward_sum if scst else progress.loss_sum) / progress.loss_count
    last = rows[-1]
    run.bar.set_postfix({"loss": f"{last.loss:.3f}", "avg": f"{average:.3f}"})
    if run.bar.disable:  # a log file, not a terminal: a plain line instead
        log(f"step {last.step} (epoch {last.epoch}, {last.phase}): loss {last.loss:.4f}, avg "
            f"{average:.4f}, lr {last.lr:.3g}")


def check_losses(rows, scst, run):
    """Stops a run whose loss diverged, before any checkpoint saves the diverged weights."""
    # a fresh model's loss is about log(vocab_size): ten times that is no learning
    limit = math.inf if scst else 10 * math.log(len(run.model.vocab))
    for row in rows:
        if not math.isfinite(row.loss) or row.loss > limit:
            rate = "scst_learning_rate" if scst else "learning_rate"
            raise UserError(f"the training loss diverged at epoch {row.epoch}, step {row.step} "
                            f"(loss {row.loss:.4g}): lower --{rate} (now "
                            f"{getattr(run.cfg, rate)}). No checkpoint was written after that step")


def end_epoch(run, train_seconds):
    """Validation, then last.pt, best.pt when it is the best yet, the epoch's row and graphs."""
    cfg, progress = run.cfg, run.progress
    start = time.time()
    val_loss, token_accuracy = validation_loss(run.model, run.val_set, cfg, run.device)
    metrics, captions = evaluate_split(run.model, run.data, "val", cfg, run.device)
    metrics |= demo_scores(run.model, run.data, "val", cfg, run.device)
    progress.epoch += 1
    row = {"epoch": progress.epoch, **epoch_training_figures(run)}
    row |= {"val_loss": val_loss, "val_token_accuracy": 100 * token_accuracy, **metrics}
    row |= {"epoch_seconds": round(train_seconds, 2), "eval_seconds": round(time.time() - start, 2)}
    if is_main_process():
        best = is_best(progress, row, cfg)
        progress.history.append(row)
        out = Path(cfg.output_dir)
        # last.pt first, with the epoch's row: a kill after it is mended from it on --resume
        save_checkpoint(out / "last.pt", run.model, run.optimizer, cfg, run.data, progress)
        if best:
            save_checkpoint(out / "best.pt", run.model, run.optimizer, cfg, run.data, progress)
        write_history(out, progress)
        log_epoch(row, best, cfg)
    print_samples(run, f"end of epoch {progress.epoch}", captions)


def epoch_training_figures(run):
    """The epoch's phase and mean training loss (SCST: its rewards); the sums start again."""
    progress = run.progress
    count = max(progress.loss_count, 1)
    figures = {"phase": "cross-entropy", "train_loss": progress.loss_sum / count}
    if progress.epoch > run.cfg.num_epochs:  # SCST's loss is no cross-entropy: its rewards tell
        figures["phase"] = "self-critical"
        figures["reward"] = progress.reward_sum / count
        figures["greedy_cider"] = progress.greedy_sum / count
        if progress.reward_sum == 0:
            warn("every sampled caption's reward was 0 this epoch, so SCST learned nothing: its "
                 "captions match no reference n-gram (one training image, or identical captions?)")
    progress.loss_sum = progress.reward_sum = progress.greedy_sum = 0.0
    progress.loss_count = 0
    return figures


def is_best(progress, row, cfg):
    """Whether the epoch's row is the best yet by best_metric (higher is better), recorded: the one
    rule of best.pt and the graphs' mark. SCST, which raises the cross-entropy, compares its epochs
    by the CIDEr it raises where best_metric is val_loss or demo_accuracy."""
    metric = cfg.best_metric
    if progress.epoch > cfg.num_epochs and metric in ("val_loss", "demo_accuracy"):
        metric = "CIDEr"
    if metric != cfg.best_metric and progress.epoch == cfg.num_epochs + 1:
        progress.best_score = float("-inf")
        log(f"self-critical epochs are compared with each other by CIDEr for best.pt, not by "
            f"{cfg.best_metric}, which SCST does not optimise")
    score = -row["val_loss"] if metric == "val_loss" else row[metric]
    # of equals the later: on the demo ties are common, and the later epoch is more trained
    best = score >= progress.best_score
    if best:
        progress.best_score = score
        progress.best_step = progress.step
        progress.best_epoch = progress.epoch
        progress.best_metric = metric
    return best


def keep_cross_entropy_results(run):
    """Before SCST: the cross-entropy best.pt and its test report, kept as best-xe.pt and -xe."""
    out = Path(run.cfg.output_dir)
    if is_main_process():
        write_whole(out, {out / "best-xe.pt": (out / "best.pt").read_bytes()})
    wait_for_all()
    log(f"self-critical training begins: the cross-entropy run's best.pt is kept as "
        f"{out / 'best-xe.pt'}")
    test_report(restore(out / "best-xe.pt"), run.data, run.cfg, run.device, "-xe")


# --------------------------------------------------------------------------------------------------
# validation, beam search and the metrics papers report (coco-caption's BLEU, METEOR, ROUGE-L and
# CIDEr), which pick best.pt and fill the results page

@torch.no_grad()
def validation_loss(model, dataset, cfg, device):
    """Teacher-forced loss and token accuracy: the share of non-padding targets argmax predicts."""
    rank, size = rank_and_size()
    batches = [b.tolist() for b in torch.arange(len(dataset)).split(cfg.batch_size)][rank::size]
    sums = [torch.zeros(3, device=device)]  # a batch's (loss x tokens, tokens right, tokens)
    with evaluating(model):
        for indices in batches:
            inputs, captions = dataset.batch(indices, device)
            loss, logits, targets = model.loss(inputs, captions)
            mask = targets != Vocabulary.PAD  # (B, T-1)
            count = mask.sum().float()
            right = ((logits.argmax(-1) == targets) & mask).sum().float()
            sums.append(torch.stack([loss.float() * count, right, count]))  # (3,)
    # read once at the end: each read waits for the GPU; added up in float64 (not on every device)
    totals = torch.stack(sums).cpu().double().sum(0).tolist()
    total_loss, correct, tokens = sum_over_processes(totals, device)
    return total_loss / max(tokens, 1), correct / max(tokens, 1)


# beam_search keeps k hypotheses (beams) for each of n images in one batch of n*k rows:
#
#   row    0  1  2 | 3  4  5 | ...        row = image*k + beam;  offsets = image*k, (n, 1)
#   image  0  0  0 | 1  1  1 | ...        log-probs (n*k, V) -> view (n, k, V) -> (n, k*V)
#   beam   0  1  2 | 0  1  2 | ...
#
# An image's k*V candidates (a beam and its next word) are one row of (n, k*V), candidate
# index = beam*V + word, so beam = index // V and word = index % V. The k best that do not end
# go on: their rows are offsets + beam, and every state tensor is reordered to those rows.

@torch.no_grad()
def beam_search(decoder, image_embeds, beam_size, max_len, n_best=False, rules=Rules()):
    """Each image's best word ids by log p per word (rules: or GNMT's); beam_size=1 is greedy.
    n_best: each image's hypotheses instead, best first, as (word ids, summed log-probability, its
    mean per token): those that ended (at most beam_size), or if none did, the best going on."""
    # decoder: start(embeds) -> state; step(tokens, state, first) -> (log-probs, state);
    # reorder(state, rows) -> state: any decoder with these three methods works
    n = image_embeds.size(0)
    k = beam_size
    dev = image_embeds.device
    images = torch.arange(n, device=dev)  # (n,)
    offsets = images.unsqueeze(1) * k  # (n, 1): each image's first row
    state = decoder.reorder(decoder.start(image_embeds), images.repeat_interleave(k))  # n*k rows
    tokens = torch.full((n * k,), Vocabulary.SOS, device=dev)  # (n*k,)
    seqs = torch.zeros(n * k, 0, dtype=torch.long, device=dev)  # (n*k, t): each beam's words
    scores = torch.full((n, k), float("-inf"), device=dev)  # (n, k): summed log-probabilities
    scores[:, 0] = 0.0  # all beams start as the same hypothesis: one of them goes on
    ended = [[] for _ in range(n)]  # each image's ended hypotheses: (ids, log-prob, per token)
    finished = torch.zeros(n, dtype=torch.long, device=dev)  # (n,): hypotheses ended so far
    for t in range(max_len):
        logp, state = decoder.step(tokens, state, first=t == 0)  # (n*k, V)
        logp = rules.forbid(logp, seqs, tokens)
        vocab_size = logp.size(-1)
        candidates = scores.unsqueeze(-1) + logp.view(n, k, -1)  # (n, k, V)
        candidates = candidates.view(n, -1)  # (n, k*V): index = beam*V + word
        top, index = candidates.topk(min(2 * k, k * vocab_size), 1)  # (n, 2k): k go on after <EOS>s
        beam = index // vocab_size  # (n, 2k)
        word = index % vocab_size  # (n, 2k)
        place = torch.arange(top.size(1), device=dev).expand_as(top)  # (n, 2k): 0, 1, .. in top
        eos = word == Vocabulary.EOS  # (n, 2k)
        # a hypothesis ends when <EOS> is among the k best, while the image has fewer than k ended
        ends = eos & (place < k) & (finished < k).unsqueeze(1) & (top > float("-inf"))  # (n, 2k)
        images_ended = ends.nonzero()[:, 0].tolist()  # (e,): one wait for the device a step
        if images_ended:
            ended_seqs = seqs[(offsets + beam)[ends]].tolist()  # (e, t): in the same order
            for i, log_p, ids in zip(images_ended, top[ends].tolist(), ended_seqs):
                ended[i].append((ids, log_p, log_p / (t + 1)))  # per token: ranks any length
        finished += ends.sum(1)
        order = place + eos.long() * top.size(1)  # (n, 2k): the <EOS> candidates last
        keep = order.argsort(1)[:, :k]  # (n, k): the k best that go on
        rows = (offsets + beam.gather(1, keep)).view(-1)  # (n*k,): the row each of them extends
        tokens = word.gather(1, keep).view(-1)  # (n*k,)
        scores = top.gather(1, keep)  # (n, k)
        seqs = torch.cat([seqs[rows], tokens.unsqueeze(1)], 1)  # (n*k, t+1)
        state = decoder.reorder(state, rows)
        if (finished >= k).all():
            break
    going_score, going_beam = scores.max(1)  # (n,) each: the best going on, if none ended
    going = seqs[offsets[:, 0] + going_beam].tolist()  # (n, t)
    a = rules.length_penalty  # log p / lp(Y), GNMT's lp(Y) = ((5 + |Y|) / 6)^a; a = 0: per token
    # sorted() keeps the order of equals: of equal scores, the one that ended first
    hypotheses = [sorted(found, key=lambda h: -h[1] / ((6 + len(h[0])) / 6) ** a if a else -h[2])
                  [:k] or [(ids, score, score / max_len)]
                  for found, score, ids in zip(ended, going_score.tolist(), going)]
    return hypotheses if n_best else [image[0][0] for image in hypotheses]


def generate_captions(model, source, names, cfg, device, n_best=False):
    """{name: caption (n_best: generate's hypotheses)}, in order; torchrun's processes share."""
    rank, size = rank_and_size()
    share = names[rank::size]
    captions = {}
    rules = decoding_rules(model.vocab, cfg, device)
    with evaluating(model):
        for start in tqdm(range(0, len(share), 64), desc="captioning", unit="batch", leave=False):
            chunk = share[start:start + 64]
            rows = [source.row[name] for name in chunk]
            features = source.features[rows].to(device)  # (B, 2048) or (B, L, 2048)
            texts = model.generate(features, cfg.beam_size, cfg.max_caption_len, n_best, rules)
            captions.update(zip(chunk, texts))
    captions = merge_over_processes(captions)
    return {name: captions[name] for name in names}


@contextlib.contextmanager
def evaluating(model):
    """The model in eval mode (no dropout) inside; after, in the mode it was."""
    was_training = model.training
    try:
        yield model.eval()
    finally:
        model.train(was_training)


def metric_text(caption):
    # coco-caption's PTB tokenizer drops punctuation before scoring; so do we, with the vocabulary's
    words = [t for t in Vocabulary.tokenize(caption) if is_word(t)]
    return " ".join(words)


def caption_metrics(references, hypotheses):
    """coco-caption's BLEU-1..4, METEOR (None without Java), ROUGE-L, CIDEr, and each image's CIDEr
    and BLEU-4: x100, as papers give them and as every output stores and shows them."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    refs = {i: [metric_text(c) for c in references[i]] for i in hypotheses}
    hyps = {i: [metric_text(hypotheses[i])] for i in hypotheses}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their progress
        bleu, bleu_each = Bleu(4).compute_score(refs, hyps)
        metrics = {f"BLEU-{n + 1}": 100 * float(b) for n, b in enumerate(bleu)}
        metrics["METEOR"] = meteor_score(refs, hyps)
        metrics["ROUGE-L"] = 100 * float(Rouge().compute_score(refs, hyps)[0])
        cider, cider_each = 0.0, np.zeros(len(hyps))  # Cider fails where no reference has a word
        if any(any(captions) for captions in refs.values()):
            cider, cider_each = Cider().compute_score(refs, hyps)
    metrics["CIDEr"] = 100 * float(cider)
    each = zip(hyps, cider_each, bleu_each[3])  # in the order of hyps
    each = {name: {"CIDEr": 100 * float(c), "BLEU-4": 100 * float(b)} for name, c, b in each}
    return metrics, each


def references_of(frame):
    return frame.groupby("image")["caption"].apply(list).to_dict()


def evaluate_split(model, data, split, cfg, device):
    """The metrics (in process 0; {} in the others) and captions of the model on a split."""
    captions = generate_captions(model, data.source, data.images(split), cfg, device)
    if not is_main_process():
        return {}, captions
    return caption_metrics(references_of(data.split(split)), captions)[0], captions


def print_samples(run, label, captions=None):
    """Three validation images' captions, to watch the model learn: generated unless given."""
    names = run.data.images("val")[:3]
    if captions is None:
        captions = generate_captions(run.model, run.data.source, names, run.cfg, run.device)
    for name in names:
        log(f"  [{label}] {name}: {captions[name]}")


class TestResults(NamedTuple):
    """A checkpoint's test report, as write_test_report writes it out."""
    captions: dict  # {image: caption}, by beam search
    references: dict  # {image: [its reference captions]}
    scores: dict  # {image: {"CIDEr": .., "BLEU-4": ..}}, x100
    metrics: dict  # the split's, x100, the demo's figures with them
    seconds: float


def test_report(restored, data, cfg, device, tag=""):
    """A checkpoint's test captions and metrics, with the page (tag in the names); 0 writes."""
    model, ckpt = restored
    start = time.time()
    model = model.to(device)
    captions = generate_captions(model, data.source, data.images("test"), cfg, device)
    demo = demo_scores(model, data, "test", cfg, device, say=True)  # each process does a share
    if not is_main_process():
        return
    refs = references_of(data.split("test"))
    metrics, scores = caption_metrics(refs, captions)
    results = TestResults(captions, refs, scores, metrics | demo, round(time.time() - start, 2))
    write_test_report(results, model, data, cfg, ckpt, tag)


def demo_scores(model, data, split, cfg, device, say=False):
    """The demo's figures ({} elsewhere), from the greedy captions of a split: demo_figures."""
    if data.shapes is None:
        return {}
    greedy_cfg = dataclasses.replace(cfg, beam_size=1)
    greedy = generate_captions(model, data.source, data.images(split), greedy_cfg, device)
    return demo_figures(greedy, data.shapes, say)


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
    """A progress bar in process 0 on a terminal; a log file gets plain lines instead (no \\r)."""
    shown = is_main_process() and sys.stderr.isatty() and not kwargs.get("disable")
    return _tqdm(*args, **kwargs | {"disable": not shown})


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

    def print_help(self, file=None):  # argparse's ignores a failed write, as > /dev/full's
        (file or sys.stdout).write(self.format_help())
        (file or sys.stdout).flush()


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
        default = DEFAULTS[name]
        bare = dict(nargs="?", const=True) if isinstance(default, bool) else {}  # --flag sets it
        kind = parse_bool if isinstance(default, bool) else type(default)
        groups[section].add_argument(f"--{name}", type=kind, metavar=type(default).__name__.upper(),
                                     help=setting_help(name, comment), **bare)
    parser.add_argument("--caption", nargs="+", action="extend", metavar="PATH",
                        help="caption these image files or folders, from --checkpoint")
    overrides = vars(parser.parse_args(argv))
    for name in overrides.keys() & CHOICES:  # a value in another case is that value: flickr8k
        same = [word for word in CHOICES[name] if word.lower() == overrides[name].lower()]
        overrides[name] = (same or [overrides[name]])[0]  # the choices differ in more than case
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
    return f"{comment}{rules}. default: {DEFAULTS[name]!r}{presets}".replace("%", "%%")


# made absolute when the settings are resolved; shown relative to output_dir on the results page
PATHS = ("data_dir", "encoder_weights", "output_dir", "cache_dir", "checkpoint", "init_from")


def resolve_settings(overrides=None, trained=None, echo=None):
    """The constants < the dataset's preset < a checkpoint's settings < the command line."""
    overrides = dict(overrides or {})
    trained = dict(trained or {})
    values = dict(DEFAULTS)
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
    if values["encoder_weights"] == "random":  # one fixed draw: a run with it can be repeated
        values["encoder_weights"] = str(DEMO_WEIGHTS)
    for name in PATHS:
        if values[name]:
            values[name] = str(absolute(name, values, overrides))
    for name, folder in (("data_dir", "input"), ("output_dir", "output")):
        if not values[name]:
            default = str(ROOT / "resources" / folder / values["dataset"])
            layer(values, origin, {name: default}, f"default for {values['dataset']}")


def absolute(name, values, overrides):
    """A path setting made absolute: the defaults are in the project; a user's own, relative to
    where they are."""
    return (Path.cwd() if name in overrides else ROOT) / values[name]


def layer(values, origin, new, where):
    values.update(new)
    origin.update(dict.fromkeys(new, where))


def show_settings(values, origin, trained, echo):
    """Each setting that differs from its constant (or the checkpoint's), and where it came from."""
    lines = []
    for name in CONFIG_NAMES:
        before = trained.get(name, DEFAULTS[name])
        if name in origin and values[name] != before:
            was = f"; the checkpoint's: {before!r}" if name in trained else ""
            lines.append(f"  {name:15s} = {values[name]!r:30s} ({origin[name]}{was})")
    against = "the checkpoint's, or else from " if trained else ""
    if echo and lines:
        echo(f"settings that differ from {against}the constants at the top of the script:\n"
             + "\n".join(lines))


DATASETS = ("auto", "demo", "flickr8k", "flickr30k", "coco")
# the settings that take a word from a list: the nearest is suggested for one that is not there
CHOICES = {"dataset": DATASETS, "preset": ("auto", "none", *PRESETS), "caption_format": ("text",
           "json"), "decoder": ("lstm", "attention"), "lr_schedule": ("constant", "cosine"),
           "scst_baseline": ("mean", "greedy"), "best_metric": ("CIDEr", "BLEU-4", "val_loss")}
SETTING_RULES = [  # (names, valid(value, values), what the value must be)
    (["dataset"], lambda v, _: v in DATASETS, ", ".join(DATASETS)),
    (["preset"], lambda v, _: v in ("auto", "none", *PRESETS),
     "'auto', 'none' or a preset, such as 'demo'"),
    (["batch_size", "num_epochs", "beam_size", "max_caption_len", "embed_size", "hidden_size",
      "num_layers", "freq_threshold", "image_size", "log_every", "demo_images"],
     lambda v, _: v >= 1, "at least 1"),
    (["max_images", "max_batches_per_epoch", "sample_every", "warmup_steps",
      "max_train_caption_len", "scst_epochs", "length_penalty"], lambda v, _: v >= 0, "0 or more"),
    (["num_workers"], lambda v, _: v >= -1, "-1 or more"),
    (["learning_rate", "scst_learning_rate"], lambda v, _: 0 < v <= 1,
     "a positive number up to 1, such as 0.0002"),
    *[([name], lambda v, _, name=name: v in CHOICES[name], " or ".join(map(repr, CHOICES[name])))
      for name in ("lr_schedule", "decoder", "scst_baseline", "caption_format")],
    (["scst_samples"], lambda v, values: (2 if values["scst_baseline"] == "mean" else 1) <= v <= 20,
     "from 1 to 20 (a batch's samples are decoded at once), and at least 2 with "
     "scst_baseline='mean' (the baseline is the other samples' mean)"),
    (["dropout", "label_smoothing"], lambda v, _: 0 <= v < 1, "at least 0 and below 1"),
    (["seed"], lambda v, _: 0 <= v < 2 ** 32, f"between 0 and {2 ** 32 - 1}"),
    (["best_metric"], lambda v, values: v in ("CIDEr", "BLEU-4", "val_loss")
     or (v, values["dataset"]) == ("demo_accuracy", "demo"),
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
                low = {choice.lower(): choice for choice in CHOICES.get(name, ())}  # the nearest
                near = difflib.get_close_matches(str(values[name]).lower(), low, 1)
                hint = "".join(f"did you mean {low[w]}? " for w in near if low[w] != values[name])
                raise UserError(f"--{name}={values[name]}: {hint}must be {must_be}")
    out = Path(os.path.realpath(values["output_dir"]))  # a symlink loop: claim_output_dir says so
    if ROOT.is_relative_to(out) or out in (Path.home(), ROOT / "resources"):  # "/" and the project
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
# hands load_captions' table (image, caption, split) and the image folder to prepare_data

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
CAPTION_FILES = ["dataset_flickr8k.json", "dataset_flickr30k.json", "dataset_coco.json",
                 "captions.txt", "results.csv", "Flickr8k.token.txt"]
IMAGE_DIRS = ["Images", "flickr30k_images/flickr30k_images", "flickr30k_images",
              "Flicker8k_Dataset", "Flickr8k_Dataset"]
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}
SPLITS = ["train", "val", "test"]
TOKEN_LINE = re.compile(r"(?P<image>[^\t#,|]+)#\d+\t(?P<caption>.*)")  # Flickr8k.token.txt
# results.csv, even its row without the second '|'
RESULTS_LINE = re.compile(r"\s*(?P<image>[^|]+?)\s*\|\s*\d+\s*\|?(?P<caption>.*)")


def read_text(path):
    """The file's text in its encoding (UTF-16, UTF-8 with or without a BOM, else cp1252)."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-16" if raw.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    return re.sub(r"\r\n?", "\n", text)  # every line ends in \n, inside a quoted caption too


def read_captions(path):
    """Any supported caption file: (DataFrame of image, caption[, split]; counts of what went)."""
    text = read_text(path)
    lines = text.removesuffix("\n").split("\n")  # not splitlines(): U+2028 ends no caption
    first = next((line for line in lines if line.strip()), "")
    header = re.sub(r"\s", "", first).lower()
    if first.lstrip().startswith("{"):
        frame = pd.DataFrame(karpathy_rows(path, text), columns=["image", "caption", "split"])
        bad_lines = []
    elif TOKEN_LINE.match(first) or header == "image_name|comment_number|comment":
        pattern = TOKEN_LINE if TOKEN_LINE.match(first) else RESULTS_LINE
        matches = [(n, line, pattern.match(line)) for n, line in enumerate(lines, 1)]
        frame = pd.DataFrame([m.groups() for _, _, m in matches if m], columns=["image", "caption"])
        # neither a caption, nor blank, nor results.csv's header
        bad_lines = [n for n, line, m in matches if not m and line.strip() and line != first]
    elif header == "image,caption":
        reader = csv.reader(io.StringIO(text, newline=""))  # "": a quoted caption may hold \n
        numbered = [(reader.line_num, row) for row in reader][1:]  # [1:]: not the header
        # a caption's unquoted commas make more than two fields
        rows = [(row[0].strip(), ",".join(row[1:])) for _, row in numbered if len(row) >= 2]
        frame = pd.DataFrame(rows, columns=["image", "caption"])
        bad_lines = [n for n, row in numbered if len(row) == 1]
    else:
        raise UserError(f"{path}: unknown caption format (first line {first[:120]!r}); accepted "
                        f"formats: captions.txt ('image,caption'), Flickr8k.token.txt ('name.jpg#0"
                        f"<TAB>caption'), results.csv ('image_name| comment_number| comment') or "
                        f"Karpathy's dataset_*.json")
    if bad_lines:
        warn(f"{path}: skipped {len(bad_lines)} malformed line(s): {bad_lines[:10]}")
    frame["caption"] = frame["caption"].str.strip()
    empty = frame["caption"] == ""
    # nothing to learn or score without a letter or a digit: punctuation alone, '_' alone
    wordless = ~frame["caption"].str.contains(r"[^\W_]")
    kept = frame[~wordless].drop_duplicates(["image", "caption"]).reset_index(drop=True)
    dropped = Counter(blank_lines=sum(not line.strip() for line in lines),
                      empty_captions=int(empty.sum()),
                      captions_without_words=int((wordless & ~empty).sum()),
                      duplicate_rows=int((~wordless).sum()) - len(kept),
                      malformed_rows=len(bad_lines))
    if kept.empty:  # +dropped: the counts above 0
        raise UserError(f"{path} holds no caption with a word in it ({dict(+dropped)}): fix it")
    return kept, dict(+dropped)


def karpathy_rows(path, text):
    """(image, caption, split) rows of a Karpathy-format JSON file; a bad entry is one line."""
    try:
        images = json.loads(text)["images"]
    except (ValueError, KeyError, TypeError, RecursionError) as error:  # Recursion: nested too deep
        raise UserError(f"{path}: not a Karpathy-format JSON file ({error!r})") from None
    if not isinstance(images, list):
        raise UserError(f"{path}: 'images' is a {type(images).__name__}, not a list (Karpathy's)")
    rows = []
    for i, image in enumerate(images):
        valid = (isinstance(image, dict)
                 and image.get("split") in ("train", "restval", "val", "test")
                 and isinstance(image.get("filename"), str) and image["filename"] != ""
                 and isinstance(image.get("sentences"), list) and image["sentences"] != []
                 and all(isinstance(s, dict) and isinstance(s.get("raw"), str)
                         for s in image["sentences"]))
        if not valid:
            raise UserError(f"{path}: images[{i}] {image!r:.80} is not an object with a "
                            f"'filename', 'split' (train/restval/val/test), 'sentences' of "
                            f"{{'raw': caption}}: fix or remove it")
        name = image["filename"]
        if image.get("filepath"):  # COCO's train2014/ or val2014/
            name = f"{image['filepath']}/{name}"
        split = {"restval": "train"}.get(image["split"], image["split"])  # restval: trained on
        rows += [(name, sentence["raw"], split) for sentence in image["sentences"]]
    return rows


def find_dataset_files(folder):
    """The caption file and the image folder in folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"dataset folder {folder} does not exist: download the data into it "
                        f"(./setup.sh --flickr8k; README) or point --data_dir at it")
    places = [folder] + [folder / d for d in IMAGE_DIRS]
    found = [p / name for name in CAPTION_FILES for p in places if (p / name).is_file()]
    if not found:
        raise UserError(f"no caption file in {folder}: expected one of {', '.join(CAPTION_FILES)}")
    if found[0].name == "dataset_coco.json":  # its images are in train2014/ and val2014/, named so
        return found[0], folder
    image_dirs = [folder / d for d in IMAGE_DIRS if (folder / d).is_dir() and any(
        p.suffix.lower() in IMAGE_EXTENSIONS for p in (folder / d).iterdir())]
    if not image_dirs:
        raise UserError(f"no image folder with images in {folder}: expected one of "
                        f"{', '.join(IMAGE_DIRS)}")
    return found[0], image_dirs[0]


def assign_splits(frame, folder, seed, holdout_fraction=0.1):
    """Split by image, never by caption: Karpathy's, else the official Flickr8k lists, or seeded."""
    if "split" in frame:
        split_of = one_split_each(zip(frame["image"], frame["split"]), f"the JSON file in {folder}")
        return frame.assign(split=frame["image"].map(split_of)), "from Karpathy's JSON"
    if all((Path(folder) / f).is_file() for f in SPLIT_FILES.values()):
        listed = []
        for split, file in SPLIT_FILES.items():  # a name a line: a name may hold spaces
            lines = read_text(Path(folder) / file).split("\n")
            listed += [(line.strip(), split) for line in lines if line.strip()]
        split_of = one_split_each(listed, f"the split lists in {folder}")
        frame = frame.assign(split=frame["image"].map(split_of))
        unlisted = frame["split"].isna()
        if unlisted.any():
            log(f"{frame.loc[unlisted, 'image'].nunique()} images are in no split list: left out")
        return frame[~unlisted].reset_index(drop=True), "from the official Flickr8k lists"
    images = sorted(frame["image"].unique())
    random.Random(seed).shuffle(images)
    n = max(1, round(holdout_fraction * len(images)))
    # the images, shuffled:  [ test: n | val: n | train: the rest ]
    #                 i // n:      0          1          2, 3, ...
    split_of = {name: ("test", "val", "train")[min(i // n, 2)] for i, name in enumerate(images)}
    return frame.assign(split=frame["image"].map(split_of)), f"random by image, seed {seed}"


def one_split_each(listed, where):
    """{image: split} of (image, split) pairs; an image in two splits is named in a warning."""
    listed = sorted(set(listed), key=lambda pair: SPLITS.index(pair[1]))
    split_of = dict(listed)  # an image's last pair wins: none is both trained on and scored
    n_splits = Counter(name for name, _ in listed)  # (image, split) pairs are unique here
    repeated = sorted(name for name, n in n_splits.items() if n > 1)
    if repeated:
        named = ", ".join(f"{name} (put in {split_of[name]})" for name in repeated[:5])
        warn(f"{len(repeated)} image(s) are in more than one split in {where}, each put in the "
             f"last of train, val, test that names it: {named}")
    return split_of


def load_captions(folder, seed, max_images=0):
    """Caption table with a split column, for images that exist; reports everything it dropped."""
    caption_file, image_dir = find_dataset_files(folder)
    frame, dropped = read_captions(caption_file)
    names = frame["image"].unique()
    inside = image_dir.resolve()
    # listed files of folders no link or '..' leads out of are there and inside: no realpath each
    plain = set()
    for sub in {os.path.dirname(name) for name in names if "\0" not in name}:
        real = Path(os.path.realpath(image_dir / sub))
        if real == inside / sub and real.is_relative_to(inside):
            with contextlib.suppress(OSError), os.scandir(real) as files:
                plain |= {os.path.join(sub, f.name) for f in files
                          if f.is_file(follow_symlinks=False)}
    others = [name for name in names if name not in plain]
    # os.path's: a name the system refuses (too long, a symlink loop, a NUL byte) is not there
    outside = sorted(n for n in others if "\0" not in n and not Path(
        os.path.realpath(image_dir / n)).is_relative_to(inside))
    missing = sorted(n for n in set(others) - set(outside) if not os.path.isfile(image_dir / n))
    for bad, why in ((outside, f"point outside {image_dir}"), (missing, f"are not in {image_dir}")):
        if bad:
            warn(f"{len(bad)} image name(s) in {caption_file.name} {why}, skipped: "
                 f"{', '.join(map(one_line, bad[:5]))}")
    frame = frame[~frame["image"].isin(outside + missing)]
    if max_images:  # a random subset before splitting, so that every split keeps its share
        keep = sorted(frame["image"].unique())
        random.Random(f"max_images {seed}").shuffle(keep)
        frame = frame[frame["image"].isin(set(keep[:max_images]))]
    frame, split_source = assign_splits(frame.reset_index(drop=True), folder, seed)
    counts = frame.drop_duplicates("image")["split"].value_counts()
    log(f"captions: {caption_file} ({len(frame)} captions of {frame['image'].nunique()} images; "
        f"images in {image_dir}); splits ({split_source}): train {counts.get('train', 0)}, "
        f"val {counts.get('val', 0)}, test {counts.get('test', 0)} images")
    if dropped:
        log(f"dropped from {caption_file.name}: {dropped}")
    check_splits(frame, folder)
    return frame, image_dir


def check_splits(frame, folder):
    for split in SPLITS:
        if not (frame["split"] == split).any():
            raise UserError(f"no {split} images in {folder} once missing or unreadable ones "
                            f"are left out: use more images (max_images) or check the split files")


def open_rgb(path):
    """The image as 8-bit RGB, upright per its EXIF orientation; 16- and 32-bit greys are scaled."""
    with Image.open(path) as image:
        # a damaged EXIF block must not lose an otherwise good image
        with contextlib.suppress(Exception):
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of each upright image
        # 'I;16', 'I;16B', 'I': convert() would clip them at 255, almost white
        if image.mode.startswith("I"):
            pixels = np.asarray(image, dtype=np.float64)
            # 'I' is how some Pillow versions open 16-bit PNGs: values that fit 16 bits are taken
            # as 16-bit
            top = 65535 if image.mode.startswith("I;16") or pixels.max() <= 65535 else 2 ** 31 - 1
            image = Image.fromarray(
                np.clip(np.round(pixels * (255 / top)), 0, 255).astype(np.uint8))
        return image.convert("RGB")


# --------------------------------------------------------------------------------------------------
# the built-in demo set: coloured shapes with captions, in the Flickr8k layout
# hands prepare_data a data folder (Images/, captions.txt) and shapes.csv, which scores the captions

DEMO_COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230),
                "yellow": (240, 210, 30)}
DEMO_BACKGROUNDS = {"white": (240, 240, 240), "grey": (128, 128, 128), "black": (15, 15, 15)}
DEMO_SHAPES = ["circle", "square", "triangle"]
DEMO_WORDS = {*DEMO_COLOURS, *DEMO_SHAPES}
DEMO_SINGLE_SHARE = 2 / 3   # the rest have two shapes, one on each side
DEMO_SHADE = 15             # each channel of a shape's colour varies by up to this much (0-255)
DEMO_BACKGROUND_SHADE = 20  # and the background's grey level by up to this much
# by number of shapes, in fractions of the image: each shape's x range (left to right), every
# shape's y and size ranges. One shape large and central (what a random-weight encoder can still
# tell apart); two, one in each half, each at its own height, never touching
DEMO_PLACES = {1: ([(0.45, 0.55)], (0.45, 0.55), (0.5, 0.75)),
               2: ([(0.24, 0.26), (0.74, 0.76)], (0.35, 0.65), (0.4, 0.46))}
DEMO_CAPTIONS_PER_IMAGE = 3  # of the templates below, drawn without repeats
# by number of shapes. Every two-shape caption names the left shape first and says which is where,
# in words that demo_placement reads back: one word order is easier to learn than six
DEMO_CAPTIONS = {1: ["a {c} {s} .", "a {c} {s} on a {bg} background .",
                     "there is a {c} {s} on a {bg} background .",
                     "a large {c} {s} in the middle of the picture .", "a picture of a {c} {s} .",
                     "one big {c} {s} in the centre ."],
                 2: ["a {c} {s} on the left and a {c2} {s2} on the right .",
                     "a {c} {s} to the left of a {c2} {s2} .",
                     "two shapes on a {bg} background : a {c} {s} on the left and a {c2} {s2} "
                     "on the right ."]}
# the sides a phrase after a shape puts it and, for 'X to the left of Y', the other shape on
SIDES = {"on the left": ["left"], "on the right": ["right"], "to the left of": ["left", "right"],
         "to the right of": ["right", "left"]}
DEMO_IMAGES = "demo_[0-9][0-9][0-9][0-9][0-9].jpg"  # the demo's own: other files in Images/ stay
DEMO_WEIGHTS = ROOT / "resources/models/resnet50-random-init.pth"  # without ./setup.sh's download
RANDOM_ENCODER = "random ResNet50 (pipeline check only; captions meaningless)"  # as outputs say


def make_demo_dataset(folder, n_images, size, seed=0):
    """Writes Images/, captions.txt and shapes.csv; again only when the settings change."""
    folder = Path(folder)
    stamp = {"images": n_images, "size": size, "seed": seed, "version": 9}
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--data_dir={folder} is a file and the demo needs a folder: choose one")
    if (folder / "demo.json").is_file() and json.loads((folder / "demo.json").read_text()) == stamp:
        return folder
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "demo.json").is_file():
        raise UserError(f"{folder} holds files but no demo set: choose an empty or new --data_dir")
    (folder / "Images").mkdir(parents=True, exist_ok=True)
    # the folder may also hold the user's own files: only the demo's are replaced. A stamp that
    # matches no settings goes first, so that an interrupted rebuild is redone on the next run
    (folder / "demo.json").write_text(json.dumps({"incomplete": True}))
    for old in (folder / "Images").glob(DEMO_IMAGES):
        old.unlink()
    write_demo_set(folder, n_images, size, seed)
    (folder / "demo.json").write_text(json.dumps(stamp))
    return folder


def shift(rgb, offsets):
    return tuple(min(255, max(0, round(v + o))) for v, o in zip(rgb, offsets))


def write_demo_set(folder, n_images, size, seed):
    """The demo's images, captions.txt and shapes.csv in folder, every drawing varied (README)."""
    from PIL import ImageDraw
    rng = random.Random(seed)
    captions, shapes = [], []
    for i in tqdm(range(n_images), desc="making the demo set", unit="img", leave=False):
        name = f"demo_{i:05d}.jpg"
        bg = rng.choice(list(DEMO_BACKGROUNDS))
        big = 4 * size  # drawn at 4x, then scaled down: smooth edges
        grey = rng.uniform(-DEMO_BACKGROUND_SHADE, DEMO_BACKGROUND_SHADE)
        image = Image.new("RGB", (big, big), shift(DEMO_BACKGROUNDS[bg], [grey] * 3))  # still grey
        draw = ImageDraw.Draw(image)
        n_shapes = 1 if rng.random() < DEMO_SINGLE_SHARE else 2
        # two shapes may share a colour or a shape, never both: which colour belongs to which shape,
        # and which is where, is then the question, and neither can be guessed from the other one
        objects = rng.sample([(c, s) for c in DEMO_COLOURS for s in DEMO_SHAPES], n_shapes)
        xs, ys, extents = DEMO_PLACES[n_shapes]
        places = [(rng.uniform(*x), rng.uniform(*ys), rng.uniform(*extents)) for x in xs]
        for (colour, shape), (x, y, extent) in zip(objects, places):
            shade = [rng.uniform(-DEMO_SHADE, DEMO_SHADE) for _ in range(3)]
            fill = shift(DEMO_COLOURS[colour], shade)
            x, y, r = x * big, y * big, extent * big / 2  # the centre and the half-width, in pixels
            if shape == "triangle":
                draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
            elif shape == "circle":
                draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
            else:
                draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
        image.resize((size, size), Image.LANCZOS).save(folder / "Images" / name, quality=92)
        (c, s), (c2, s2) = objects[0], objects[-1]  # the left shape and the right (or the one)
        chosen = rng.sample(DEMO_CAPTIONS[n_shapes], DEMO_CAPTIONS_PER_IMAGE)
        captions += [(name, t.format(c=c, s=s, c2=c2, s2=s2, bg=bg)) for t in chosen]
        shapes.append((name, ";".join(f"{c} {s}" for c, s in objects)))  # left to right
    pd.DataFrame(captions, columns=["image", "caption"]).to_csv(
        folder / "captions.txt", index=False)
    pd.DataFrame(shapes, columns=["image", "shapes"]).to_csv(folder / "shapes.csv", index=False)


def demo_placement(caption):
    """'left colour shape;right colour shape' as the caption places two shapes; None: it hedges."""
    words = caption.split()
    pairs = [i for i in range(len(words) - 1)
             if words[i] in DEMO_COLOURS and words[i + 1] in DEMO_SHAPES]  # 'colour shape' at i
    if len(pairs) != 2 or sum(w in DEMO_WORDS for w in words) != 4:
        return None  # one shape, three, or a colour or shape word that belongs to neither: hedging
    claims = set()  # (0 or 1: the first or second shape named, its side)
    for k, i in enumerate(pairs):
        after = " ".join(words[i + 2:i + 6]) + " "
        for phrase, sides in SIDES.items():
            if after.startswith(phrase + " "):
                claims |= set(zip([k, 1 - k], sides))  # this shape's side, then the other's
    side = dict(claims)  # a shape put on both sides loses one of its claims here
    if len(claims) != 2 or sorted(side.values()) != ["left", "right"]:
        return None
    by_side = {side[k]: " ".join(words[i:i + 2]) for k, i in enumerate(pairs)}  # 'colour shape'
    return f"{by_side['left']};{by_side['right']}"


def demo_truth(folder):
    """{image: its shapes as drawn, 'colour shape[;colour shape]' left to right}: shapes.csv."""
    return pd.read_csv(Path(folder) / "shapes.csv").set_index("image")["shapes"].to_dict()


def demo_accuracy(captions_by_image, truth, n_shapes=1):
    """The share of the images with n_shapes shapes (None: any) captioned right; their number."""
    right = demo_right(captions_by_image, truth, n_shapes)
    return sum(right.values()) / max(1, len(right)), len(right)


def demo_figures(captions, truth, say=False):
    """The share (x100) of all images captioned right, of the single-shape ones and of the
    two-shape ones, named alike on every split."""
    single, n_single = demo_accuracy(captions, truth, 1)
    two, n_two = demo_accuracy(captions, truth, 2)
    if say:
        log(f"demo: the greedy captions name the right colour and shape of {single:.1%} of "
            f"{n_single} held-out single-shape images, and both shapes with their colours on the "
            f"right sides of {two:.1%} of {n_two} two-shape images")
    return {"demo_accuracy": 100 * demo_accuracy(captions, truth, None)[0],
            "demo_colour_shape_accuracy": 100 * single, "demo_two_shape_accuracy": 100 * two}


def demo_right(captions_by_image, truth, n_shapes=None):
    """{image: whether its caption names its shapes right}, for images with n_shapes (None: any)."""
    right = {}
    for name, caption in captions_by_image.items():
        if n_shapes not in (None, truth[name].count(";") + 1):
            continue
        if ";" in truth[name]:
            right[name] = demo_placement(caption) == truth[name]
        else:  # colours and shapes are different words: this colour and this shape, and no other
            right[name] = set(caption.split()) & DEMO_WORDS == set(truth[name].split())
    return right


def prepare_demo(cfg):
    """On the demo: says so and makes its data set (in process 0, while the others wait)."""
    if cfg.dataset == "demo" and is_main_process():
        why = "this run scores a checkpoint of" if cfg.evaluate else (
            f"no Flickr8k at {ROOT / 'resources/input/flickr8k'}, so this run trains on")
        log(f"{'=' * 100}\nDEMO: {why} the built-in demo set\n({cfg.demo_images} generated "
            f"images of coloured shapes). For real captions: ./setup.sh --flickr8k, then run this "
            f"again (README: Data).\n{'=' * 100}")
        try:
            make_demo_dataset(cfg.data_dir, cfg.demo_images, cfg.image_size)
        except OSError as error:  # a full disk (PIL names no file), a file above data_dir
            raise UserError(f"cannot write the demo set in --data_dir={cfg.data_dir}: "
                            f"{error.strerror or error}; free some space or choose another"
                            ) from None
    wait_for_all()


def encoder_weights_file(cfg):
    """--encoder_weights; 'random' or, on the demo without the default file, a random ResNet50."""
    path = Path(cfg.encoder_weights)
    if path.is_file() and path.resolve() != DEMO_WEIGHTS:  # that: --encoder_weights=random
        return path
    if path.resolve() != DEMO_WEIGHTS and (cfg.dataset != "demo" or path != ROOT / encoder_weights):
        raise UserError(f"ResNet50 weights {path} not found: {FETCH_WEIGHTS}")
    warn(f"no ImageNet weights: the encoder is a {RANDOM_ENCODER}, still frozen; its features "
         f"tell the demo's shapes apart, not photos. ./setup.sh downloads the ImageNet weights.")
    if is_main_process():  # written once, before the other processes read it
        random_resnet50_weights(DEMO_WEIGHTS)
    wait_for_all()
    return DEMO_WEIGHTS


# --------------------------------------------------------------------------------------------------
# feature cache: the frozen ResNet50 runs once per image, and its features are cached by content

FETCH_WEIGHTS = ("run ./setup.sh to download it, or fetch https://download.pytorch.org/models/"
                 "resnet50-0676ba61.pth (sha256 0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c"
                 "9e683e722fb8a); --encoder_weights=random: a pipeline check, captions meaningless")


# torchvision's names carry a sha256 prefix
WEIGHTS_NAME = re.compile(r"resnet50-([0-9a-f]{8,64})\.pth")


def weights_sha256(path):
    try:
        # size and time are in the cache key: a changed file is hashed again
        stat = Path(path).stat()
        return stamped_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    except OSError as error:
        raise UserError(f"cannot read ResNet50 weights {path}: {error.strerror or error}") from None


@functools.lru_cache(maxsize=8)
def stamped_sha256(path, size, mtime):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_sha256(path):
    """The file's sha256, or None if unreadable (an image is then named where it is decoded)."""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_resnet50(weights_path):
    """torchvision ResNet50 without its classifier, from a local .pth, never unpickling anything."""
    path = Path(weights_path)
    if not path.is_file():
        raise UserError(f"ResNet50 weights {path} not found: {FETCH_WEIGHTS}")
    named_hash = WEIGHTS_NAME.fullmatch(path.name)
    if named_hash and not weights_sha256(path).startswith(named_hash[1]):
        raise UserError(f"{path} is corrupt or incomplete (its sha256 does not start with "
                        f"{named_hash[1]}): delete it and {FETCH_WEIGHTS}")
    # weights_only: tensors and plain containers; a file that needs more could run code, and is
    # refused
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"{path} cannot be read as plain tensors ({type(error).__name__}): it is "
                        f"damaged, in torch.hub's old format (resnet50-19c8e357.pth) or not a "
                        f"weights file; {FETCH_WEIGHTS} (resnet50-0676ba61.pth)") from None
    # built on the meta device: no random init, which would waste time and draw from the global
    # RNG (a run would then train differently with and without a feature cache); strict loading
    # makes every tensor real
    from torchvision.models import resnet50  # here, as in image_transform
    with torch.device("meta"):
        model = resnet50(weights=None)
    try:
        model.load_state_dict(state, assign=True)
    except Exception as error:
        reason = " ".join(str(error).split())[:200]  # one line: torch's message spans several
        raise UserError(f"{path} does not hold ResNet50 weights ({reason}): "
                        f"{FETCH_WEIGHTS}") from None
    model.avgpool = model.fc = nn.Identity()  # its output is the last convolutional grid, flattened
    # assign keeps the file's dtype; copying into the model converted it to float32
    return model.float()


def random_resnet50_weights(path, seed=0):
    """A fixed random-init ResNet50 for the offline demo, saved: its captions can be reproduced."""
    from torchvision.models import resnet50
    path = Path(path)
    if not path.is_file():
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            state = resnet50(weights=None).state_dict()
        atomic_save(state, path)
    return path


def features_cache_key(weights, image_dir, names, cfg, device):
    """What the features depend on, hashed: the weights, the transform and every image's content."""
    precision = "bf16" if uses_bf16(device) else "fp32"
    if feature_grid_cells(cfg):
        precision += f" grid {feature_grid_cells(cfg)}"
    # by content, hashed when its stat is new (as git's index): a copy kept its mtime, not its ctime
    names, root = sorted(names), Path(image_dir).resolve()
    paths = [os.path.join(root, name) for name in names]  # strings: a Path costs what a stat does
    index = sha256_index(cfg.cache_dir)
    stats = {path: file_stat(path) for path in paths}
    new = [path for path in paths if index.get(path, [None])[:4] != stats[path]]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        hashed = dict(zip(new, tqdm(pool.map(file_sha256, new), total=len(new), unit="img",
                                    desc="hashing images", leave=False, mininterval=1)))
    sha256_index(cfg.cache_dir, {p: [*stats[p], h] for p, h in hashed.items() if stats[p] and h})
    hashes = [hashed[path] if path in hashed else index[path][4] for path in paths]
    spec = {
        "weights": weights_sha256(weights),
        "transform": repr(image_transform(cfg.image_size)),
        "image_dir": str(root),
        "images": dict(zip(names, hashes)),
        "precision": precision,
        "version": 4,
    }
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


def file_stat(path):
    """What git's index compares: size, mtime and ctime in ns, inode; None if there is no file."""
    with contextlib.suppress(OSError):
        stat = os.stat(path)
        return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
    return None


def sha256_index(cache_dir, new=None):
    """{file: [its stat, its sha256]} as hashed before; new's entries are added to the file."""
    path = Path(cache_dir) / "sha256-index.json"
    index = kept(path, dict)
    if new:
        with contextlib.suppress(UserError):  # unwritable: hashed again next time
            write_whole(path.parent, {path: json.dumps(index | new).encode()})
    return index | (new or {})


def kept(path, compute):
    """What compute() returned, as JSON at path: computed once, then read back."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads(Path(path).read_bytes())
    value = compute()
    with contextlib.suppress(UserError):  # a read-only folder: computed at each start
        write_whole(Path(path).parent, {Path(path): json.dumps(value).encode()})
    return value


def tensor_sha256(tensor):
    # in place: no copy of a memory map
    return hashlib.sha256(tensor.contiguous().numpy()).hexdigest()


class ImageFiles(Dataset):
    """One item per image, decoded by PIL in a DataLoader worker: (image (3, H, W) or None, i)."""

    def __init__(self, paths, transform):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        # PIL raises OSError, ValueError, ... by format and damage
        with contextlib.suppress(Exception):
            return self.transform(open_rgb(self.paths[i])), i
        return None, i


def stack_readable(batch):
    """(the readable images of a batch of (image or None, i), stacked, or None; their indices)."""
    images = [image for image, _ in batch if image is not None]
    index = torch.tensor([i for image, i in batch if image is not None], dtype=torch.long)
    return (torch.stack(images) if images else None), index


def decoding_workers(cfg):
    """How many processes decode images: num_workers, or -1: one per CPU core (at most 16)."""
    wanted = cfg.num_workers if cfg.num_workers >= 0 else min(16, os.cpu_count() or 1)
    # each worker holds pipes and a shared-memory file per batch in flight: a low `ulimit -n`
    # makes the DataLoader fail or hang, so raise the soft limit to the hard one, then fit in it
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft < 64:
        raise UserError(f"only {soft} open files are allowed (ulimit -n): "
                        f"raise it, e.g. ulimit -n 4096")
    return min(wanted, (soft - 48) // 16)


def extract_features(encoder, paths, cfg, device, into=None):
    """Pooled (N, 2048) or, for attention, fp16 grid (N, L, 2048) features; unreadable indices."""
    grid_cells = feature_grid_cells(cfg)
    shape = (len(paths), grid_cells, 2048) if grid_cells else (len(paths), 2048)
    dtype = torch.float16 if grid_cells else torch.float
    if into:  # the kernel writes the features out to the file as memory runs short. Its space is
        # reserved first: a disk that fills is then an OSError here, not a SIGBUS while writing
        with open(into, "wb") as file:
            os.posix_fallocate(file.fileno(), 0, max(1, math.prod(shape) * dtype.itemsize))
        features = torch.from_file(str(into), True, math.prod(shape), dtype=dtype).view(shape)
    else:
        features = torch.zeros(shape, dtype=dtype)
    read = torch.zeros(len(paths), dtype=torch.bool)
    batch_size = max(cfg.batch_size, 64)
    workers = decoding_workers(cfg)
    files = ImageFiles(paths, image_transform(cfg.image_size))
    # batches in flight in pinned memory: the GPU never waits on the decoders
    loader = DataLoader(files, batch_size, num_workers=workers,
                        collate_fn=stack_readable, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None)
    encoder.resnet[0].to(device).eval().to(memory_format=torch.channels_last)  # in place
    bar = tqdm(total=len(paths), desc=f"ResNet50 features ({workers} decoding processes)",
               unit="img", leave=False)
    # the decoders start with Ctrl-C, SIGTERM and SIGHUP blocked, and keep them so: the main process
    # stops them once all have started, whichever process of the group a signal reaches first
    pending = []
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    with signals_to(lambda signum, frame: pending.append(signum)):
        try:
            batches = iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
    if pending:
        signal.raise_signal(pending[0])
    with torch.inference_mode(), autocast(device), bar:
        for images, index in batches:
            if images is not None:
                cells = encoder.grid(images.to(device, non_blocking=True))  # (B, L, 2048)
                pooled = cells if grid_cells else cells.mean(1)  # (B, L, 2048) or (B, 2048)
                features[index] = pooled.cpu().to(features.dtype)
                read[index] = True
            bar.update(min(batch_size, len(paths) - bar.n))  # unreadable images included
    unread = (~read).nonzero().flatten().tolist()
    return features, unread


def feature_grid_cells(cfg):
    """ResNet50's grid cells per image for the attention decoder (image halved 5 times), else 0."""
    if cfg.decoder != "attention":
        return 0
    return math.ceil(cfg.image_size / 32) ** 2


def load_cached_features(path, key):
    """The cache's contents, or None when it is absent, for other inputs, or damaged in any way."""
    if not path.is_file():
        return None
    # a truncated or corrupt file fails in many ways; all mean rebuild
    with contextlib.suppress(Exception):
        # mmap: read as pages are used; hashed again only if its stat is not the one recorded
        cache = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        entry = [*file_stat(path), cache["sha256"]]
        known = sha256_index(path.parent).get(path.name) == entry
        if cache["key"] == key and (known or tensor_sha256(cache["features"]) == cache["sha256"]):
            if not known:  # a cache copied in, or the index lost: verified once, then known
                sha256_index(path.parent, {path.name: entry})
            return cache
    warn(f"feature cache {path} is damaged or stale: rebuilding it")
    return None


def try_lock(file):
    """Takes the kernel lock (flock) on an open file, or says False if another process holds it."""
    with contextlib.suppress(OSError):
        # released when the process ends, even by kill -9
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    return False


@contextlib.contextmanager
def exclusive(path):
    """A flock on path's .lock file, taken after any run that holds it; kill -9 releases it."""
    try:
        lock = open(f"{path}.lock", "a+")
    except OSError:  # a read-only folder: nothing can be written there to race over
        yield
        return
    with lock:
        if not try_lock(lock):
            log(f"features: waiting for another run that is writing {path}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        # a killed run's: only the lock holder writes one
        for stale in path.parent.glob(f"{path.name}.*"):
            if stale.suffix in (".scratch", ".tmp"):
                stale.unlink()
        yield


def cached_features(weights, image_dir, names, cfg, device):
    """The images' features, memory-mapped from the cache; extracted and cached first if missing."""
    # on each machine, local process 0 hashes, extracts and writes; the others wait and read
    first_here = os.environ.get("LOCAL_RANK", "0") == "0"
    key = {}
    if first_here:
        key["key"] = features_cache_key(weights, image_dir, names, cfg, device)
    key = merge_over_processes(key)["key"]
    path = Path(cfg.cache_dir) / f"features-{key[:20]}.pt"
    with contextlib.suppress(OSError):  # a read-only cache_dir may still hold the features
        path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(path) if first_here else contextlib.nullcontext():
        cache = load_cached_features(path, key) if first_here else None
        if first_here and cache is None:
            files = {name: Path(image_dir) / name for name in names}
            write_feature_cache(weights, files, path, key, cfg, device)
        elif first_here:
            log(f"features: reusing {path} ({len(cache['images'])} images)")
        wait_for_all()
        if cache is None:  # memory-mapped: the extracted copy leaves RAM
            cache = load_cached_features(path, key)
        wait_for_all()  # the lock is held until every process has read the cache
    if cache is None:
        raise UserError(f"feature cache {path} could not be read back: check --cache_dir")
    return cache


def write_feature_cache(weights, files, path, key, cfg, device):
    """Extracts the features of files ({name: path}) into the cache file at path, atomically."""
    needed = len(files) * 2048 * (2 * feature_grid_cells(cfg) or 4) / 1e9  # GB; grids in float16
    check_writable(path.parent, "--cache_dir")
    free = shutil.disk_usage(path.parent).free / 1e9
    if 2 * needed > free:  # the features as extracted, and the cache file written from them
        raise UserError(f"the feature cache needs {needed:.2f} GB in {path.parent}, and twice that "
                        f"while it is written, but only {free:.2f} GB is free: free some space or "
                        f"use another --cache_dir")
    start = time.time()
    scratch = path.with_name(f"{path.name}.{os.getpid()}.scratch")  # COCO's grids outgrow RAM
    # the scratch file goes also on a full disk, Ctrl-C or SIGTERM (main makes it an exception)
    try:
        encoder = EncoderCNN(1, load_resnet50(weights))  # its frozen ResNet50 alone runs here
        features, unread = extract_features(encoder, list(files.values()), cfg, device, scratch)
        names = list(files)
        failed = [names[i] for i in unread]
        cache = {"key": key, "images": names, "failed": failed, "features": features}
        sha = tensor_sha256(features)
        atomic_save(cache | {"sha256": sha}, path)
        sha256_index(path.parent, {path.name: [*file_stat(path), sha]})
    except OSError as error:  # such as ENOSPC, as another process fills the disk
        raise UserError(f"cannot write the features ({needed:.2f} GB) in --cache_dir={path.parent}"
                        f": {error.strerror or error}; free some space or use another") from None
    finally:
        scratch.unlink(missing_ok=True)
    seconds = time.time() - start
    read = len(files) - len(failed)
    log(f"features: {read} images in {seconds:.1f} s ({read / max(seconds, 1e-9):.1f} images/s, "
        f"{decoding_workers(cfg)} decoding processes), cached in {path}")


def check_writable(folder, setting):
    """Refuses a folder that cannot be written, before any work is done for it."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise UserError(f"{setting}={folder} cannot be written ({error.strerror or error}): "
                        f"choose another folder") from None


def atomic_save(obj, path):
    """torch.save to this process's temp file, fsync, rename: a crash leaves the old file intact."""
    path, tmp = Path(path), Path(f"{path}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        # a full disk (torch says RuntimeError), or a second Ctrl-C while writing
        # suppress: also where nothing was written (read-only, a file in the way)
        with contextlib.suppress(OSError):
            tmp.unlink()
        if not isinstance(error, (OSError, RuntimeError)):
            raise
        reason = getattr(error, "strerror", None) or "the disk may be full"
        raise UserError(f"cannot write {path}: {reason}. Free some space or choose another folder; "
                        f"the previous {path.name}, if any, is intact") from None


def feature_statistics(features, rows):
    """Per-channel mean and std (2048,) over rows of pooled or grid features, a chunk at a time."""
    chunks = (features[chunk].reshape(-1, 2048).double()
              for chunk in torch.as_tensor(rows).split(256))
    total, squares = sum(torch.stack([x.sum(0), x.square().sum(0)]) for x in chunks)  # (2048,) each
    n = len(rows) * features[0].numel() // 2048
    mean = total / n
    return (mean.float(),
            ((squares - n * mean.square()) / max(n - 1, 1)).sqrt().float().clamp_min(1e-6))


def names_sha256(names):
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()


def prepare_data(cfg, device, build_vocab=False, trained=None):
    """Captions, splits, tokens, the training vocabulary (build_vocab) and each image's features."""
    prepare_demo(cfg)
    frame, image_dir = load_captions(cfg.data_dir, cfg.seed, cfg.max_images)
    # spaCy's tokens of these captions, kept in cache_dir: a new caption text means new tokens
    captions = frame["caption"].unique().tolist()
    sha = hashlib.sha256(json.dumps(captions).encode()).hexdigest()
    tokens = kept(Path(cfg.cache_dir) / f"tokens-{sha[:20]}.json",
                  lambda: {text: Vocabulary.tokenize(text) for text in captions})
    frame = frame.assign(tokens=frame["caption"].map(tokens))
    training = frame[frame["split"] == "train"]
    train_sha256 = names_sha256(training["image"].unique())
    vocab = None
    if build_vocab:
        vocab = build_vocabulary(training["tokens"], cfg.freq_threshold)
    weights = encoder_weights_file(cfg)
    if trained:
        check_data(trained, vocab, weights, train_sha256, cfg)
    names = sorted(frame["image"].unique())
    cache = cached_features(weights, image_dir, names, cfg, device)
    source = ImageSource(image_dir, cache["features"], cache["images"])
    failed = cache["failed"]
    if failed:
        more = " ..." if len(failed) > 5 else ""
        warn(f"skipped {len(failed)} unreadable image(s): {', '.join(failed[:5])}{more}")
        frame = frame[~frame["image"].isin(set(failed))].reset_index(drop=True)
        check_splits(frame, cfg.data_dir)
    train_names = sorted(frame.loc[frame["split"] == "train", "image"].unique())
    rows = [source.row[n] for n in train_names]
    # kept in cache_dir too, by the features and the training images they are of
    stats_file = f"stats-{cache['key'][:20]}-{names_sha256(train_names)[:20]}.json"
    stats = kept(Path(cfg.cache_dir) / stats_file,
                 lambda: [s.tolist() for s in feature_statistics(cache["features"], rows)])
    stats = tuple(torch.tensor(s) for s in stats)  # mean and std (2048,) each
    shapes = demo_truth(cfg.data_dir) if cfg.dataset == "demo" else None
    return Data(frame, source, Path(weights).resolve(), stats, train_sha256, vocab, shapes)


def build_vocabulary(train_tokens, freq_threshold):
    vocab = Vocabulary(freq_threshold).build_vocab(train_tokens)
    # what captions end on (learned_endings): each one's last word, and the punctuation after it
    lasts = [max([i for i, w in enumerate(t) if is_word(w)], default=len(t)) for t in train_tokens]
    ends = sorted({w for t, last in zip(train_tokens, lasts) for w in t[last:]})
    vocab.endings = sorted({vocab.itos[i] for i in vocab.numericalize(ends)})
    if len(vocab) == len(Vocabulary.SPECIALS):
        raise UserError(f"--freq_threshold={freq_threshold} leaves no word in the vocabulary "
                        f"(no training word occurs that often): lower it, e.g. --freq_threshold=2")
    log(f"vocabulary: {len(vocab)} words (from the training split, threshold {freq_threshold})")
    return vocab


def is_word(token):
    """What the metrics score: a token with a letter or digit (or <unk>); "_" or "." is none."""
    return any(ch.isalnum() or ch in "<>" for ch in token)


def decoding_rules(vocab, cfg, device):
    """The settings' Rules, with the tokens the training captions end on (learned_endings)."""
    rules = Rules((Vocabulary.UNK,) * cfg.suppress_unk, cfg.length_penalty, cfg.block_trigrams)
    words = torch.tensor([is_word(w) for w in vocab.itos], device=device)  # (V,)
    ends = torch.tensor([w in vocab.endings for w in vocab.itos], device=device)  # (V,)
    closing = ends & ~words | (torch.arange(len(vocab), device=device) == Vocabulary.EOS)  # (V,)
    return rules._replace(ends=ends, closing=closing) if cfg.learned_endings else rules


# --------------------------------------------------------------------------------------------------
# checkpoints and the output folder: a checkpoint is one flat dict, as nanoGPT's, loaded with
# weights_only=True; its settings drive --resume, --evaluate and --caption, its weights --init_from

# --resume keeps these as well, or it would be another run: they decide the batches (as
# max_train_caption_len cuts them), the vocabulary, or which epoch best.pt keeps
RESUME_FIXED = MODEL_ARGS + ("dataset", "data_dir", "max_images", "demo_images", "freq_threshold",
                             "seed", "batch_size", "max_batches_per_epoch", "max_train_caption_len",
                             "best_metric", "label_smoothing")
# how and where this command runs, never taken from a checkpoint; --resume, --evaluate and --caption
# take every other setting from it, --init_from takes MODEL_ARGS
THIS_COMMAND = ("resume", "evaluate", "checkpoint", "init_from", "preset", "output_dir",
                "cache_dir", "device", "num_workers", "caption_format")
# what a checkpoint holds besides its model: every mode reads these; --resume also RESUME_KEYS
# and Progress's fields (which an older checkpoint may lack: it is then not resumed)
CHECKPOINT_KEYS = {"epoch": int, "encoder_weights": str, "encoder_weights_sha256": str,
                   "train_images_sha256": str}
RESUME_KEYS = {"optimizer": dict, "rng_state": torch.Tensor, "cuda_rng_state": list,
               "processes": int}
# what a training run writes in output_dir (report/ holds the page's thumbnails; -xe: SCST's
# cross-entropy results), recorded in its config.json: a fresh run sets aside these alone
RUN_OUTPUTS = ["loss_per_batch.csv", "loss_per_epoch.csv", "loss_graph.png", "metrics_graph.png",
               "vocab.json", "config.json", "best.pt", "best-xe.pt", "last.pt"] + [
    f"{name}{tag}{ext}" for tag in ("", "-xe") for name, ext in [
        ("test_captions", ".csv"), ("test_captions", ".json"), ("test_references", ".json"),
        ("test_metrics", ".json"), ("report", ".html"), ("report", "")]]


def settings_and_checkpoint(overrides, captioning):
    """The run's Config, resolved once, and the checkpoint it starts from (restore's), or None."""
    given = DEFAULTS | overrides
    path = checkpoint_path(given, overrides, captioning)
    if path is None:  # a fresh run
        return resolve_settings(overrides, echo=log), None
    resuming = given["resume"] and not (captioning or given["evaluate"])
    restored = restore(path, resuming)
    names = MODEL_ARGS if given["init_from"] else [n for n in CONFIG_NAMES if n not in THIS_COMMAND]
    trained = {name: restored[1]["config"][name] for name in names}
    if not Path(trained.get("encoder_weights", "")).is_file():  # moved since: the one given is
        trained.pop("encoder_weights", None)  # checked against the sha256 the checkpoint records
    if not given["init_from"] and not given["output_dir"]:
        trained["output_dir"] = str(path.parent)  # --caption and --evaluate write beside it
    cfg = resolve_settings(overrides, trained, stderr if captioning else log)
    if resuming:
        check_resume(restored[1], cfg)
    return cfg, restored


def checkpoint_path(given, overrides, captioning):
    """The checkpoint of --evaluate and --caption, --resume's last.pt or --init_from's (None for a
    fresh run), found from the settings given: resolving them needs the checkpoint's own."""
    if given["init_from"] and (captioning or given["evaluate"] or given["resume"]):
        raise UserError(f"--init_from={given['init_from']} starts a new training run: leave it out "
                        f"of --resume, --evaluate and --caption (which take --checkpoint)")
    if given["checkpoint"] and not (captioning or given["evaluate"]):
        raise UserError(f"--checkpoint={given['checkpoint']} is for --evaluate and --caption: "
                        f"to train on from a checkpoint, use --resume (its run goes on) or "
                        f"--init_from")
    out = ROOT / "resources" / "output" / pick_dataset(given)[0]  # the dataset's default
    if given["output_dir"]:
        out = absolute("output_dir", given, overrides)
    if captioning or given["evaluate"]:
        return absolute("checkpoint", given, overrides) if given["checkpoint"] else out / "best.pt"
    if given["resume"]:
        return out / "last.pt"
    return absolute("init_from", given, overrides) if given["init_from"] else None


def check_resume(ckpt, cfg):
    """Refuses a resume whose steps would count otherwise: other processes, moved SCST epochs."""
    # older versions stored metrics as fractions (no metrics_scale), or kept no epoch history
    if ckpt.get("metrics_scale") != 100 or "history" not in ckpt:
        raise UserError(f"{ckpt['path']} was written by an older version of this script, whose "
                        f"records a resume would mix with this one's. Start a new run from its "
                        f"weights with --init_from={ckpt['path']}")
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
    """What a run needs to go on, or a model to be rebuilt; written by process 0."""
    if not is_main_process():
        return
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise UserError(f"the model's weights are not finite at step {progress.step}: "
                        f"{path.name} unwritten")
    ckpt = {
        "model_args": model.args,  # MODEL_ARGS: Captioner(vocab, model_args) rebuilds the model
        "model": model.state_dict(),  # its weights: the frozen ResNet50 is not part of it
        "vocab": model.vocab.itos,
        "endings": model.vocab.endings,  # learned_endings: the tokens training captions end on
        "config": dataclasses.asdict(cfg),  # every setting it was trained with
        "optimizer": optimizer.state_dict(),
        **dataclasses.asdict(progress),  # epoch, step, best_score and the epoch's running sums
        "rng_state": torch.get_rng_state(),  # mid-epoch, dropout goes on as it would have
        "cuda_rng_state": torch.cuda.get_rng_state_all(),
        "processes": rank_and_size()[1],  # a step's batch: batch_size captions a process
        "encoder_weights": str(data.weights),  # the ResNet50 file its features came from
        "encoder_weights_sha256": weights_sha256(data.weights),
        "train_images_sha256": data.train_images_sha256,  # what --evaluate must not score
        "metrics_scale": 100,  # best_score and the CSVs' metrics: x100 (older checkpoints: x1)
    }
    atomic_save(ckpt | {"model_sha256": model_sha256(ckpt)}, path)


def model_sha256(ckpt):
    """sha256 of what makes the model: its args, vocabulary, settings and its weights' bytes."""
    made_of = [ckpt["model_args"], ckpt["vocab"], ckpt["endings"], ckpt["config"]]
    digest = hashlib.sha256(json.dumps(made_of, sort_keys=True).encode())
    for name in sorted(ckpt["model"]):
        digest.update(name.encode())
        digest.update(ckpt["model"][name].cpu().reshape(-1).view(torch.uint8).numpy())  # raw bytes
    return digest.hexdigest()


def restore(path, resuming=False):
    """A checkpoint: its model (from model_args, its weights loaded strictly) and its dict, every
    key that a mode reads (resuming: --resume's too) checked there and of its type."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: train one first with `.venv/bin/python "
                        f"{Path(__file__).name}` (it writes best.pt and last.pt to output_dir)")
    try:  # unreadable, damaged, tampered with, of other types or shapes: one line naming the file
        raw = io.BytesIO(path.read_bytes())  # read once, checked and loaded from memory
        with zipfile.ZipFile(raw) as archive:  # torch.save's zip keeps each part's CRC32
            damaged = archive.testzip()
        if damaged:
            raise ValueError(f"its part {damaged} fails its CRC32")
        raw.seek(0)
        ckpt = torch.load(raw, map_location="cpu", weights_only=True)  # runs no pickled code
        if ckpt["model_sha256"] != model_sha256(ckpt):
            raise ValueError("its weights or settings are not those its sha256 was taken of")
        # an older version's lacks the epoch history: check_resume refuses it, naming --init_from
        progress = {field.name: field.type for field in dataclasses.fields(Progress)
                    if "history" in ckpt}
        for key, kind in (CHECKPOINT_KEYS | (progress | RESUME_KEYS if resuming else {})).items():
            if not isinstance(ckpt[key], kind):  # one that is absent: KeyError, named
                raise TypeError(f"{key} is {type(ckpt[key]).__name__}, not {kind.__name__}")
        # how a command runs is never taken from a checkpoint: an older one may lack a new setting
        config = {name: DEFAULTS[name] for name in THIS_COMMAND} | ckpt["config"]
        for field in dataclasses.fields(Config):  # its settings, typed as the command line's are
            value = config[field.name]
            if type(value) is not field.type:
                raise TypeError(f"config {field.name}={value!r}: not {field.type.__name__}")
        check_settings(config)
        args = {name: config[name] for name in MODEL_ARGS}  # typed and checked
        if ckpt["model_args"] != args:
            raise ValueError("its model_args are not its config's")
        vocab = Vocabulary(config["freq_threshold"], ckpt["vocab"], ckpt["endings"])
        model = Captioner(vocab, args)
        model.load_state_dict(ckpt["model"])
    except Exception as error:
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]  # torch's span lines
        raise UserError(f"checkpoint {path} is damaged or not one of this script's ({reason}): "
                        f"use another, or train afresh") from None
    return model, ckpt | {"config": config, "path": path}


def check_weights(ckpt, weights):
    """Refuses ResNet50 weights other than the checkpoint's: its projection fits their features."""
    if weights_sha256(weights) != ckpt["encoder_weights_sha256"]:
        file = ckpt["encoder_weights"]
        gone = "" if Path(file).is_file() else ", no longer there: put it back"
        raise UserError(f"checkpoint {ckpt['path']} was trained on other ResNet50 weights than "
                        f"{weights}: use --encoder_weights={file}, the file it was trained "
                        f"with{gone}")


def check_data(ckpt, vocab, weights, train_sha256, cfg):
    """Refuses data other than the checkpoint was trained on (--init_from: another vocabulary or
    ResNet50), before any image is read."""
    if cfg.init_from and vocab.itos != ckpt["vocab"]:
        raise UserError(f"--init_from={cfg.init_from}: its vocabulary ({len(ckpt['vocab'])} words) "
                        f"is not this run's ({len(vocab)}): train on the captions it was trained "
                        f"on, with --freq_threshold={ckpt['config']['freq_threshold']}")
    if vocab is not None and vocab.itos != ckpt["vocab"]:
        raise UserError(f"checkpoint {ckpt['path']} has a different vocabulary "
                        f"({len(ckpt['vocab'])} words, now {len(vocab)}): the captions in "
                        f"{cfg.data_dir} changed; train afresh")
    check_weights(ckpt, weights)
    if train_sha256 != ckpt["train_images_sha256"] and not cfg.init_from:
        raise UserError(f"the training split of {cfg.data_dir} is not the one {ckpt['path']} was "
                        f"trained on: its test split may hold training images. Use its data, or "
                        f"train afresh")


def claim_output_dir(out):
    """Creates and locks output_dir for this run, and clears what a killed run left half-written."""
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
    for stale in {p for name in RUN_OUTPUTS for p in out.glob(f"{name}.*tmp")}:
        stale.unlink()
    for staging in out.glob("writing-*"):  # write_whole's, left by a kill -9
        shutil.rmtree(staging, ignore_errors=True)
    return lock  # held open until the process ends


def set_aside_earlier_run(out):
    """A fresh run, its inputs checked, moves aside what an earlier run's config.json records as its
    own: a folder never mixes two runs. A file it would replace that no run recorded is refused."""
    out = Path(out)
    recorded = []
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):  # none, or not ours
        recorded = list(json.loads((out / "config.json").read_bytes()).get("outputs", []))
    earlier = [out / name for name in RUN_OUTPUTS if os.path.lexists(out / name)]
    unknown = [path.name for path in earlier if path.name not in recorded]
    if unknown:
        raise UserError(f"--output_dir={out} holds {', '.join(unknown)}, which no run of this "
                        f"script recorded as its own: move them, or choose another output_dir")
    if earlier:
        stamp = f"previous-{datetime.datetime.now():%Y%m%d-%H%M%S}-"
        aside = Path(tempfile.mkdtemp(prefix=stamp, dir=out))
        for path in earlier:
            os.replace(path, aside / path.name)
        log(f"{out} held an earlier run: its files are now in {aside} (--resume continues a run)")


# Ctrl-C, a scheduler, a closed terminal
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals_to(handler):
    """Inside, Ctrl-C, SIGTERM and SIGHUP go to handler; after, to where they went before."""
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def stopping_on_signals():
    """Inside, SIGTERM and SIGHUP stop the process like Ctrl-C: what is being written is cleaned."""
    if "LOCAL_RANK" in os.environ:  # torchrun's agent stops the others with SIGTERM: let it
        return contextlib.nullcontext()
    return signals_to(signal.default_int_handler)


class CtrlC:
    """Ctrl-C, SIGTERM or SIGHUP asks the loop to save last.pt and stop; a second stops at once."""
    # under torchrun, whose agent passes one Ctrl-C on twice, every signal only asks
    requested = False

    def request(self, signum, frame):
        if self.requested and "LOCAL_RANK" not in os.environ:
            raise SystemExit(130)
        if not self.requested:
            log("\nCtrl-C: saving a checkpoint after this step (press again to stop at once)")
        self.requested = True


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
    whole = pd.concat([pd.read_csv(path), frame])  # SCST's columns, or an older version's
    write_whole(path.parent, {path: whole.to_csv(index=False).encode()})


def truncate_csv(path, column, last):
    """Keeps the rows up to a checkpoint, so a resumed run neither repeats nor loses any; how many
    rows it kept (0: none, or the file was missing or unreadable, and is moved aside)."""
    path = Path(path)
    try:
        frame = pd.read_csv(path)
        frame = frame[frame[column] <= last]
    except FileNotFoundError:
        return 0
    except pd.errors.EmptyDataError:  # killed before its first row: nothing to keep
        path.unlink()
        return 0
    except (ValueError, KeyError):  # garbage, or not this script's: kept aside, not overwritten
        os.replace(path, path.with_suffix(".unreadable.csv"))
        return 0
    frame.to_csv(path, index=False)
    return len(frame)


def prepare_outputs(run, out):
    """In process 0: the run's vocab.json and config.json; and its logs and best.pt as last.pt
    left them, so that a kill -9 at any instant resumes exactly."""
    if not is_main_process():
        return
    if not run.cfg.resume:  # every input checked, --init_from's checkpoint read: the first write
        set_aside_earlier_run(out)
    vocab = run.model.vocab  # a word a line; the keys are Vocabulary's: Vocabulary(**json.load(f))
    vocab = json.dumps({k: v for k, v in vars(vocab).items() if k != "stoi"}, indent=0)
    # the settings that ran, the ResNet50 file that was used and the files a run writes here
    settings = dataclasses.asdict(run.cfg) | {"encoder_weights": str(run.data.weights),
                                              "outputs": RUN_OUTPUTS}
    if run.data.weights == DEMO_WEIGHTS.resolve():
        settings["encoder"] = RANDOM_ENCODER
    # config.json first: it records every file a run writes before any of them is there
    write_whole(out, {out / "config.json": json.dumps(settings, indent=2).encode(),
                      out / "vocab.json": vocab.encode()})
    meteor_scorer()  # its JVM loads while the first epoch trains
    # end_epoch writes last.pt (which holds every epoch's row) first, then best.pt, then the CSV
    # and graphs: what a kill skipped is redone here; loss_per_batch.csv's rows past it go
    progress = run.progress
    kept = truncate_csv(out / "loss_per_batch.csv", "step", progress.step)
    if kept < progress.step:
        warn(f"{out / 'loss_per_batch.csv'} held the rows of {kept} of the {progress.step} steps "
             f"taken (deleted or damaged?): the others are lost; the run goes on from step "
             f"{progress.step + 1}")
    if not progress.history:  # a fresh run, or a resume before the first epoch ended
        return
    best, last = out / "best.pt", out / "last.pt"
    # last.pt was to be written with best.pt, at an epoch end, and best.pt is older or absent
    stale = not best.is_file() or best.stat().st_mtime_ns < last.stat().st_mtime_ns
    if progress.best_step == progress.step and stale:
        write_whole(out, {best: last.read_bytes()})
    write_history(out, progress)


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
    """Joins torchrun's process group, returns this process's device; else the device unchanged."""
    if "LOCAL_RANK" not in os.environ:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # the others wait while process 0 writes the feature cache: at COCO's size, longer than NCCL's
    # 10 minutes
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(hours=2),
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
# METEOR's Java process: one per run, closed on any exception and at exit


@functools.lru_cache(maxsize=1)
def meteor_scorer():
    """One METEOR process per run (its JVM takes seconds to start, scoring milliseconds)."""
    from pycocoevalcap.meteor.meteor import Meteor
    if not shutil.which("java"):
        warn("METEOR is not computed: it needs Java (`java` on the PATH), e.g. apt-get install "
             "default-jre")
        return None
    # a terminal's Ctrl-C signals every process of its group, and Java would die mid-score while the
    # run finishes its step; a signal ignored when the JVM starts stays ignored in it
    with signals_to(signal.SIG_IGN):
        meteor = Meteor()
    atexit.register(close_meteor, meteor)
    return meteor


def close_meteor(meteor):
    """Ends METEOR's Java process and frees its lock, so that exit never waits on them."""
    # pycocoevalcap's compute_score holds the lock while it talks to Java; an exception there (a
    # second Ctrl-C) leaves it held, and its Meteor.__del__ would wait for it at exit, forever
    meteor_scorer.cache_clear()  # a later scoring starts a new process
    meteor.meteor_p.kill()
    meteor.meteor_p.wait()
    with contextlib.suppress(OSError):  # a line half written to the ended process
        meteor.meteor_p.stdin.close()
    if meteor.lock.locked():
        meteor.lock.release()


def meteor_score(refs, hyps):
    """coco-caption's METEOR x100, or None without Java; an exception while scoring ends the
    process."""
    meteor = meteor_scorer()
    if meteor is None:
        return None
    try:
        return 100 * float(meteor.compute_score(refs, hyps)[0])
    except BaseException:  # a second Ctrl-C, say
        close_meteor(meteor)
        raise


# --------------------------------------------------------------------------------------------------
# the results page: report.html (resources/report.html with the data filled in), every test image
# with its caption, references and scores; beside it the test split's captions (CSV, and COCO's
# results format), references (COCO's annotation format) and metrics, x100, each written whole.

def format_metrics(metrics):
    return ", ".join(f"{k} {'n/a' if v is None else f'{v:.1f}'}" for k, v in metrics.items())


def log_epoch(row, best, cfg):
    if row["phase"] == "self-critical":
        said = (f"self-critical: reward {row['reward']:.1f}, greedy CIDEr-D "
                f"{row['greedy_cider']:.1f}")
    else:
        said = f"train loss {row['train_loss']:.3f}"
    metrics = {k: v for k, v in row.items()
               if k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr",
                        "demo_accuracy")}
    log(f"epoch {row['epoch']}: {said}, val loss {row['val_loss']:.3f}, token accuracy "
        f"{row['val_token_accuracy']:.1f}%, {format_metrics(metrics)}; "
        f"{row['epoch_seconds']:.1f} s training, {row['eval_seconds']:.1f} s validation "
        f"(beam {cfg.beam_size})"
        + ("; best.pt" if best else ""))


def write_test_report(results, model, data, cfg, ckpt, tag):
    """The test split's captions (CSV, COCO's results format), references (COCO's annotation
    format), metrics (JSON) and report.html, tag in their names, each written whole."""
    captions, refs, scores = results.captions, results.references, results.scores
    figures = {k: v for k, v in results.metrics.items() if not k.startswith("demo_")}
    log(f"test split, {len(captions)} images, beam {cfg.beam_size} ({ckpt['path']}): "
        f"{format_metrics(figures)}")
    for name in random.Random(cfg.seed).sample(sorted(captions), min(6, len(captions))):
        log(f"  {name}: {captions[name]}\n      reference: {refs[name][0]}")
    shapes = {}
    if data.shapes is not None:  # each caption right or wrong; the page's filter by shape count
        for name, right in demo_right(captions, data.shapes).items():
            scores[name]["right"] = right
        shapes = {name: truth.count(";") + 1 for name, truth in data.shapes.items()}
    out = Path(cfg.output_dir)
    frame = pd.DataFrame([{"image": n, "caption": c, "references": " | ".join(refs[n]), **scores[n]}
                          for n, c in captions.items()])
    report = {"checkpoint": str(ckpt["path"]), "split": "test", "images": len(captions),
              "beam_size": cfg.beam_size, "scale": 100, **results.metrics,
              "seconds": results.seconds}
    coco_results, coco_references = coco_files(refs, captions)
    outputs = {out / f"test_captions{tag}.csv": frame.to_csv(index=False).encode(),
               out / f"test_captions{tag}.json": coco_results.encode(),
               out / f"test_references{tag}.json": coco_references.encode(),
               out / f"test_metrics{tag}.json": json.dumps(report, indent=2).encode()}
    maps = word_maps(model, data.source, captions, next(model.parameters()).device)
    rows = [{"path": data.source.image_dir / n, "name": n, "caption": c, "references": refs[n],
             "scores": scores[n], "maps": maps.get(n), "shapes": shapes.get(n)}
            for n, c in captions.items()]
    page = write_report(out, f"report{tag}", f"{cfg.dataset}: the test split's {len(rows)} images",
                        report_header(cfg, ckpt, results.metrics), rows, outputs)
    if page:
        log(f"results page: {page}")


def coco_files(references, captions):
    """COCO's results and annotation files (JSON) of the captions, with the same integer ids."""
    coco = [re.fullmatch(r"(?:.*/)?COCO_[a-z]+\d*_0*(\d+)\.jpg", name) for name in captions]
    ids = {name: i for i, name in enumerate(sorted(captions))}  # where names carry no number
    if all(coco):  # COCO's own: 391895 for COCO_val2014_000000391895.jpg
        ids = {name: int(match[1]) for name, match in zip(captions, coco)}
    pairs = [(name, text) for name in captions for text in references[name]]
    info = {"image_ids": "COCO's own for COCO's file names, else each name's place in sorted order"}
    return (json.dumps([{"image_id": ids[n], "caption": c} for n, c in captions.items()]),
            json.dumps({"info": info, "licenses": [], "type": "captions",
                        "images": [{"id": i, "file_name": n} for n, i in ids.items()],
                        "annotations": [{"image_id": ids[n], "id": k, "caption": c}
                                        for k, (n, c) in enumerate(pairs)]}))


@torch.no_grad()
def word_maps(model, source, captions, device):
    """{name: [(word, its attention map (h, w))]} of an attention model's captions; {} if pooled."""
    if not model.attention:
        return {}
    maps, items = {}, [(name, caption.split()) for name, caption in captions.items()]
    for chunk in (items[i:i + 64] for i in range(0, len(items), 64)):
        ids = pad_sequence([torch.tensor([Vocabulary.SOS, *model.vocab.numericalize(w),
                                          Vocabulary.EOS]) for _, w in chunk],
                           batch_first=True).to(device)  # (N, T)
        rows = [source.row[name] for name, _ in chunk]
        inputs = source.features[rows].to(device)  # (N, 2048) or (N, L, 2048)
        _, alphas = model.eval().decoder(model.encoder(inputs), ids, alphas=True)  # (N, T-1, L)
        side = math.isqrt(alphas.size(-1))
        maps |= {name: list(zip(words, a.view(-1, side, side).cpu().numpy()))  # (T-1, h, w)
                 for (name, words), a in zip(chunk, alphas)}
    return maps


def write_history(out, progress):
    """loss_per_epoch.csv, whole, from every epoch's row (as last.pt records them), and the graphs:
    loss_graph.png (the losses, SCST's rewards) and metrics_graph.png (validation scores), a panel
    a row, with best.pt's epoch and SCST's start marked."""
    from matplotlib.figure import Figure  # not pyplot's: no window, no display, nothing to close
    from matplotlib.ticker import MaxNLocator
    table = pd.DataFrame(progress.history)
    batches = pd.DataFrame({"step": [], "phase": [], "loss": []})  # a resume may find it lost
    with contextlib.suppress(FileNotFoundError):
        batches = pd.read_csv(out / "loss_per_batch.csv")
    batches = batches.set_index("step")
    epochs = table.set_index("epoch")
    scst = epochs.index[epochs["phase"] == "self-critical"]
    epochs.loc[scst, "train_loss"] = None  # a self-critical step's loss is no cross-entropy
    # the panels of the two files match in number, so that side by side neither leaves a gap
    per_batch = {"loss per batch": batches.loc[batches["phase"] != "self-critical", ["loss"]],
                 "loss per epoch": epochs[["train_loss", "val_loss"]]}
    if len(scst):
        per_batch["self-critical: CIDEr-D x 100 of sampled and greedy captions"] = \
            batches[["reward", "greedy_cider"]].dropna()
    per_epoch = {"validation x 100: against the references":  # at most 4 lines a panel, told apart
                 epochs.filter(regex=r"^(BLEU-[14]|METEOR|ROUGE-L)$").dropna(axis=1, how="all"),
                 "validation x 100: accuracy":
                 epochs.filter(regex=r"^(val_token_accuracy|demo_.*)$"),
                 "validation CIDEr x 100": epochs[["CIDEr"]]}
    files = {out / "loss_per_epoch.csv": table.to_csv(index=False).encode()}
    for file, panels in (("loss_graph.png", per_batch), ("metrics_graph.png", per_epoch)):
        figure = Figure((6.4, 3.6 * max(len(per_batch), len(per_epoch))), layout="constrained")
        for ax, (title, frame) in zip(figure.subplots(len(panels), squeeze=False).flat,
                                      panels.items()):
            frame.plot(ax=ax, title=title, legend=False)
            if frame.index.name == "epoch":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epoch 3, not 2.5
                ax.axvline(progress.best_epoch, color="black", linestyle="--",
                           label=f"best {progress.best_metric}")
            if frame.index.name == "epoch" and len(scst):
                ax.axvline(scst[0] - 0.5, color="tab:purple", linestyle=":", label="SCST begins")
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncols=2,  # off the lines;
                      fontsize="large", frameon=False)  # large: shrunk to a phone's width
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=90)
        files[out / file] = buffer.getvalue()
    write_whole(out, files)


def evaluate_checkpoint(cfg, device, restored):
    """--evaluate: a checkpoint's test report, on the data it was trained on (refused if not)."""
    lock = claim_output_dir(cfg.output_dir) if is_main_process() else None
    data = prepare_data(cfg, device, trained=restored[1])
    test_report(restored, data, cfg, device, f"-{restored[1]['path'].stem}-beam{cfg.beam_size}")
    del lock
    return 0


def write_report(out, name, title, header, rows, outputs=None):
    """out/name.html, its thumbnails in out/name/ and outputs {path: bytes}: each file the old one
    or the new one, whole. A thumbnail is named by its content: the old page keeps its own. None:
    the script was copied without its template, and no page is written."""
    out = Path(out)
    files = dict(outputs or {})
    entries = []
    for row in tqdm(rows, desc="results page", unit="img", leave=False):
        jpeg = thumbnail(row["path"], square=bool(row.get("maps")))
        file = f"{name}/{hashlib.sha256(jpeg).hexdigest()[:16]}.jpg"
        if jpeg:  # else the image is gone since it was captioned: its row stays, without it
            files[out / file] = jpeg
        entries.append({"name": row["name"], "caption": row["caption"], "shapes": row.get("shapes"),
                        "references": row.get("references", []), "scores": row.get("scores", {}),
                        "thumbnail": urllib.parse.quote(file),  # the page's own copy: it travels
                        "maps": [[w, m.astype(float).round(3).flatten().tolist()] for w, m in
                                 row.get("maps") or []]})
    data = json.dumps(header | {"title": title, "rows": entries}, ensure_ascii=False)
    template = ROOT / "resources/report.html"
    page = out / f"{name}.html" if template.is_file() else None
    if page:  # a name that is not UTF-8 holds lone surrogates: \udcff in the JSON, read as such
        html = template.read_text(encoding="utf-8").replace("$data", data.translate(IN_SCRIPT))
        files[page] = html.encode(errors="backslashreplace")
    else:
        warn(f"no {name}.html: its template {template} is not beside the script; copy it there")
    write_whole(out, files)  # the page last: its thumbnails are there before it
    for old in set((out / name).glob("*")) - set(files):  # the earlier page's
        old.unlink()
    return page


# what the page's JSON must not hold raw: '</script>', and bidi controls (U+202A-U+202E,
# U+2066-U+2069, U+200E, U+200F), which reorder the text around them: shown as \u202e
IN_SCRIPT = {ord(c): f"\\u{ord(c):04x}" for c in "<>&"} | {
    c: f"\\\\u{c:04x}" for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F]}


def thumbnail(path, square):
    """The image as JPEG bytes, at most 256 px (the centre square if square); b"" if it is gone."""
    try:
        picture = open_rgb(path)
    except Exception:
        return b""
    if square:  # what an attention model saw, which its maps cover
        picture = ImageOps.fit(picture, (min(picture.size),) * 2)
    picture.thumbnail((256, 256))  # shown at 160 px: sharp on a high-density screen too
    jpeg = io.BytesIO()
    picture.save(jpeg, "JPEG", quality=80)
    return jpeg.getvalue()


def report_header(cfg, ckpt, metrics=None):
    """The top of the page: checkpoint, encoder, data, metrics and changed settings; paths are
    shown from output_dir."""
    out = cfg.output_dir
    weights = ckpt["encoder_weights"]  # what the checkpoint records
    drawn = Path(weights).resolve() == DEMO_WEIGHTS  # --encoder_weights=random, or the demo's
    encoder = RANDOM_ENCODER if drawn else f"ResNet50 weights {os.path.relpath(weights, out)}"
    about = (f"checkpoint {os.path.relpath(ckpt['path'], out)} (epoch {ckpt['epoch']}, "
             f"{ckpt['model_args']['decoder']} decoder), beam {cfg.beam_size}; "
             f"encoder: {encoder}; trained on {ckpt['config']['dataset']} "
             f"({os.path.relpath(ckpt['config']['data_dir'], out)})")
    settings = {n: repr(getattr(cfg, n)) for n in CONFIG_NAMES if getattr(cfg, n) != DEFAULTS[n]}
    settings |= {n: os.path.relpath(getattr(cfg, n), out) for n in PATHS if n in settings}
    graphs = [g for g in ("loss_graph.png", "metrics_graph.png") if (Path(out) / g).is_file()]
    return {"about": about, "metrics": metrics or {}, "settings": settings, "graphs": graphs}


def write_whole(out, files):
    """Writes {path: bytes}, each the old file whole or the new one: all to a temporary folder in
    out first, then renamed into place in order. A full disk is one line, with nothing replaced."""
    path = out  # what the message names while out itself is made
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="writing-", dir=out) as staging:
            for i, (path, content) in enumerate(files.items()):
                path.parent.mkdir(exist_ok=True)
                Path(staging, str(i)).write_bytes(content)
            for i, path in enumerate(files):
                os.replace(Path(staging, str(i)), path)
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}. Free some space or "
                        f"choose another --output_dir; the previous files are intact") from None


# --------------------------------------------------------------------------------------------------
# --caption: captions for new images from a checkpoint

def one_line(text):
    """text as one field of a line: control, bidi and line-separator characters escaped."""
    # \t, \n, U+2028, U+0085 would break the line; U+202E would reverse what follows it; a byte of
    # a name that is not UTF-8 is a lone surrogate (Cs), which no UTF-8 output can hold
    escaped = []
    for char in str(text):
        if char == "\\" or unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            char = char.encode("unicode_escape").decode("ascii")
        escaped.append(char)
    return "".join(escaped)


def image_files(paths):
    """The image files that paths name (a folder: its images, sorted); a missing path is refused."""
    files = []
    for path in map(Path, paths):
        # os.path's: a name too long is not there, where pathlib's would raise
        if os.path.isfile(path):  # named: any suffix
            files.append(path)
        elif os.path.isdir(path):
            files += [f for f in sorted(path.iterdir())
                      if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        else:
            raise UserError(f"no such file or folder: {one_line(path)}")
    if not files:
        raise UserError(f"no images in {' '.join(map(one_line, paths))}")
    return files


def caption_line(file, found, json_lines):
    """An image's line: path<TAB>caption; or a JSON object with the path, the caption and the
    beam's n-best, each with its log-probability and that per token (which ranks them)."""
    if not json_lines:
        return f"{one_line(file)}\t{one_line(found)}" if found is not None else None
    path = str(file).encode(errors="backslashreplace").decode()  # not UTF-8: \udcff, as text
    if found is None:
        return json.dumps({"path": path, "error": "cannot read image"})
    n_best = [{"caption": caption, "log_prob": round(log_p, 4),
               "log_prob_per_token": round(per_token, 4)} for caption, log_p, per_token in found]
    # ensure_ascii: control, line-separator and bidi characters come out as \uXXXX: one line
    return json.dumps({"path": path, "caption": n_best[0]["caption"], "n_best": n_best})


def caption_images(cfg, paths, restored, device):
    """--caption: prints a line per image (caption_format); writes report-captions.html."""
    files = image_files(paths)
    weights = encoder_weights_file(cfg)
    model, ckpt = restored
    # first: a missing or damaged file is its own clear error
    model.encoder.resnet = (load_resnet50(weights),)
    check_weights(ckpt, weights)
    model = model.to(device)
    stderr(f"captioning with {ckpt['path']}")
    header = report_header(cfg, ckpt)
    if ckpt["config"]["dataset"] == "demo":  # else a photo's caption of shapes reads as a finding
        header["note"] = ("this checkpoint was trained on the demo set: it knows only coloured "
                          "shapes. To caption photos, train on Flickr8k (./setup.sh --flickr8k)")
        stderr(f"note: {header['note']}")
    names = [str(f.resolve()) for f in files]
    features, unread = extract_features(model.encoder, names, cfg, device)
    source = ImageSource(Path("/"), features, names)
    readable = [name for i, name in enumerate(names) if i not in set(unread)]
    json_lines = cfg.caption_format == "json"
    found = generate_captions(model, source, readable, cfg, device, n_best=json_lines)
    captions = {name: f[0][0] for name, f in found.items()} if json_lines else found
    for file, name in zip(files, names):
        line = caption_line(file, found.get(name), json_lines)
        if line:  # an unreadable image: an error object in JSON, and in either case on stderr
            print(line, flush=True)
        if name not in captions:
            stderr(f"error: cannot read image {one_line(file)}")
    if not captions:
        return 1
    maps = word_maps(model, source, captions, device)
    rows = [{"path": Path(name), "name": str(file), "caption": captions[name],
             "maps": maps.get(name)}
            for file, name in zip(files, names) if name in captions]
    # output_dir is the checkpoint's folder unless --output_dir is given: never another run's
    out = cfg.output_dir
    try:  # the captions are out: a folder that cannot be written only warns
        title = f"captions of {len(rows)} images" if len(rows) > 1 else "the caption of 1 image"
        page = write_report(out, "report-captions", title, header, rows)
        if page:
            stderr(f"results page: {page}")
    except (OSError, UserError) as error:
        stderr(f"warning: no results page in {out}: {getattr(error, 'strerror', None) or error}")
    return 1 if unread else 0


# --------------------------------------------------------------------------------------------------
# main: settings, then training, --evaluate or --caption

def main(argv=None):
    """Settings, then a mode: --caption, --evaluate or training (fresh, resumed or from weights)."""
    with stopping_on_signals():  # SIGTERM and SIGHUP as Ctrl-C: what is being written is cleaned
        return run_mode(argv)


def run_mode(argv):
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
        return train(cfg, device, restored)
    except UserError as error:
        say_once(f"error: {error}")
        return 2
    except KeyboardInterrupt:  # outside the training loop (which saves first): nothing to save
        say_once("interrupted")
        return 130
    except Exception as error:
        line = fault_line(error)
        say_once(line)  # None: another process's failure (a lost connection) is not shown as ours
        if line is None:
            raise
        with contextlib.suppress(OSError):  # what stdout can still take; the rest to devnull, as
            sys.stdout.flush()  # the flush at exit would fail again, with a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141 if isinstance(error, BrokenPipeError) else 1  # 141: a SIGPIPE, as cat's
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def fault_line(error):
    """The line of a fault of the machine (None: of anything else): an OSError's errno and file, a
    symlink loop, memory that cannot be had; '' for a reader that has gone (| head), as cat."""
    text = " ".join(str(error).split())[:300]  # torch's span lines
    if isinstance(error, OSError) or text.startswith("Symlink loop"):
        return "" if isinstance(error, BrokenPipeError) else f"error: {text}"
    if isinstance(error, MemoryError) or re.search("can't allocate|unable to mmap|of memory", text):
        return (f"error: out of memory ({text or 'MemoryError'}): lower --batch_size, "
                f"--beam_size, --hidden_size, --embed_size or --num_workers")
    return None


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
