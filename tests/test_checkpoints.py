"""Checkpoints: what one holds, what refuses one, and how a checkpoint's settings drive every mode."""
import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch

from PIL import Image

from conftest import SCRIPT, TINY_DEMO, cap, error_line, rewritten, run_script


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="module")
def tiny(base, random_weights):
    """The arguments of a tiny demo, in folders of its own."""
    return [*TINY_DEMO, f"--data_dir={base / 'data'}", f"--cache_dir={base / 'cache'}",
            f"--encoder_weights={random_weights}", "--num_epochs=1", "--max_batches_per_epoch=3"]


def an_image(base):
    return sorted((base / "data" / "Images").iterdir())[0]


@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("lstm")
    assert cap.main([*tiny, f"--output_dir={out}"]) == 0
    return out


def refused(capsys, *args):
    """The one error line of cap.main(args), which must exit with 2 (a UserError)."""
    code = cap.main(list(map(str, args)))
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == "" or "--caption" not in args  # --caption's stdout holds only captions
    return error_line(err)


def caption_with(capsys, base, checkpoint):
    return refused(capsys, "--caption", an_image(base), f"--checkpoint={checkpoint}", "--num_workers=0")


def test_a_checkpoint_is_one_flat_dict_that_rebuilds_its_model(lstm_run):
    ckpt = torch.load(lstm_run / "best.pt", weights_only=True)
    assert set(ckpt) == {"model_args", "model", "vocab", "endings", "config", "optimizer", "epoch", "step", "best_score", "metrics_scale",
                         "best_step", "best_epoch", "best_metric", "history", "loss_sum", "loss_count", "reward_sum", "greedy_sum", "rng_state", "cuda_rng_state",
                         "processes", "encoder_weights", "encoder_weights_sha256", "train_images_sha256",
                         "model_sha256"}
    assert ckpt["model_sha256"] == cap.model_sha256(ckpt)
    assert ckpt["model_args"] == {name: ckpt["config"][name] for name in cap.MODEL_ARGS}
    model, restored = cap.restore(lstm_run / "best.pt")
    assert restored["path"] == lstm_run / "best.pt" and model.args == ckpt["model_args"]
    assert model.vocab.itos == ckpt["vocab"] and restored["epoch"] == ckpt["epoch"] == 1
    assert model.vocab.endings == ckpt["endings"] and "." in ckpt["endings"]  # learned_endings' list
    for name, tensor in ckpt["model"].items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_a_checkpoint_damaged_on_disk_is_refused_naming_it(tmp_path, lstm_run, base, capsys):
    damaged = tmp_path / "damaged.pt"
    data = bytearray((lstm_run / "best.pt").read_bytes())
    middle = len(data) // 2  # inside the weights: torch.load itself reads it without complaint
    data[middle:middle + 100] = bytes(range(100))
    damaged.write_bytes(bytes(data))
    assert f"checkpoint {damaged} is damaged" in caption_with(capsys, base, damaged)


def zero_the_weights_and_drop_the_checksum(ckpt):
    for tensor in ckpt["model"].values():
        tensor.zero_()
    del ckpt["model_sha256"]


def swap_two_words(ckpt):
    ckpt["vocab"][4], ckpt["vocab"][5] = ckpt["vocab"][5], ckpt["vocab"][4]


@pytest.mark.parametrize("change, rehash", [(zero_the_weights_and_drop_the_checksum, False),
                                            (swap_two_words, False)], ids=["no-checksum", "swapped-words"])
def test_a_checkpoint_without_its_checksum_or_changed_is_refused(tmp_path, lstm_run, base, capsys, change, rehash):
    path = rewritten(lstm_run / "best.pt", tmp_path / "changed.pt", change, rehash)
    assert f"checkpoint {path} is damaged" in caption_with(capsys, base, path)


def config_item(name, value):
    return lambda ckpt: ckpt["config"].__setitem__(name, value)


@pytest.mark.parametrize("change, named", [
    (config_item("image_size", "abc"), "image_size='abc'"),
    (lambda ckpt: ckpt.__setitem__("config", list(ckpt["config"].items())), "TypeError"),
    (config_item("encoder_weights", 7), "encoder_weights=7"),
    (config_item("scst_samples", 0), "--scst_samples=0"),  # the command line's rules too
    (lambda ckpt: ckpt["model_args"].__setitem__("hidden_size", 300), "model_args"),
    (lambda ckpt: ckpt["model_args"].__setitem__("heads", 4), "model_args"),
    (lambda ckpt: ckpt["model"].__setitem__("decoder.extra", torch.zeros(2)), "decoder.extra"),
    (lambda ckpt: ckpt["model"].__setitem__("decoder.to_vocab.bias", torch.zeros(3)), "decoder.to_vocab.bias"),
    (lambda ckpt: ckpt["vocab"].__setitem__(3, "<unk>"), "<UNK>"),
], ids=["string-size", "config-list", "int-weights", "rule", "other-args", "extra-arg", "extra-weight",
        "weight-shape", "specials"])
