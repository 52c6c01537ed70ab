"""End-to-end training on the demo set, resume after kill -9 and Ctrl-C, checkpoints, the output folder."""
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from conftest import ROOT, SCRIPT, TINY_DEMO, cap, demo_args, error_line, run_script, shared

OUTPUTS = ["loss_per_batch.csv", "loss_per_epoch.csv", "loss_graph.png", "metrics_graph.png", "vocab.json",
           "config.json", "last.pt", "best.pt", "test_metrics.json", "test_captions.csv", "test_captions.json",
           "report.html"]


def test_label_smoothing_is_its_formula_in_training_and_the_validation_loss_stays_plain():
    """(1 - eps) * -log p(target) + eps * mean over the vocabulary of -log p, averaged over the words, never <PAD>."""
    from test_models import model_args
    torch.manual_seed(0)
    model = cap.Captioner(cap.Vocabulary(1).build_vocab(["a b c d"]), model_args(dropout=0.0))
    model.label_smoothing = 0.2
    inputs = torch.randn(2, 2048)
    captions = torch.tensor([[1, 4, 5, 6, 2], [1, 7, 2, 0, 0]])  # <SOS> ... <EOS> <PAD>
    loss, logits, targets = model.train()(inputs, captions)
    logp = logits.log_softmax(-1)  # (2, 4, V)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (2, 4)
    words = targets != cap.Vocabulary.PAD
    assert loss.item() == pytest.approx(((1 - 0.2) * nll - 0.2 * logp.mean(-1))[words].mean().item())
    assert model.eval()(inputs, captions)[0].item() == pytest.approx(nll[words].mean().item())  # validation's


def test_demo_run_writes_every_output(trained_demo):
    for name in OUTPUTS:
        assert (trained_demo / name).is_file() and (trained_demo / name).stat().st_size > 0, name
    epochs = pd.read_csv(trained_demo / "loss_per_epoch.csv")
    assert list(epochs["epoch"]) == list(range(1, 17))  # SMALL_DEMO trains 16 epochs
    for column in ["train_loss", "val_loss", "val_token_accuracy", "BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr",
                   "epoch_seconds", "eval_seconds"]:
        assert epochs[column].notna().all(), column
    assert epochs["train_loss"].iloc[-1] < epochs["train_loss"].iloc[0]
    # the demo's best.pt: the last epoch of the highest share of val images captioned fully right
    best = torch.load(trained_demo / "best.pt", weights_only=True)
    assert best["config"]["best_metric"] == "demo_accuracy" and epochs["demo_accuracy"].between(0, 100).all()
    assert best["epoch"] == epochs["epoch"][epochs["demo_accuracy"][::-1].idxmax()]
    assert best["best_score"] == epochs["demo_accuracy"].max()  # x100, as the CSV stores it
    # every metric is stored x100, as test_metrics.json and the page show them: a trained demo
    # predicts more than 1% of the next words right, so a fraction would be at most 1
    assert epochs["val_token_accuracy"].iloc[-1] > 1 and epochs["CIDEr"].max() > 1
    batches = pd.read_csv(trained_demo / "loss_per_batch.csv")
    assert list(batches["step"]) == list(range(1, len(batches) + 1))
    captions = pd.read_csv(trained_demo / "test_captions.csv")
    assert set(captions.columns) == {"image", "caption", "references", "CIDEr", "BLEU-4", "right"}
    assert len(captions) == 100 and captions["right"].dtype == bool
    # each image's CIDEr: their mean is the split's, as coco-caption computes both
    metrics = json.loads((trained_demo / "test_metrics.json").read_text())
    assert captions["CIDEr"].mean() == pytest.approx(metrics["CIDEr"], rel=1e-9)
    demo = {"demo_accuracy", "demo_colour_shape_accuracy", "demo_two_shape_accuracy"}
    assert demo <= set(epochs.columns) and demo <= set(metrics)  # each demo figure one name, val and test
    coco = json.loads((trained_demo / "test_captions.json").read_text())  # COCO's results format
    assert [c["caption"] for c in coco] == captions["caption"].fillna("").tolist()
    assert all(isinstance(c["image_id"], int) for c in coco)  # COCO's ids: test_references.json has the same


