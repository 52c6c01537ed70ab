"""Caption metrics (coco-caption scorers, against values worked out by hand), the evaluation helpers and
--evaluate."""
import json
import math
import shutil

import pandas as pd
import pytest
import torch

from conftest import cap, demo_args, error_line

REFS = {"a": ["A dog runs on the grass .", "a brown dog is running", "The dog runs outside ."],
        "b": ["Two children play football .", "kids playing with a ball", "two kids kick a ball on a field"],
        "c": ["A man rides a bike down the road .", "a cyclist on a street", "man riding a bicycle"]}
HYPS = {"a": "a dog runs on grass .", "b": "two kids play with a ball", "c": "a man rides a bicycle"}


def test_bleu_and_rouge_l_of_one_caption_as_worked_out_by_hand():
    """'a dog runs on grass' (5 words) against 'a dog runs on the grass' (6): every word matches, 3 of 4 bigrams,
    2 of 3 trigrams, 1 of 2 4-grams; the brevity penalty is exp(1 - 6/5). The longest common subsequence is all 5
    words: precision 1, recall 5/6, and ROUGE-L's F with beta 1.2."""
    metrics, each = cap.caption_metrics({1: ["A dog runs on the grass ."]}, {1: "A dog, runs on grass!"})
    penalty, precisions = math.exp(1 - 6 / 5), [1, 3 / 4, 2 / 3, 1 / 2]
    for n in range(1, 5):
        expected = penalty * math.prod(precisions[:n]) ** (1 / n)
        assert metrics[f"BLEU-{n}"] == pytest.approx(100 * expected, abs=1e-6), n  # x100
    recall, beta2 = 5 / 6, 1.2 ** 2
    assert metrics["ROUGE-L"] == pytest.approx(100 * (1 + beta2) * recall / (recall + beta2), abs=1e-6)
    assert metrics["CIDEr"] == 0  # one image: every n-gram is in every document, and its IDF is log(1) = 0
    assert each == {1: {"CIDEr": 0, "BLEU-4": pytest.approx(metrics["BLEU-4"])}}  # one image: the corpus figures


def test_metrics_rank_the_same_perfect_partial_and_swapped_captions_in_order():
    perfect = {k: refs[0] for k, refs in REFS.items()}
    swapped = {"a": HYPS["b"], "b": HYPS["c"], "c": HYPS["a"]}  # each image given another's caption
    scores = [cap.caption_metrics(REFS, hyps)[0] for hyps in (perfect, HYPS, swapped)]
    for name in ("BLEU-4", "ROUGE-L", "CIDEr") + (("METEOR",) if shutil.which("java") else ()):
        assert scores[0][name] > scores[1][name] > scores[2][name] >= 0, name
    assert scores[1]["BLEU-1"] > scores[2]["BLEU-1"]  # the partial captions' words are all in their references
    for name in ("BLEU-1", "BLEU-4", "ROUGE-L") + (("METEOR",) if shutil.which("java") else ()):
        assert scores[0][name] == pytest.approx(100, abs=1e-4), name  # a reference itself: the top score
    assert scores[2]["CIDEr"] == 0 and scores[2]["BLEU-4"] < 1e-4  # no 2-gram in common with its references
    assert scores[0]["CIDEr"] > 300  # CIDEr's scale is not 100: x10 by definition, and x100


def test_metric_text_is_lowercased_without_punctuation():
    assert cap.metric_text("A Dog, running .") == "a dog running"


def test_identical_caption_scores_bleu_4_of_one():
    caption = "a little girl in a pink dress climbs the stairs"
    assert cap.caption_metrics({1: [caption]}, {1: caption})[0]["BLEU-4"] == pytest.approx(100)


def test_meteor_is_absent_without_java(monkeypatch, capsys):
    monkeypatch.setattr(cap.shutil, "which", lambda name: None)
    cap.meteor_scorer.cache_clear()
    try:
        metrics, _ = cap.caption_metrics(REFS, HYPS)
    finally:
        cap.meteor_scorer.cache_clear()
    assert metrics["METEOR"] is None and metrics["BLEU-1"] > 0
    assert "METEOR is not computed: it needs Java" in capsys.readouterr().err