def test_a_checkpoint_whose_checksum_matches_but_whose_contents_are_wrong_is_one_line(tmp_path, lstm_run, base,
                                                                                      capsys, change, named):
    path = rewritten(lstm_run / "best.pt", tmp_path / "tampered.pt", change)
    line = caption_with(capsys, base, path)
    assert f"checkpoint {path} is damaged" in line and named in line


def test_a_checkpoint_from_before_a_command_setting_existed_still_loads(tmp_path, lstm_run):
    """Settings of how a command runs (THIS_COMMAND, such as caption_format) are never taken from a checkpoint: one
    written before such a setting existed loads, with the setting at its default."""
    path = rewritten(lstm_run / "best.pt", tmp_path / "older.pt", lambda ckpt: ckpt["config"].pop("caption_format"))
    _, ckpt = cap.restore(path)
    assert ckpt["config"]["caption_format"] == "text"
    trained = rewritten(lstm_run / "best.pt", tmp_path / "no-seed.pt", lambda ckpt: ckpt["config"].pop("seed"))
    with pytest.raises(cap.UserError, match="KeyError: 'seed'"):  # a trained-on setting is still required
        cap.restore(trained)


def test_checkpoint_while_training_is_refused_naming_resume_and_init_from(tmp_path, lstm_run, tiny, capsys):
    out = tmp_path / "out"
    line = refused(capsys, *tiny, f"--output_dir={out}", f"--checkpoint={lstm_run / 'best.pt'}")
    assert line.startswith("error: --checkpoint=") and "--resume" in line and "--init_from" in line
    assert not out.exists()  # before any work
    line = refused(capsys, *tiny, f"--output_dir={lstm_run}", "--resume", f"--init_from={lstm_run / 'best.pt'}")
    assert line.startswith("error: --init_from=")


def test_init_from_starts_a_new_run_from_a_checkpoints_weights(tmp_path, lstm_run, tiny, capsys, monkeypatch):
    ckpt = torch.load(lstm_run / "best.pt", weights_only=True)
    out = tmp_path / "out"
    monkeypatch.setattr(cap, "learning_rate_at", lambda step, total_steps, cfg: 0.0)  # Adam moves nothing
    assert cap.main([*tiny, f"--output_dir={out}", f"--init_from={lstm_run / 'best.pt'}"]) == 0
    assert "starting from the weights of" in capsys.readouterr().out
    started = torch.load(out / "last.pt", weights_only=True)
    assert started["step"] == 3 and started["epoch"] == 1  # its own counters, from 0
    for name, tensor in ckpt["model"].items():  # its weights and feature statistics, exactly
        assert torch.equal(started["model"][name], tensor), name
    first = pd.read_csv(out / "loss_per_batch.csv")["loss"].iloc[0]
    assert first < pd.read_csv(lstm_run / "loss_per_batch.csv")["loss"].iloc[0]  # not a random start


def test_init_from_with_another_vocabulary_or_model_shape_is_refused(tmp_path, lstm_run, tiny, capsys):
    best = lstm_run / "best.pt"
    line = refused(capsys, *tiny, f"--output_dir={tmp_path / 'a'}", f"--init_from={best}", "--freq_threshold=50",
                   f"--cache_dir={tmp_path / 'no-cache'}")
    assert line.startswith(f"error: --init_from={best}: its vocabulary")
    assert not list((tmp_path / "no-cache").glob("features-*"))  # refused before any image was read
    line = refused(capsys, *tiny, f"--output_dir={tmp_path / 'b'}", f"--init_from={best}", "--hidden_size=32")
    assert line.startswith("error: --hidden_size=32, but the checkpoint was trained with hidden_size=64")


def test_resume_adds_scst_to_a_finished_attention_run_with_its_own_settings(tmp_path, base, tiny, capsys):
    """No --decoder, no --num_epochs: both come from the checkpoint, and no cross-entropy epoch is retrained."""
    out = tmp_path / "attention"
    assert cap.main([*tiny, f"--output_dir={out}", "--decoder=attention"]) == 0
    capsys.readouterr()
    cache = f"--cache_dir={base / 'cache'}"  # this command's, not the checkpoint's
    assert cap.main(["--resume", f"--output_dir={out}", "--scst_epochs=1", cache, "--num_workers=0"]) == 0
    printed = capsys.readouterr().out
    assert "(command line; the checkpoint's: 0)" in printed  # scst_epochs
    epochs = pd.read_csv(out / "loss_per_epoch.csv")
    assert epochs["phase"].tolist() == ["cross-entropy", "self-critical"]
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["config"]["decoder"] == "attention" and last["config"]["num_epochs"] == 1
    line = refused(capsys, "--resume", f"--output_dir={out}", "--num_epochs=3", cache)
    assert line.startswith("error: --num_epochs=3: ") and "last.pt" in line  # its SCST steps were taken