def test_checkpoint_loads_without_pickle(trained_demo):
    ckpt = torch.load(trained_demo / "best.pt", weights_only=True)
    assert "batch" not in ckpt  # the step says it
    assert ckpt["model_sha256"] == cap.model_sha256(ckpt)  # a checksum of the model's weights and settings
    data = cap.load_captions(ckpt["config"]["data_dir"], ckpt["config"]["seed"])[0]
    assert ckpt["train_images_sha256"] == cap.names_sha256(data.loc[data["split"] == "train", "image"].unique())
    assert ckpt["model_args"] == {"decoder": "lstm", "embed_size": 128, "hidden_size": 256, "num_layers": 1,
                                  "dropout": 0.3, "image_size": 96}
    assert not any("resnet." in k for k in ckpt["model"])  # the backbone comes from its own file
    assert ckpt["vocab"] == json.loads((trained_demo / "vocab.json").read_text())["itos"]
    ran = json.loads((trained_demo / "config.json").read_text())
    assert ran["encoder_weights"] == ckpt["encoder_weights"]  # the ResNet50 file that was used
    assert {k: v for k, v in ckpt["config"].items() if k != "encoder_weights"} == \
        {k: v for k, v in ran.items() if k not in ("encoder_weights", "outputs")}
    assert set(ran["outputs"]) >= {*OUTPUTS, "report"}  # what a later fresh run sets aside


def quick_args(demo_dirs, weights, out, *extra):
    return demo_args(demo_dirs, weights, out, "--num_epochs=3", "--max_batches_per_epoch=12", "--lr_schedule=cosine",
                     "--warmup_steps=5", "--beam_size=1", *extra)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_dirs, random_weights, trained_demo):
    out = tmp_path_factory.mktemp("whole")
    assert cap.main(quick_args(demo_dirs, random_weights, out)) == 0
    return out


def assert_same_run(out, reference):
    for name in ["loss_per_batch.csv", "loss_per_epoch.csv"]:
        ours, theirs = pd.read_csv(out / name), pd.read_csv(reference / name)
        drop = [c for c in ours.columns if c.endswith("seconds")]
        pd.testing.assert_frame_equal(ours.drop(columns=drop), theirs.drop(columns=drop), rtol=1e-5)
    ours, theirs = torch.load(out / "last.pt", weights_only=True), torch.load(reference / "last.pt", weights_only=True)
    for key, value in theirs["model"].items():
        assert torch.allclose(ours["model"][key], value, atol=1e-6), key


def test_max_batches_per_epoch_stops_early(uninterrupted):
    batches = pd.read_csv(uninterrupted / "loss_per_batch.csv")
    assert batches.groupby("epoch").size().tolist() == [12, 12, 12]


def test_the_learning_rate_follows_its_schedule(uninterrupted):
    cfg = cap.resolve_settings(cap.parse_args(["--dataset=flickr8k", "--learning_rate=0.01", "--warmup_steps=4",
                                               "--lr_schedule=cosine"])[0])
    rates = [cap.learning_rate_at(step, 20, cfg) for step in range(1, 21)]
    assert rates[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert rates[4] == pytest.approx(0.005 * (1 + math.cos(math.pi / 16)))  # 1 of the 16 steps after warm-up
    assert all(a > b for a, b in zip(rates[3:], rates[4:])) and rates[-1] == pytest.approx(0, abs=1e-12)
    constant = cap.resolve_settings(cap.parse_args(["--dataset=flickr8k"])[0])
    assert {cap.learning_rate_at(step, 20, constant) for step in range(1, 21)} == {0.0002}  # the original's
    batches = pd.read_csv(uninterrupted / "loss_per_batch.csv")
    demo = cap.resolve_settings(cap.parse_args(quick_args({"data_dir": "d", "cache_dir": "c"}, "w", "o"))[0])
    assert batches["lr"].tolist() == pytest.approx([cap.learning_rate_at(s, 36, demo) for s in batches["step"]])


def start_training(args):
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(condition, process, seconds=240):
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None, "training ended before the test could interrupt it"
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_resume_after_kill_9_matches_an_uninterrupted_run(tmp_path, demo_dirs, random_weights, uninterrupted,
                                                           capsys):
    out = tmp_path / "out"
    process = start_training(quick_args(demo_dirs, random_weights, out))
    wait_for(lambda: (out / "last.pt").exists(), process)
    process.kill()  # SIGKILL: no chance to clean up
    process.wait()
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] >= 1
    assert cap.main(quick_args(demo_dirs, random_weights, out, "--resume")) == 0  # in process: quicker
    assert "resuming from" in capsys.readouterr().out
    assert_same_run(out, uninterrupted)