def test_evaluation_helpers_leave_the_model_in_its_mode(tmp_path):
    """generate_captions and validation_loss run the model in eval mode (no dropout), and give it back as it was:
    in training mode mid-epoch (sample captions), in eval mode after it."""
    torch.manual_seed(0)
    vocab = cap.Vocabulary(1).build_vocab(["a red circle .", "a blue square ."])
    model = cap.Captioner(vocab, dict(decoder="lstm", embed_size=8, hidden_size=16, num_layers=1, dropout=0.5,
                                      image_size=224))
    names = ["a.jpg", "b.jpg"]
    source = cap.ImageSource(tmp_path, torch.randn(2, 2048), names)
    frame = pd.DataFrame([("a.jpg", "a red circle ."), ("b.jpg", "a blue square .")], columns=["image", "caption"])
    frame["tokens"] = frame["caption"].map(cap.Vocabulary.tokenize)
    dataset = cap.FlickrDataset(frame, vocab, source)
    cfg = cap.resolve_settings({"dataset": "flickr8k", "num_workers": 0, "batch_size": 2, "beam_size": 2,
                                "max_caption_len": 5})
    cpu = torch.device("cpu")
    for training in (True, False):
        model.train(training)
        captions = cap.generate_captions(model, source, names, cfg, cpu)
        assert model.training is training and model.decoder.drop.training is training
        assert sorted(captions) == names
        losses = [cap.validation_loss(model, dataset, cfg, cpu) for _ in range(2)]
        assert model.training is training and model.decoder.drop.training is training
        assert losses[0] == losses[1]  # no dropout inside, even when called in training mode


def test_evaluate_writes_tagged_outputs_beside_the_training_runs_own(trained_demo, demo_dirs, random_weights,
                                                                     capsys):
    own = {name: (trained_demo / name).read_bytes() for name in ("test_metrics.json", "test_captions.csv",
                                                                 "report.html")}
    assert cap.main(demo_args(demo_dirs, random_weights, trained_demo, "--evaluate", "--beam_size=2")) == 0
    printed = capsys.readouterr().out
    assert "test split, 100 images, beam 2" in printed and "CIDEr" in printed
    assert "this run scores a checkpoint of the built-in demo set" in printed and "trains" not in printed
    tagged = [trained_demo / f"{name}-best-beam2.{ext}" for name, ext in [
        ("test_metrics", "json"), ("test_captions", "csv"), ("test_captions", "json"), ("test_references", "json"),
        ("report", "html")]]
    try:
        report = json.loads(tagged[0].read_text())
        assert report["checkpoint"] == str(trained_demo / "best.pt") and report["beam_size"] == 2
        assert report["images"] == 100 and report["scale"] == 100 and 1 < report["BLEU-1"] <= 100  # x100
        assert (report["METEOR"] > 0) if shutil.which("java") else report["METEOR"] is None
        assert len(pd.read_csv(tagged[1])) == 100
        assert {name: (trained_demo / name).read_bytes() for name in own} == own  # the training run's, untouched
        assert len(json.loads(tagged[2].read_text())) == 100
        assert len(json.loads(tagged[3].read_text())["images"]) == 100
        page = tagged[4].read_text()
        rows = json.loads(page.split('type="application/json">')[1].split("</script>")[0])["rows"]
        assert len(rows) == 100 and {row["thumbnail"] for row in rows} == {
            f"report-best-beam2/{p.name}" for p in (trained_demo / "report-best-beam2").glob("*.jpg")}
    finally:
        for path in tagged:
            path.unlink(missing_ok=True)  # the shared run's folder as the other tests expect it
        shutil.rmtree(trained_demo / "report-best-beam2", ignore_errors=True)


