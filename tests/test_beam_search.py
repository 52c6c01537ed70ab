"""Beam search: batched and per image, beam 1 is greedy, both decoders; on the trained demo model, ids are words.
And the metrics' failures: captions without words, and METEOR's process at an interrupted exit."""
import dataclasses
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, cap, greedy_decode

SPECIAL_IDS = {cap.Vocabulary.PAD, cap.Vocabulary.SOS, cap.Vocabulary.EOS}


@pytest.fixture(scope="module")
def trained(trained_run):
    """The trained demo model, its settings, and its test images' cached features and image embeddings."""
    model, data, cfg = trained_run
    features = data.source.features[[data.source.row[name] for name in data.images("test")]]
    with torch.no_grad():
        embeds = model.encoder(features)
    return model, cfg, features, embeds


def test_beam_1_equals_greedy_on_a_trained_model(trained):
    model, cfg, _, embeds = trained
    with torch.no_grad():
        assert cap.beam_search(model.decoder, embeds, 1, cfg.max_caption_len) == \
            greedy_decode(model.decoder, embeds, cfg.max_caption_len)


@pytest.mark.parametrize("size", [3, 5])
def test_beam_search_returns_words_alone_and_generate_decodes_them(trained, size):
    """The ids themselves (decode() would hide them): no <PAD>, <SOS> or <EOS>, never empty, within max_len."""
    model, cfg, features, embeds = trained
    beams = cap.beam_search(model.decoder, embeds, size, cfg.max_caption_len)
    assert len(beams) == len(embeds)
    assert all(1 <= len(ids) <= cfg.max_caption_len and not SPECIAL_IDS & set(ids) for ids in beams), beams
    assert all(0 <= i < len(model.vocab) for ids in beams for i in ids)
    assert model.generate(features, size, cfg.max_caption_len) == [" ".join(model.vocab.itos[i] for i in ids)
                                                                   for ids in beams]
    # and decode() drops what a sequence might carry besides words: <SOS>, padding, everything from <EOS> on
    words = beams[0]
    assert model.vocab.decode([cap.Vocabulary.SOS, *words, cap.Vocabulary.EOS, *words, cap.Vocabulary.PAD]) == \
        model.vocab.decode(words)


def test_beam_search_returns_the_best_hypothesis_when_none_ends(trained):
    model, _, _, embeds = trained
    beams = cap.beam_search(model.decoder, embeds[:4], 3, max_len=2)
    assert all(len(ids) == 2 for ids in beams)  # cut at max_len: still a caption, not nothing


def test_greedy_decoding_is_batched_and_per_image_independent():
    torch.manual_seed(0)
    decoder = cap.DecoderRNN(16, 32, vocab_size=30).eval()
    embeds = torch.randn(6, 16)
    batch = cap.beam_search(decoder, embeds, 1, max_len=7)
    assert len(batch) == 6 and all(len(ids) <= 7 for ids in batch)
    assert batch == [cap.beam_search(decoder, embeds[i:i + 1], 1, 7)[0] for i in range(6)]
    assert all(i not in (cap.Vocabulary.PAD, cap.Vocabulary.SOS, cap.Vocabulary.EOS) for ids in batch for i in ids)


def test_beam_search_on_a_random_model_returns_one_caption_per_image():
    torch.manual_seed(0)
    decoder = cap.DecoderRNN(16, 32, vocab_size=30).eval()
    embeds = torch.randn(4, 16)
    with torch.no_grad():
        beams = cap.beam_search(decoder, embeds, beam_size=3, max_len=6)
        assert len(beams) == 4 and all(len(ids) <= 6 for ids in beams)
        assert cap.beam_search(decoder, embeds, 1, 6) == greedy_decode(decoder, embeds, 6)


def test_beam_search_works_with_the_attention_decoder():
    torch.manual_seed(2)
    decoder = cap.AttentionDecoder(16, 32, vocab_size=25).eval()
    cells = torch.randn(5, 4, 16) * 3
    assert cap.beam_search(decoder, cells, 1, 8) == greedy_decode(decoder, cells, 8)
    beams = cap.beam_search(decoder, cells, beam_size=3, max_len=8)
    assert beams == [cap.beam_search(decoder, cells[i:i + 1], 3, 8)[0] for i in range(5)] and all(beams)