def test_ctrl_c_saves_mid_epoch_and_resumes_exactly(tmp_path, demo_dirs, random_weights, uninterrupted):
    out = tmp_path / "out"
    process = start_training(quick_args(demo_dirs, random_weights, out, "--log_every=1"))
    batch_log = out / "loss_per_batch.csv"
    wait_for(lambda: batch_log.exists() and len(batch_log.read_text().splitlines()) >= 4, process)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output[-2000:]
    assert "--resume" in output and "interrupted: saved" in output
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] >= 3
    assert cap.main(quick_args(demo_dirs, random_weights, out, "--log_every=1", "--resume")) == 0
    assert_same_run(out, uninterrupted)


def test_mismatched_checkpoint_is_explained(demo_dirs, random_weights, uninterrupted, capsys):
    assert cap.main(quick_args(demo_dirs, random_weights, uninterrupted, "--resume", "--hidden_size=64")) == 2
    assert "--hidden_size=64, but the checkpoint was trained with hidden_size=256" in capsys.readouterr().err
    assert cap.main(quick_args(demo_dirs, random_weights, uninterrupted, "--resume", "--freq_threshold=1")) == 2
    assert "--freq_threshold=1, but the checkpoint was trained with freq_threshold=5" in capsys.readouterr().err
    assert cap.main(quick_args(demo_dirs, random_weights, uninterrupted, "--resume", "--best_metric=CIDEr")) == 2
    assert "--best_metric=CIDEr, but the checkpoint was trained with best_metric=demo_accuracy" in \
        capsys.readouterr().err


def test_resume_without_checkpoint_says_how_to_train(tmp_path, demo_dirs, random_weights, capsys):
    assert cap.main(quick_args(demo_dirs, random_weights, tmp_path / "none", "--resume")) == 2
    error = capsys.readouterr().err
    assert "no checkpoint at" in error and "train one first" in error


def test_a_run_that_finds_the_cache_trains_exactly_like_the_run_that_made_it(tmp_path, random_weights):
    common = ["--dataset=demo", "--demo_images=60", "--image_size=64", "--num_epochs=1",
              "--max_batches_per_epoch=5", "--batch_size=16", "--embed_size=32", "--hidden_size=64",
              "--sample_every=0", "--num_workers=2", "--beam_size=1", f"--data_dir={tmp_path / 'data'}",
              f"--cache_dir={tmp_path / 'cache'}", f"--encoder_weights={random_weights}"]
    assert cap.main([*common, f"--output_dir={tmp_path / 'cold'}"]) == 0
    assert cap.main([*common, f"--output_dir={tmp_path / 'warm'}"]) == 0
    cold, warm = (pd.read_csv(tmp_path / name / "loss_per_batch.csv") for name in ("cold", "warm"))
    assert len(cold) == 5
    pd.testing.assert_frame_equal(cold, warm, rtol=0, atol=0)


def test_best_metric_val_loss_keeps_the_lowest_validation_loss(tmp_path, random_weights):
    out = tmp_path / "out"
    assert cap.main(["--dataset=demo", "--demo_images=60", "--image_size=64", "--num_epochs=3", "--batch_size=16",
                     "--embed_size=32", "--hidden_size=64", "--sample_every=0", "--num_workers=0", "--beam_size=1",
                     "--best_metric=val_loss", f"--data_dir={tmp_path / 'data'}", f"--cache_dir={tmp_path / 'cache'}",
                     f"--encoder_weights={random_weights}", f"--output_dir={out}"]) == 0
    epochs, best = pd.read_csv(out / "loss_per_epoch.csv"), torch.load(out / "best.pt", weights_only=True)
    assert best["best_score"] == pytest.approx(-epochs["val_loss"].min())
    assert best["epoch"] == epochs["epoch"][epochs["val_loss"][::-1].idxmin()]


def test_one_short_epoch_on_real_flickr8k_jpegs(tmp_path, capsys):
    """Without the ImageNet download: --encoder_weights=random, and every output says what that means."""
    data = shared("flickr8k-mini")
    args = ["--dataset=flickr8k", f"--data_dir={data}", "--encoder_weights=random",
            f"--output_dir={tmp_path / 'out'}", f"--cache_dir={tmp_path / 'cache'}", "--image_size=96",
            "--num_epochs=1", "--max_batches_per_epoch=8", "--embed_size=32", "--hidden_size=64",
            "--freq_threshold=2", "--sample_every=4", "--num_workers=2"]
    assert cap.main(args) == 0
    epochs = pd.read_csv(tmp_path / "out" / "loss_per_epoch.csv")
    assert len(epochs) == 1 and epochs["train_loss"].iloc[0] > 0 and epochs["CIDEr"].notna().all()
    report = json.loads((tmp_path / "out" / "test_metrics.json").read_text())
    assert report["images"] == 30 and "demo_colour_shape_accuracy" not in report
    captions = pd.read_csv(tmp_path / "out" / "test_captions.csv")
    assert captions["references"].str.count(r" \| ").eq(4).all()  # five real references per image
    label = "random ResNet50 (pipeline check only; captions meaningless)"
    printed = capsys.readouterr()
    assert f"warning: no ImageNet weights: the encoder is a {label}" in printed.err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["encoder"] == label
    assert f"encoder: {label}; trained on flickr8k" in (tmp_path / "out" / "report.html").read_text()
    assert "demo only" not in printed.out + printed.err
    assert re.search(r"features: 300 images in .* s \(.*, 2 decoding processes\)", printed.out)  # README: Training