def test_a_run_from_before_metrics_were_stored_x100_is_not_resumed_but_can_be_started_from(tmp_path, lstm_run, tiny,
                                                                                           capsys):
    """Its CSVs and best_score hold fractions: going on would mix two scales in one run's files."""
    out = tmp_path / "older"
    out.mkdir()
    for name in ["last.pt", "loss_per_epoch.csv", "loss_per_batch.csv"]:
        (out / name).write_bytes((lstm_run / name).read_bytes())
    rewritten(lstm_run / "last.pt", out / "last.pt", lambda ckpt: ckpt.pop("metrics_scale"))
    line = refused(capsys, *tiny, f"--output_dir={out}", "--resume")
    assert "older version" in line and f"--init_from={out / 'last.pt'}" in line
    assert cap.main([*tiny, f"--output_dir={tmp_path / 'new'}", f"--init_from={out / 'last.pt'}"]) == 0


def test_caption_writes_beside_its_checkpoint(tmp_path, lstm_run, base):
    image = an_image(base)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "best.pt").write_bytes((lstm_run / "best.pt").read_bytes())
    assert cap.main(["--caption", str(image), f"--checkpoint={folder / 'best.pt'}", "--num_workers=0"]) == 0
    assert (folder / "report-captions.html").is_file()


def test_a_fresh_run_sets_aside_only_the_files_an_earlier_run_recorded_as_its_own(tmp_path):
    """Those its config.json lists; a file the run would write over that no run recorded is refused, and nothing
    is moved. Claiming the folder clears what a killed run left half-written, and only that."""
    for name in ["features-0123.pt", "features-0123.pt.lock", "best.pt", "best-xe.pt", "last.pt", "report.html",
                 "report-best-beam3.html", "notes.txt"]:
        (tmp_path / name).write_text("x")
    (tmp_path / "report").mkdir()  # the page's thumbnails
    (tmp_path / "last.pt.4242.tmp").write_text("half")  # a killed run's
    (tmp_path / "features-0123.pt.77.tmp").write_text("half")  # another run's cache, being written
    (tmp_path / "writing-k1ll9" / "0").parent.mkdir()  # write_whole's staging, left by a kill -9
    (tmp_path / "writing-k1ll9" / "0").write_text("half a page")
    cap.claim_output_dir(tmp_path).close()
    before = sorted(p.name for p in tmp_path.iterdir())
    assert "last.pt.4242.tmp" not in before and "writing-k1ll9" not in before and "features-0123.pt.77.tmp" in before
    with pytest.raises(cap.UserError, match=r"holds best.pt, best-xe.pt, last.pt, report.html, report, which no run"):
        cap.set_aside_earlier_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    (tmp_path / "config.json").write_text(json.dumps({"outputs": cap.RUN_OUTPUTS}))
    cap.set_aside_earlier_run(tmp_path)
    (aside,) = tmp_path.glob("previous-*")
    assert sorted(p.name for p in aside.iterdir()) == ["best-xe.pt", "best.pt", "config.json", "last.pt", "report",
                                                      "report.html"]
    assert sorted(p.name for p in tmp_path.iterdir() if p != aside) == [
        ".lock", "features-0123.pt", "features-0123.pt.77.tmp", "features-0123.pt.lock", "notes.txt",
        "report-best-beam3.html"]


def test_a_refused_fresh_run_leaves_its_output_dir_as_it_found_it(tmp_path, lstm_run, tiny, capsys):
    out = shutil.copytree(lstm_run, tmp_path / "out")
    before = sorted(p.name for p in out.iterdir())
    line = refused(capsys, *tiny, f"--output_dir={out}", "--dataset=flickr8k", f"--data_dir={tmp_path / 'typo'}")
    assert "does not exist" in line and sorted(p.name for p in out.iterdir()) == before


def test_init_from_the_output_dirs_own_best_pt_reads_it_before_setting_it_aside(tmp_path, lstm_run, tiny, capsys):
    out = shutil.copytree(lstm_run, tmp_path / "out")
    assert cap.main([*tiny, f"--output_dir={out}", f"--init_from={out / 'best.pt'}"]) == 0
    assert "starting from the weights of" in capsys.readouterr().out
    (previous,) = out.glob("previous-*")
    assert (previous / "best.pt").read_bytes() == (lstm_run / "best.pt").read_bytes()