def test_batched_beam_search_equals_one_image_at_a_time():
    torch.manual_seed(1)
    decoder = cap.DecoderRNN(16, 32, vocab_size=25).eval()
    embeds = torch.randn(7, 16) * 3
    batched = cap.beam_search(decoder, embeds, beam_size=4, max_len=8)
    assert batched == [cap.beam_search(decoder, embeds[i:i + 1], 4, 8)[0] for i in range(7)]
    assert all(batched)  # <EOS> can never come first: no empty captions


def log_probability(decoder, embeds, ids, ended):
    """A caption's log-probability step by step as the decoder gives it, with its <EOS> if it ended."""
    state = decoder.start(embeds.unsqueeze(0))
    token = torch.tensor([cap.Vocabulary.SOS])
    total = 0.0
    for t, word in enumerate([*ids, cap.Vocabulary.EOS] if ended else ids):
        logp, state = decoder.step(token, state, first=t == 0)
        total += logp[0, word].item()
        token = torch.tensor([word])
    return total


@pytest.mark.parametrize("make", [lambda: cap.DecoderRNN(16, 32, vocab_size=25),
                                  lambda: cap.AttentionDecoder(16, 32, vocab_size=25)])
def test_n_best_holds_each_hypothesis_with_its_log_probability_best_first(make):
    """What --caption_format=json prints: every ended hypothesis (at most beam_size), ranked by log-probability per
    token as the best is chosen, each log-probability what the decoder gives that caption word by word."""
    torch.manual_seed(1)
    decoder = make().eval()
    with torch.no_grad():
        decoder.to_vocab.bias[cap.Vocabulary.EOS] += 2.5  # a random model that ends its captions now and then
    embeds = torch.randn(8, 16) * 3 if isinstance(decoder, cap.DecoderRNN) else torch.randn(8, 4, 16) * 3
    max_len = 8
    with torch.no_grad():
        n_best = cap.beam_search(decoder, embeds, 4, max_len, n_best=True)
        best = cap.beam_search(decoder, embeds, 4, max_len)
        assert [hypotheses[0][0] for hypotheses in n_best] == best
        assert any(len(hypotheses) > 1 for hypotheses in n_best)  # the test sees rankings, not single answers
        for image, hypotheses in zip(embeds, n_best):
            assert 1 <= len(hypotheses) <= 4 and len({tuple(ids) for ids, *_ in hypotheses}) == len(hypotheses)
            per_token = [mean for *_, mean in hypotheses]
            assert per_token == sorted(per_token, reverse=True)
            for ids, log_p, mean in hypotheses:
                ended = len(ids) < max_len  # else none ended: the best going on, cut at max_len
                assert log_p == pytest.approx(log_probability(decoder, image, ids, ended), abs=1e-4)
                assert mean == pytest.approx(log_p / (len(ids) + ended))


@pytest.mark.parametrize("decoder", [cap.DecoderRNN(16, 32, 30), cap.AttentionDecoder(16, 32, 30)])
def test_reorder_takes_batch_rows_of_every_state_tensor(decoder):
    embeds = torch.randn(3, 4, 16) if isinstance(decoder, cap.AttentionDecoder) else torch.randn(3, 16)
    state = decoder.start(embeds)
    rows = torch.tensor([2, 0, 0])
    picked = decoder.reorder(state, rows)
    assert type(picked) is type(state) and len(picked) == len(state)
    assert all(torch.equal(p, s[:, rows]) for p, s in zip(picked, state))
    # sampling and beam search copy each image's state n times with it, as repeat_interleave did
    repeated = decoder.reorder(state, torch.arange(3).repeat_interleave(2))
    assert all(torch.equal(p, s.repeat_interleave(2, dim=1)) for p, s in zip(repeated, state))


class TableDecoder:
    """A decoder whose next word hangs on the last one alone: log-probabilities from table[last word] (V, V), where
    moves {(word, next word): probability} say, each listed row's next words impossible but those."""

    def __init__(self, vocab_size, moves):
        self.table = torch.zeros(vocab_size, vocab_size)  # rows not listed: every word alike
        for word in {word for word, _ in moves}:
            self.table[word] = -torch.inf
        for (word, following), p in moves.items():
            self.table[word, following] = math.log(p)

    def start(self, embeds):
        return embeds

    def step(self, tokens, state, first=False):
        return cap.next_word_logp(self.table[tokens], first), state

    @staticmethod
    def reorder(state, rows):
        return state[rows]


SOS, EOS, UNK = cap.Vocabulary.SOS, cap.Vocabulary.EOS, cap.Vocabulary.UNK
OFF = dict(suppress_unk=False, length_penalty=0.0, block_trigrams=False, learned_endings=False)