def test_missing_weights_name_the_download_its_sha256_and_the_random_encoder(tmp_path):
    cfg = cap.resolve_settings({"dataset": "flickr8k", "encoder_weights": str(tmp_path / "absent.pth")})
    with pytest.raises(cap.UserError) as error:
        cap.encoder_weights_file(cfg)
    message = str(error.value)
    assert message.startswith(f"ResNet50 weights {tmp_path / 'absent.pth'} not found: run ./setup.sh") and "\n" not in message
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in message
    assert "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a" in message
    assert "--encoder_weights=random" in message and "captions meaningless" in message


def contents(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def copy_run(source, target):
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".lock"))
    return target


def test_resume_applies_a_changed_learning_rate_and_records_it(tmp_path, demo_dirs, random_weights, uninterrupted,
                                                               capsys):
    out = copy_run(uninterrupted, tmp_path / "out")
    assert cap.main(quick_args(demo_dirs, random_weights, out, "--resume", "--num_epochs=4",
                               "--learning_rate=0.001")) == 0
    printed = capsys.readouterr().out
    assert "learning_rate   = 0.001" in printed and "(command line; the checkpoint's: 0.002)" in printed
    assert "num_epochs      = 4" in printed and "(command line; the checkpoint's: 3)" in printed
    batches = pd.read_csv(out / "loss_per_batch.csv")
    cfg = cap.resolve_settings(cap.parse_args(quick_args(demo_dirs, random_weights, out, "--num_epochs=4",
                                                         "--learning_rate=0.001"))[0])
    fourth = batches[batches["epoch"] == 4]
    assert len(fourth) == 12 and fourth["lr"].tolist() == pytest.approx(
        [cap.learning_rate_at(s, 48, cfg) for s in fourth["step"]])
    assert fourth["lr"].max() < 0.001 / 2  # the new rate, on the cosine's tail
    for recorded in (json.loads((out / "config.json").read_text()), torch.load(out / "last.pt")["config"]):
        assert recorded["learning_rate"] == 0.001 and recorded["num_epochs"] == 4


def test_a_diverging_loss_stops_the_run_and_keeps_the_good_checkpoint(tmp_path, demo_dirs, random_weights,
                                                                       uninterrupted, monkeypatch, capsys):
    out = copy_run(uninterrupted, tmp_path / "out")
    before = (out / "last.pt").read_bytes(), (out / "best.pt").read_bytes()
    # a rate that blows the model up, which --learning_rate (at most 1) no longer accepts, so given to every step
    monkeypatch.setattr(cap, "learning_rate_at", lambda step, total_steps, cfg: 1e9)
    assert cap.main(quick_args(demo_dirs, random_weights, out, "--resume", "--num_epochs=4")) == 2
    error = error_line(capsys.readouterr().err)  # a UserError: one line, no traceback
    assert "error: the training loss diverged at epoch 4, step" in error and "lower --learning_rate" in error
    assert ((out / "last.pt").read_bytes(), (out / "best.pt").read_bytes()) == before
    fresh = tmp_path / "fresh"
    assert cap.main(quick_args(demo_dirs, random_weights, fresh)) == 2
    assert "error: the training loss diverged at epoch 1, step" in error_line(capsys.readouterr().err)
    assert not (fresh / "last.pt").exists() and not (fresh / "best.pt").exists()


def test_a_second_run_into_a_busy_output_dir_is_refused(tmp_path, demo_dirs, random_weights, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); "
                               f"import flickr_image_caption_with_pytorch_resnet_lstm as c; "
                               f"lock = c.claim_output_dir({str(out)!r}); print('locked', flush=True); "
                               f"import time; time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cap.main(quick_args(demo_dirs, random_weights, out)) == 2
        assert f"another run (process {holder.pid}) is writing to {out}" in capsys.readouterr().err
    finally:
        holder.kill()  # kill -9: the kernel drops its lock
        holder.wait()
    lock = cap.claim_output_dir(out)  # no stale lock left behind
    lock.close()


