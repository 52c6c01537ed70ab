"""Caption metrics (coco-caption scorers), beam search and --evaluate."""
import json
import shutil

import pandas as pd
import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from conftest import cap, demo_args, greedy_decode

REFS = {"a": ["A dog runs on the grass .", "a brown dog is running", "The dog runs outside ."],
        "b": ["Two children play football .", "kids playing with a ball", "two kids kick a ball on a field"],
        "c": ["A man rides a bike down the road .", "a cyclist on a street", "man riding a bicycle"]}
HYPS = {"a": "a dog runs on grass .", "b": "two kids play with a ball", "c": "a man rides a bicycle"}


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java, which this machine lacks")
def test_metrics_agree_with_pycocoevalcap():
    ours = cap.caption_metrics(REFS, HYPS)
    refs = {k: [cap.metric_text(c) for c in v] for k, v in REFS.items()}
    hyps = {k: [cap.metric_text(v)] for k, v in HYPS.items()}
    bleu, _ = Bleu(4).compute_score(refs, hyps)
    expected = {**{f"BLEU-{n + 1}": b for n, b in enumerate(bleu)}, "METEOR": Meteor().compute_score(refs, hyps)[0],
                "ROUGE-L": Rouge().compute_score(refs, hyps)[0], "CIDEr": Cider().compute_score(refs, hyps)[0]}
    assert set(ours) == set(expected)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name
    assert 0 < ours["BLEU-4"] < ours["BLEU-1"] < 1 and ours["CIDEr"] > 0


def test_metric_text_is_lowercased_without_punctuation():
    assert cap.metric_text("A Dog, running .") == "a dog running"


def test_identical_caption_scores_bleu_4_of_one():
    caption = "a little girl in a pink dress climbs the stairs"
    assert cap.caption_metrics({1: [caption]}, {1: caption})["BLEU-4"] == pytest.approx(1.0)


def test_meteor_is_absent_without_java(monkeypatch, capsys):
    monkeypatch.setattr(cap.shutil, "which", lambda name: None)
    cap.meteor_scorer.cache_clear()
    try:
        metrics = cap.caption_metrics(REFS, HYPS)
    finally:
        cap.meteor_scorer.cache_clear()
    assert metrics["METEOR"] is None and metrics["BLEU-1"] > 0
    assert "METEOR is not computed: it needs Java" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(trained_run):
    model, data, cfg = trained_run
    with torch.no_grad():
        embeds = torch.cat([model.encoder(inputs) for inputs, _ in cap.image_batches(data.source, data.images("test"),
                                                                                      64)])
    return model, cfg, embeds


def test_beam_1_equals_greedy_on_a_trained_model(trained):
    model, cfg, embeds = trained
    with torch.no_grad():
        assert cap.beam_search(model.decoder, embeds, 1, cfg.max_caption_len) == \
            greedy_decode(model.decoder, embeds, cfg.max_caption_len)


def test_beam_search_gives_non_empty_clean_captions(trained):
    model, cfg, embeds = trained
    for size in (3, 5):
        beams = cap.beam_search(model.decoder, embeds, size, cfg.max_caption_len)
        captions = [model.vocab.decode(ids) for ids in beams]
        assert len(captions) == len(embeds) and all(captions)
        assert not any(s in c for c in captions for s in ("<PAD>", "<SOS>", "<EOS>"))


def test_beam_search_returns_the_best_hypothesis_when_none_ends(trained):
    model, _, embeds = trained
    beams = cap.beam_search(model.decoder, embeds[:4], 3, max_len=2)
    assert all(len(ids) == 2 for ids in beams)  # cut at max_len: still a caption, not nothing


def test_evaluate_mode_prints_the_metrics_table(trained_demo, demo_dirs, random_weights, capsys):
    (trained_demo / "test_metrics.json").unlink()
    assert cap.main(demo_args(demo_dirs, random_weights, trained_demo, "--evaluate")) == 0
    printed = capsys.readouterr().out
    assert "test split, 100 images, beam 3" in printed and "CIDEr" in printed
    report = json.loads((trained_demo / "test_metrics.json").read_text())
    assert report["checkpoint"].endswith("best.pt") and report["BLEU-1"] > 0
    assert (report["METEOR"] > 0) if shutil.which("java") else report["METEOR"] is None
    assert len(pd.read_csv(trained_demo / "test_captions.csv")) == 100


def test_evaluate_refuses_an_unusable_or_busy_output_dir(tmp_path, trained_demo, demo_dirs, random_weights, capsys):
    (tmp_path / "afile").write_text("x")
    args = demo_args(demo_dirs, random_weights, tmp_path / "afile", "--evaluate",
                     f"--checkpoint={trained_demo / 'best.pt'}")
    assert cap.main(args) == 2
    assert f"cannot write to --output_dir={tmp_path / 'afile'}" in capsys.readouterr().err
    lock = cap.claim_output_dir(trained_demo)  # as a training run into that folder would
    try:
        assert cap.main(demo_args(demo_dirs, random_weights, trained_demo, "--evaluate")) == 2
    finally:
        lock.close()
    assert f"another run (process {cap.os.getpid()}) is writing to {trained_demo}" in capsys.readouterr().err


def test_evaluate_an_attention_checkpoint_with_its_maps(trained_attention, demo_dirs, random_weights, monkeypatch):
    (trained_attention / "test_metrics.json").unlink()
    drawn, real = [], cap.save_caption_figure
    monkeypatch.setattr(cap, "save_caption_figure", lambda items, path, maps=None: drawn.append((items, maps)) or
                        real(items, path, maps))
    assert cap.main(demo_args(demo_dirs, random_weights, trained_attention, "--decoder=attention", "--evaluate")) == 0
    report = json.loads((trained_attention / "test_metrics.json").read_text())
    assert report["images"] == 100 and "demo_two_shape_accuracy" in report
    ((items, maps),) = drawn
    assert len(items) == len(maps) == 6 and all(maps)
    for (_, text), words in zip(items, maps):  # each generated word with its map
        assert [w for w, _ in words] == text.splitlines()[0].removeprefix("generated: ").split()
    assert (trained_attention / "test_examples.png").stat().st_size > 0