def test_the_coco_files_give_the_scripts_figures_through_pycocotools(trained_demo):
    """test_references.json and test_captions.json load with pycocotools (COCO() and loadRes()) and
    pycocoevalcap's scorers on them give test_metrics.json's figures, x100. The captions are tokenized
    as the script does (metric_text): COCOEvalCap's PTBTokenizer would need Java, and its SPICE a
    download."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocotools.coco import COCO
    truth = COCO(str(trained_demo / "test_references.json"))
    results = truth.loadRes(str(trained_demo / "test_captions.json"))
    ids = truth.getImgIds()
    assert len(ids) == 100 and sorted(results.getImgIds()) == sorted(ids) and all(type(i) is int for i in ids)
    captions = pd.read_csv(trained_demo / "test_captions.csv", keep_default_na=False).set_index("image")
    for i in ids:  # the same images under the same ids in both files, as test_captions.csv has them
        [result] = results.imgToAnns[i]
        name = truth.imgs[i]["file_name"]
        assert result["caption"] == captions.loc[name, "caption"]
        assert " | ".join(a["caption"] for a in truth.imgToAnns[i]) == captions.loc[name, "references"]
    refs = {i: [cap.metric_text(a["caption"]) for a in truth.imgToAnns[i]] for i in ids}
    hyps = {i: [cap.metric_text(a["caption"]) for a in results.imgToAnns[i]] for i in ids}
    metrics = json.loads((trained_demo / "test_metrics.json").read_text())
    scores = dict(zip(["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"], Bleu(4).compute_score(refs, hyps)[0]))
    scores |= {"ROUGE-L": Rouge().compute_score(refs, hyps)[0], "CIDEr": Cider().compute_score(refs, hyps)[0]}
    if shutil.which("java"):
        scores["METEOR"] = cap.meteor_scorer().compute_score(refs, hyps)[0]
    assert metrics["scale"] == 100
    assert {k: 100 * v for k, v in scores.items()} == pytest.approx({k: metrics[k] for k in scores}, rel=1e-9)


def test_evaluate_takes_the_data_and_sizes_from_the_checkpoint(tmp_path, trained_demo, demo_dirs, capsys):
    """Without repeating --dataset, --demo_images, --image_size, --seed...: the checkpoint's own, so the same test
    images. Data whose training split is not the checkpoint's is refused: its test split could hold images the
    checkpoint trained on."""
    best = trained_demo / "best.pt"
    common = ["--evaluate", f"--checkpoint={best}", f"--cache_dir={demo_dirs['cache_dir']}", "--num_workers=0"]
    assert cap.main([*common, f"--output_dir={tmp_path / 'eval'}"]) == 0
    ours = pd.read_csv(tmp_path / "eval" / "test_captions-best-beam3.csv")
    pd.testing.assert_frame_equal(ours, pd.read_csv(trained_demo / "test_captions.csv"))  # images, captions, refs
    capsys.readouterr()
    # another demo set (in a folder of its own: the shared one stays as it is) splits other images for training
    other = [*common, "--demo_images=60", f"--data_dir={tmp_path / 'other'}", f"--output_dir={tmp_path / 'other_eval'}"]
    assert cap.main(other) == 2
    line = error_line(capsys.readouterr().err)
    assert f"the training split of {tmp_path / 'other'} is not the one {best} was trained on" in line
    assert not list((tmp_path / "other_eval").glob("test_*"))
    assert cap.main([*common, "--hidden_size=64", f"--output_dir={tmp_path / 'eval'}"]) == 2
    assert "--hidden_size=64, but the checkpoint was trained with hidden_size=256" in \
        error_line(capsys.readouterr().err)


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


def test_evaluate_split_in_the_other_processes_gives_no_metrics_but_the_captions(trained_run, monkeypatch):
    """Process 0 scores; the others get ({}, the captions), never None, so that every process can unpack it."""
    model, data, cfg = trained_run
    metrics, captions = cap.evaluate_split(model, data, "val", cfg, torch.device("cpu"))
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it in the second process
    assert cap.evaluate_split(model, data, "val", cfg, torch.device("cpu")) == ({}, captions)
    assert len(captions) == 100 and metrics["CIDEr"] > 0