@pytest.mark.parametrize("where", ["file", "under_file", "refused", "symlink_loop"])
def test_an_unusable_output_dir_is_one_line(tmp_path, demo_dirs, random_weights, capsys, where):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "loop").symlink_to("loop")
    out = {"file": tmp_path / "afile", "under_file": tmp_path / "afile" / "out", "refused": Path("/sys/captions"),
           "symlink_loop": tmp_path / "loop"}
    if where == "refused" and not Path("/sys").is_dir():
        pytest.skip("no /sys here to refuse a folder")
    assert cap.main(quick_args(demo_dirs, random_weights, out[where])) == 2
    assert f"error: cannot write to --output_dir={out[where]}" in capsys.readouterr().err


def test_a_resume_clears_what_a_killed_run_left_half_written(tmp_path, demo_dirs, random_weights, uninterrupted):
    out = copy_run(uninterrupted, tmp_path / "out")
    (out / "loss_per_batch.csv").write_text("")  # killed before its first row reached the disk
    stale = [out / "last.pt.4242.tmp", out / "best.pt.4243.tmp", out / "last.pt.tmp"]  # the last: older versions'
    for path in stale:
        path.write_bytes(b"half a checkpoint")  # killed while saving
    assert cap.main(quick_args(demo_dirs, random_weights, out, "--resume", "--num_epochs=4")) == 0
    assert pd.read_csv(out / "loss_per_batch.csv")["epoch"].unique().tolist() == [4]
    assert not [p.name for p in out.glob("*.tmp")]