def rules(vocab=None, **on):
    return cap.decoding_rules(vocab or cap.Vocabulary(1), SimpleNamespace(**OFF | on), "cpu")


def repeats_a_trigram(ids):
    trigrams = list(zip(ids, ids[1:], ids[2:]))
    return len(set(trigrams)) < len(trigrams)


def test_block_trigrams_never_repeats_one_on_a_model_forced_to_repeat():
    a, b, c, d = 4, 5, 6, 7  # a b c a b c ... unless c ends (rarely) or b turns to d, which ends
    decoder = TableDecoder(8, {(SOS, a): 1, (a, b): 1, (b, c): 0.9, (b, d): 0.1, (c, a): 0.8, (c, EOS): 0.2,
                               (d, EOS): 1})
    embeds = torch.zeros(3, 1)
    assert cap.beam_search(decoder, embeds, 1, 12) == [[a, b, c] * 4] * 3  # repeats, left alone
    for k in (1, 3):
        found = cap.beam_search(decoder, embeds, k, 12, n_best=True, rules=rules(block_trigrams=True))
        assert all(not repeats_a_trigram(ids) for image in found for ids, *_ in image) and len(found) == 3
    assert cap.beam_search(decoder, embeds, 1, 12, rules=rules(block_trigrams=True))[0] == [a, b, c, a, b, d]


def test_the_length_penalty_reorders_two_fixed_hypotheses_as_gnmt_s_formula_says():
    """'a' (p 0.6, |Y| 2 with <EOS>) against 'b c d e' (p 0.4, |Y| 5): per token the long one is better; divided by
    lp(Y) = ((5 + |Y|) / 6)^alpha with alpha 1 the short one is."""
    a, b, c, d, e = 4, 5, 6, 7, 8
    decoder = TableDecoder(9, {(SOS, a): 0.6, (SOS, b): 0.4, (a, EOS): 1, (b, c): 1, (c, d): 1, (d, e): 1, (e, EOS): 1})
    embeds = torch.zeros(1, 1)
    for alpha, best in [(0.0, [b, c, d, e]), (1.0, [a])]:
        found = cap.beam_search(decoder, embeds, 2, 10, n_best=True, rules=rules(length_penalty=alpha))[0]
        assert [ids for ids, *_ in found] == [best, [a] if best != [a] else [b, c, d, e]]
        lp = (lambda length: ((5 + length) / 6) ** alpha) if alpha else (lambda length: length)  # 0: per token
        ranks = [log_p / lp(len(ids) + 1) for ids, log_p, _ in found]
        assert ranks == sorted(ranks, reverse=True)
        assert found[0][1] == pytest.approx(math.log(0.6 if best == [a] else 0.4))


def test_learned_endings_never_end_on_a_word_no_training_caption_ends_on():
    vocab = cap.Vocabulary(1, [*cap.Vocabulary.SPECIALS, "a", "dog", "with", "ball", "."], endings=[".", "ball", "dog"])
    a, dog, with_, ball, stop = 4, 5, 6, 7, 8
    decoder = TableDecoder(9, {(SOS, a): 1, (a, dog): 1, (dog, with_): 0.7, (dog, stop): 0.3, (with_, stop): 0.6,
                               (with_, EOS): 0.3, (with_, ball): 0.1, (ball, stop): 1, (stop, EOS): 1})
    embeds = torch.zeros(2, 1)
    assert cap.beam_search(decoder, embeds, 1, 10) == [[a, dog, with_, stop]] * 2  # 'with' then the final '.'
    learned = rules(vocab, learned_endings=True)
    assert cap.beam_search(decoder, embeds, 1, 10, rules=learned) == [[a, dog, with_, ball, stop]] * 2
    for image in cap.beam_search(decoder, embeds, 3, 10, n_best=True, rules=learned):
        assert all(ids[-2] in (dog, ball) and ids[-1] == stop for ids, *_ in image)