@pytest.mark.parametrize("key, mode", [("optimizer", "--resume"), ("best_epoch", "--resume"),
                                       ("train_images_sha256", "--evaluate"), ("encoder_weights_sha256", "--caption"),
                                       ("encoder_weights_sha256", "--init_from")])
def test_a_checkpoint_lacking_a_key_its_mode_reads_is_one_line(tmp_path, lstm_run, base, tiny, capsys, key, mode):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("best.pt", "last.pt"):
        rewritten(lstm_run / name, out / name, lambda ckpt: ckpt.pop(key))
    args = {"--resume": [*tiny, f"--output_dir={out}", "--resume"],
            "--evaluate": [*tiny, f"--output_dir={out}", "--evaluate"],
            "--caption": ["--caption", an_image(base), f"--checkpoint={out / 'best.pt'}", "--num_workers=0"],
            "--init_from": [*tiny, f"--output_dir={tmp_path / 'new'}", f"--init_from={out / 'best.pt'}"]}[mode]
    line = refused(capsys, *args)
    assert f"is damaged or not one of this script's (KeyError: '{key}')" in line
    if mode == "--resume":  # only --resume reads it: the other modes still load such a checkpoint
        assert cap.restore(out / "last.pt")[1]["epoch"] == 1


def test_every_caption_path_is_captioned_and_a_name_that_is_not_utf8_is_escaped(tmp_path, lstm_run, base):
    """--caption A --caption B captions both; a file name with the byte 0xff is escaped on stdout, in JSON and on
    the page, and the run completes. (Here, as lstm_run is the cheapest trained checkpoint.)"""
    plain, odd = tmp_path / "a.png", tmp_path / os.fsdecode(b"b\xff.png")
    for path in [plain, odd]:
        Image.open(an_image(base)).save(path)
    escaped = f"{tmp_path}/b\\udcff.png"
    for form in ("text", "json"):
        result = run_script("--caption", plain, "--caption", odd, f"--checkpoint={lstm_run / 'best.pt'}",
                            f"--output_dir={tmp_path / form}", f"--caption_format={form}", "--num_workers=0")
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
        lines = result.stdout.splitlines()
        if form == "json":
            assert [json.loads(line)["path"] for line in lines] == [str(plain), escaped]
        else:
            assert [line.split("\t")[0] for line in lines] == [str(plain), escaped]
        assert "b\\udcff.png" in (tmp_path / form / "report-captions.html").read_text()


def test_captions_to_a_full_device_a_reader_gone_or_a_memory_cap_end_in_one_line(lstm_run, base):
    """> /dev/full: one line and exit 1; | head -n 0: quiet, exit 141 as cat's; a beam that cannot fit under
    ulimit -v: one line naming the settings that size memory."""
    args = [sys.executable, str(SCRIPT), "--caption", str(an_image(base)), f"--checkpoint={lstm_run / 'best.pt'}",
            "--num_workers=0"]
    with open("/dev/full", "w") as full:
        result = subprocess.run(args, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert result.returncode == 1 and "No space left on device" in error_line(result.stderr)
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # the reader has gone before the first caption
    err = process.stderr.read()
    assert process.wait(timeout=300) == 141 and "error" not in err and "Traceback" not in err, err[-2000:]
    capped = subprocess.run(["bash", "-c", 'ulimit -v 8000000 && exec "$@"', "bash", *args, "--beam_size=100000000"],
                            capture_output=True, text=True, timeout=300)
    line = error_line(capped.stderr)
    assert capped.returncode == 1 and "out of memory" in line and "--beam_size" in line, capped.stderr[-2000:]


def test_a_copy_of_the_script_without_resources_writes_every_output_but_the_page(tmp_path, lstm_run, tiny):
    """Users copy single-file scripts: without resources/report.html beside it, the test report is written all the
    same, and a warning says that no page was. (--evaluate, which writes the test report a run ends with.)"""
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(SCRIPT, alone)
    out = shutil.copytree(lstm_run, tmp_path / "out")
    result = subprocess.run([sys.executable, str(alone / SCRIPT.name), *tiny, f"--output_dir={out}", "--evaluate"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"warning: no report-best-beam1.html: its template {alone / 'resources'}" in result.stderr
    assert (out / "test_metrics-best-beam1.json").is_file() and not (out / "report-best-beam1.html").exists()


def test_the_resume_hint_runs_as_printed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["x.py", "--num_epochs=3", "--resume"])
    assert cap.resume_hint(tmp_path, 7, 1) == 130
    hint = capsys.readouterr().out.splitlines()[-1]
    assert hint == f"  .venv/bin/python {cap.Path(cap.__file__).name} --num_epochs=3 --resume"