def test_a_failed_save_leaves_no_temporary_file_and_the_old_one_intact(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    cap.atomic_save({"x": torch.ones(3)}, path)

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cap.torch, "save", full_disk)
    with pytest.raises(cap.UserError, match="cannot write .*best.pt: No space left on device"):
        cap.atomic_save({"x": torch.zeros(3)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]
    assert torch.equal(torch.load(path)["x"], torch.ones(3))


def test_an_empty_vocabulary_is_refused_before_any_feature_is_computed(tmp_path, demo_dirs, random_weights, capsys):
    args = quick_args({**demo_dirs, "cache_dir": tmp_path / "cache"}, random_weights, tmp_path / "out")
    assert cap.main([*args, "--freq_threshold=100000"]) == 2
    assert "--freq_threshold=100000 leaves no word in the vocabulary" in capsys.readouterr().err
    assert [p.name[:7] for p in (tmp_path / "cache").iterdir()] == ["tokens-"]  # the captions' tokens alone


def test_a_changed_checkpoint_fails_its_checksum(tmp_path, demo_dirs, random_weights, uninterrupted, capsys):
    out = copy_run(uninterrupted, tmp_path / "out")
    ckpt = torch.load(out / "last.pt", weights_only=True)
    ckpt["model"]["encoder.embed.bias"][0] += 1  # a flipped bit, an edit: its sha256 no longer matches
    torch.save(ckpt, out / "last.pt")
    assert cap.main(quick_args(demo_dirs, random_weights, out, "--resume", "--num_epochs=4")) == 2
    assert f"checkpoint {out / 'last.pt'} is damaged" in error_line(capsys.readouterr().err)


def test_resume_after_the_captions_changed_is_refused(tmp_path, random_weights, capsys):
    data = tmp_path / "data"
    args = [*TINY_DEMO, f"--data_dir={data}", f"--cache_dir={tmp_path / 'cache'}",
            f"--encoder_weights={random_weights}", f"--output_dir={tmp_path / 'out'}", "--num_epochs=1",
            "--max_batches_per_epoch=2"]
    assert cap.main(args) == 0
    with open(data / "captions.txt", "a") as f:  # a new word, often enough to enter the vocabulary
        f.writelines(f"demo_00000.jpg,a purple circle number {i} .\n" for i in range(6))
    assert cap.main([*args, "--resume", "--num_epochs=2"]) == 2
    assert "has a different vocabulary" in error_line(capsys.readouterr().err)


def test_a_fresh_run_sets_an_earlier_run_aside_and_a_resume_goes_on_from_the_new_one(tmp_path, demo_dirs,
                                                                                      random_weights, uninterrupted,
                                                                                      capsys):
    out = copy_run(uninterrupted, tmp_path / "out")
    earlier, entries = contents(out), len(list(out.iterdir()))
    process = start_training(quick_args(demo_dirs, random_weights, out, "--log_every=1"))  # no --resume: fresh

    def aside():
        return list(out.glob("previous-*"))

    batch_log = out / "loss_per_batch.csv"
    wait_for(lambda: aside() and len(list(aside()[0].iterdir())) == entries and batch_log.exists()
             and len(batch_log.read_text().splitlines()) >= 3, process)
    process.send_signal(signal.SIGINT)  # the fresh run stopped early, as a user would stop it
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output[-2000:]
    (previous,) = aside()
    assert f"{out} held an earlier run: its files are now in {previous}" in output
    assert contents(previous) == earlier  # all of it, byte for byte, the results page's thumbnails too
    stopped = torch.load(out / "last.pt", weights_only=True)
    assert pd.read_csv(batch_log)["step"].tolist() == list(range(1, stopped["step"] + 1))  # the new run's alone
    if stopped["epoch"] == 0:  # stopped before its first validation, as it nearly always is
        assert not (out / "best.pt").exists() and not (out / "loss_per_epoch.csv").exists()
    assert not any((out / name).exists() for name in ("test_metrics.json", "test_captions.csv", "report.html",
                                                     "loss_graph.png", "metrics_graph.png"))
    assert cap.main(quick_args(demo_dirs, random_weights, out, "--log_every=1", "--resume", "--num_epochs=1")) == 0
    assert f"epoch {stopped['epoch']} done, step {stopped['step']}" in capsys.readouterr().out  # not the old run's
    assert pd.read_csv(batch_log)["step"].tolist() == list(range(1, 13))
    assert pd.read_csv(out / "loss_per_epoch.csv")["epoch"].tolist() == [1]
    assert (out / "test_metrics.json").is_file() and aside() == [previous]
    assert contents(previous) == earlier


def test_ctrl_c_during_the_last_validation_stops_before_the_test_report(tmp_path, demo_dirs, random_weights,
                                                                        monkeypatch, capsys):
    out = tmp_path / "out"
    real = cap.evaluate_split

    def ctrl_c_while_validating(model, data, split, cfg, device):
        if split == "val":  # the one epoch's validation: the last
            os.kill(os.getpid(), signal.SIGINT)  # a real signal, to the handler the run installed
        return real(model, data, split, cfg, device)

    monkeypatch.setattr(cap, "evaluate_split", ctrl_c_while_validating)
    args = quick_args(demo_dirs, random_weights, out, "--num_epochs=1", "--max_batches_per_epoch=3")
    assert cap.main(args) == 130
    printed = capsys.readouterr().out
    assert f"interrupted: saved {out / 'last.pt'} at step 3" in printed and "--resume" in printed
    assert "test split" not in printed
    assert not any((out / name).exists() for name in ("test_metrics.json", "test_captions.csv", "report.html"))
    stopped = torch.load(out / "last.pt", weights_only=True)
    assert (stopped["epoch"], stopped["step"]) == (1, 3)
    monkeypatch.undo()
    assert cap.main([*args, "--resume"]) == 0  # what is left: the test report
    assert json.loads((out / "test_metrics.json").read_text())["images"] == 100
    assert pd.read_csv(out / "loss_per_epoch.csv")["epoch"].tolist() == [1]  # validated once


# a kill -9 at each instant of an epoch's end: after last.pt, after best.pt, after the epoch's row
KILL_AT = {
    "last.pt": "save_checkpoint, lambda path, *a: path.name == 'last.pt'",
    "best.pt": "save_checkpoint, lambda path, *a: path.name == 'best.pt'",
    "row": "write_history, lambda out, *a: True",  # loss_per_epoch.csv and the graphs
}


@pytest.mark.parametrize("instant", KILL_AT)
def test_a_kill_9_around_an_epochs_end_resumes_exactly(tmp_path, demo_dirs, random_weights, uninterrupted,
                                                         instant):
    """The process dies (os._exit: no clean-up) right after the first epoch's file is written."""
    out = tmp_path / "out"
    args = quick_args(demo_dirs, random_weights, out)
    name, when = KILL_AT[instant].split(", ", 1)
    code = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import {SCRIPT.stem} as cap
real = cap.{name}
def dying(path, *args):
    real(path, *args)
    if ({when})(path, *args):
        os._exit(9)
cap.{name} = dying
sys.exit(cap.main({[str(a) for a in args]!r}))
"""
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert cap.main([*args, "--resume"]) == 0
    assert_same_run(out, uninterrupted)
    best = torch.load(out / "best.pt", weights_only=True)
    reference = torch.load(uninterrupted / "best.pt", weights_only=True)
    assert best["step"] == reference["step"]


@pytest.mark.parametrize("setting, message", [
    ("--output_dir=/", "--output_dir=/: a run writes a dozen files there"),
    (f"--output_dir={ROOT}", f"--output_dir={ROOT}: a run writes a dozen files there"),
    (f"--output_dir={ROOT / 'resources'}", f"--output_dir={ROOT / 'resources'}: a run writes"),
    ("--cache_dir=", "--cache_dir=: must be a folder")])
def test_the_root_or_the_project_as_output_dir_and_an_empty_cache_dir_are_refused(tmp_path, random_weights, capsys,
                                                                                  setting, message):
    before = sorted(os.listdir("/")), sorted(os.listdir(ROOT))
    assert cap.main([*TINY_DEMO, f"--data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'out'}",
                     f"--cache_dir={tmp_path / 'cache'}", f"--encoder_weights={random_weights}", setting]) == 2
    assert error_line(capsys.readouterr().err).startswith(f"error: {message}")
    assert list(tmp_path.iterdir()) == [] and (sorted(os.listdir("/")), sorted(os.listdir(ROOT))) == before


def test_a_resume_with_fewer_epochs_than_done_only_reports(tmp_path, demo_dirs, random_weights, uninterrupted):
    out = copy_run(uninterrupted, tmp_path / "out")
    before = (out / "last.pt").read_bytes()
    assert cap.main(quick_args(demo_dirs, random_weights, out, "--resume", "--num_epochs=2")) == 0  # 3 done
    assert (out / "last.pt").read_bytes() == before  # no epoch trained
    assert pd.read_csv(out / "loss_per_epoch.csv")["epoch"].tolist() == [1, 2, 3]


def test_a_fresh_run_sets_aside_only_what_a_run_writes(tmp_path, demo_dirs, random_weights, uninterrupted):
    out = copy_run(uninterrupted, tmp_path / "out")
    (out / "notes").mkdir()  # the user's, or a cache_dir inside output_dir: never moved
    (out / "notes" / "todo.txt").write_text("keep me")
    process = start_training(quick_args(demo_dirs, random_weights, out, "--log_every=1"))
    wait_for(lambda: list(out.glob("previous-*")) and (out / "loss_per_batch.csv").exists(), process)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    (previous,) = out.glob("previous-*")
    assert (out / "notes" / "todo.txt").read_text() == "keep me" and not (previous / "notes").exists()
    assert {"best.pt", "last.pt", "loss_per_epoch.csv", "test_metrics.json", "report.html", "report"} <= {
        p.name for p in previous.iterdir()}


def test_scst_added_to_a_finished_run_keeps_its_cross_entropy_results(tmp_path, random_weights, capsys):
    out = tmp_path / "out"
    args = [*TINY_DEMO, "--num_epochs=1", "--max_batches_per_epoch=4", f"--data_dir={tmp_path / 'data'}",
            f"--cache_dir={tmp_path / 'cache'}", f"--encoder_weights={random_weights}", f"--output_dir={out}"]
    assert cap.main(args) == 0
    cross_entropy = json.loads((out / "test_metrics.json").read_text())
    capsys.readouterr()
    assert cap.main([*args, "--resume", "--scst_epochs=1"]) == 0
    assert "run's: best-xe.pt, report-xe.html, test_*-xe.*" in capsys.readouterr().out.splitlines()[-1]  # outputs
    kept = json.loads((out / "test_metrics-xe.json").read_text())
    assert {k: v for k, v in kept.items() if k not in ("checkpoint", "seconds")} == \
        {k: v for k, v in cross_entropy.items() if k not in ("checkpoint", "seconds")}
    assert (out / "report-xe.html").is_file() and (out / "report.html").is_file()
    xe, scst = (torch.load(out / name, weights_only=True) for name in ("best-xe.pt", "best.pt"))
    assert xe["epoch"] == 1 and scst["epoch"] == 2  # SCST's best beside the cross-entropy one


def test_an_scst_epoch_whose_every_reward_is_0_is_warned_about(capsys):
    progress = cap.Progress(epoch=2, loss_sum=-3.0, loss_count=4)
    run = SimpleNamespace(progress=progress, cfg=SimpleNamespace(num_epochs=1))
    figures = cap.epoch_training_figures(run)
    assert figures["phase"] == "self-critical" and figures["reward"] == 0
    assert "reward was 0" in capsys.readouterr().err
    progress.reward_sum = 1.0
    cap.epoch_training_figures(run)
    assert "reward" not in capsys.readouterr().err


def test_a_log_that_is_not_a_terminal_has_plain_lines_and_no_progress_bars(tmp_path, random_weights):
    """Piped to a file: a line every log_every steps, as nanoGPT prints them; no \\r or cursor codes."""
    result = run_script(*TINY_DEMO, "--num_epochs=1", "--max_batches_per_epoch=4", "--log_every=2",
                        f"--data_dir={tmp_path / 'data'}", f"--cache_dir={tmp_path / 'cache'}",
                        f"--encoder_weights={random_weights}", f"--output_dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr[-2000:]
    log = result.stdout + result.stderr
    assert "\r" not in log and "\x1b[" not in log
    assert [line.split(" (")[0] for line in result.stdout.splitlines() if line.startswith("step ")] == \
        ["step 2", "step 4"]


def test_config_json_names_the_random_resnet50_the_demo_used(tmp_path):
    """Without the ImageNet file the demo uses a random ResNet50, and says so in config.json."""
    args = [*TINY_DEMO, "--num_epochs=1", "--max_batches_per_epoch=2", f"--data_dir={tmp_path / 'data'}",
            f"--cache_dir={tmp_path / 'cache'}",
            f"--output_dir={tmp_path / 'out'}"]
    if (ROOT / cap.encoder_weights).is_file():
        pytest.skip("the ImageNet weights are here: the demo uses them")
    assert cap.main(args) == 0
    ran = json.loads((tmp_path / "out" / "config.json").read_text())
    assert ran["encoder"] == "random ResNet50 (pipeline check only; captions meaningless)"
    assert ran["encoder_weights"] == str(cap.DEMO_WEIGHTS.resolve())


def test_a_resume_rewrites_a_lost_or_damaged_epoch_log_from_last_pt_and_names_lost_step_rows(
        tmp_path, demo_dirs, random_weights, uninterrupted, capsys):
    """last.pt holds every epoch's row: loss_per_epoch.csv is written whole from it. The per-step
    log is too large for that: its lost rows are named in a warning, and the run goes on."""
    out = copy_run(uninterrupted, tmp_path / "out")
    (out / "loss_per_epoch.csv").write_bytes(bytes(range(256)) * 4)  # garbage, not UTF-8
    (out / "loss_per_batch.csv").unlink()
    assert cap.main(quick_args(demo_dirs, random_weights, out, "--resume")) == 0  # 3 of 3 done
    printed = capsys.readouterr()
    assert "nothing is left to train" in printed.out
    assert "held the rows of 0 of the 36 steps taken" in printed.err and "Traceback" not in printed.err
    epochs, reference = (pd.read_csv(d / "loss_per_epoch.csv") for d in (out, uninterrupted))
    assert epochs["epoch"].dtype == "int64" and epochs["epoch"].tolist() == [1, 2, 3]
    pd.testing.assert_frame_equal(epochs, reference)
    # rows edited by hand, an epoch that never ran and one without a number: rewritten, not trusted
    reference.assign(epoch=[1, None, 99]).to_csv(out / "loss_per_epoch.csv", index=False)
    (out / "loss_per_batch.csv").write_bytes(b"\xff\xfe garbage")
    assert cap.main(quick_args(demo_dirs, random_weights, out, "--resume")) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "loss_per_epoch.csv"), reference)
    assert (out / "loss_per_batch.unreadable.csv").read_bytes() == b"\xff\xfe garbage"  # kept aside


OPENS = """
import os, sys
sys.path.insert(0, {root!r})
opened = {{}}
def count(event, args):
    if event == "open" and isinstance(args[0], (str, os.PathLike)):
        name = os.path.basename(os.fspath(args[0]))
        if name in ("last.pt", "shapes.csv"):
            opened[name] = opened.get(name, 0) + 1
sys.addaudithook(count)
import flickr_image_caption_with_pytorch_resnet_lstm as cap
assert cap.main({args!r}) == 0
print("opened", opened)
"""


@pytest.mark.parametrize("mode", ["--resume", "--evaluate"])
def test_a_run_reads_its_checkpoint_and_the_demos_shapes_once(tmp_path, demo_dirs, random_weights, uninterrupted,
                                                               mode):
    """Counted by an audit hook on open(): at most one read and one format check of each."""
    out = copy_run(uninterrupted, tmp_path / "out")
    args = quick_args(demo_dirs, random_weights, out, mode)
    result = subprocess.run([sys.executable, "-c", OPENS.format(root=str(ROOT), args=args)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    opened = eval(result.stdout.splitlines()[-1].removeprefix("opened "))
    assert opened.get("shapes.csv", 0) <= 2 and opened.get("last.pt", 0) <= 2, opened
    assert opened.get("shapes.csv", 0) >= 1 and (mode == "--evaluate" or opened.get("last.pt", 0) >= 1)