def test_with_every_option_off_the_captions_are_today_s():
    """Off, the options change nothing: greedy decoding is conftest's reference, <UNK> and repeats included, and
    wider beams are beam_search's own; suppress_unk alone removes the <UNK>s."""
    torch.manual_seed(3)
    decoder = cap.DecoderRNN(16, 32, vocab_size=12).eval()
    with torch.no_grad():
        decoder.to_vocab.bias[UNK] += 3.0  # a model that says <UNK> often
    embeds = torch.randn(6, 16)
    vocab = cap.Vocabulary(1).build_vocab([" ".join("abcdefgh")])
    off = rules(vocab)
    assert off == cap.Rules()
    greedy = cap.beam_search(decoder, embeds, 1, 10, rules=off)
    assert greedy == greedy_decode(decoder, embeds, 10) and any(UNK in ids for ids in greedy)
    assert any(repeats_a_trigram(ids) for ids in greedy)
    assert cap.beam_search(decoder, embeds, 3, 10, True, off) == cap.beam_search(decoder, embeds, 3, 10, True)
    for k in (1, 3):
        assert all(UNK not in ids for ids in cap.beam_search(decoder, embeds, k, 10, rules=rules(suppress_unk=True)))


def test_the_trained_demo_never_says_unk_so_suppress_unk_leaves_its_captions_as_they_were(trained, trained_run):
    model, cfg, _, _ = trained
    _, data, _ = trained_run
    names = data.images("test")
    assert cfg.suppress_unk  # the default
    on = cap.generate_captions(model, data.source, names, cfg, torch.device("cpu"))
    off = cap.generate_captions(model, data.source, names, dataclasses.replace(cfg, **OFF), torch.device("cpu"))
    assert on == off and len(on) == len(names)


def test_captions_without_words_score_zero_rather_than_fail():
    # "_" passes the caption reader, but it is no word to the metrics: pycocoevalcap's Cider raised
    # ValueError when no reference had one
    refs = {"a.jpg": ["_", "_ ."], "b.jpg": ["_"]}
    metrics, each = cap.caption_metrics(refs, {"a.jpg": "_", "b.jpg": "a red circle"})
    assert metrics["CIDEr"] == 0 and metrics["BLEU-4"] == pytest.approx(0, abs=1e-4)
    assert set(each) == {"a.jpg", "b.jpg"} and all(scores["CIDEr"] == 0 for scores in each.values())
    assert cap.metric_text("_ . _") == "" and cap.metric_text("_ a dog _") == "a dog"


# Interrupted as train() is: a first signal asks to stop, a second raises KeyboardInterrupt, here while
# METEOR scores; then the process ends normally. pycocoevalcap's Meteor.__del__ waited at exit for the
# lock that compute_score still held, forever.
INTERRUPTED_WHILE_SCORING = """
import signal, sys, traceback
sys.path.insert(0, {root!r})
import flickr_image_caption_with_pytorch_resnet_lstm as cap

signals = []
def second_raises(number, frame):
    signals.append(number)
    if len(signals) == 2:
        raise KeyboardInterrupt
signal.signal(signal.SIGINT, second_raises)
meteor = cap.meteor_scorer()
compute_score = meteor.compute_score
def scoring(refs, hyps):
    print("scoring", meteor.meteor_p.pid, file=sys.__stdout__, flush=True)  # not redirected
    return compute_score(refs, hyps)
meteor.compute_score = scoring
refs = {{i: ["a red circle on the left of a blue square", "two shapes"] for i in range(2000)}}
hyps = {{i: "a red square on the right" for i in range(2000)}}
try:
    while True:
        cap.caption_metrics(refs, hyps)
except KeyboardInterrupt:
    print("interrupted in compute_score:", "compute_score" in traceback.format_exc(), flush=True)
"""


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java (`java` on the PATH)")
@pytest.mark.parametrize("group", [False, True], ids=["to-the-process", "to-its-group"])
def test_two_signals_while_meteor_scores_never_block_the_exit(tmp_path, group):
    """Signals to the process (a scheduler), or to its whole group, Java too (a terminal's Ctrl-C)."""
    script = tmp_path / "interrupted.py"
    script.write_text(textwrap.dedent(INTERRUPTED_WHILE_SCORING.format(root=str(ROOT))))
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        assert select.select([process.stdout], [], [], 120)[0], "METEOR never began to score"
        line = process.stdout.readline()  # the first call waits seconds for the JVM: signals land in it
        assert line.startswith("scoring"), line + process.stderr.read()
        java = int(line.split()[1])
        for _ in range(2):
            if group:
                os.killpg(process.pid, signal.SIGINT)
            else:
                process.send_signal(signal.SIGINT)
            time.sleep(0.2)
        out, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0, err[-3000:]
    assert "interrupted in compute_score: True" in out
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # and METEOR's Java process is gone with it
        os.kill(java, 0)
