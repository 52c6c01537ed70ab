"""Config constants and their --name=value overrides."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SCRIPT, cap, error_line, run_script


def settings(*argv, **kw):
    return cap.resolve_settings(cap.parse_args(list(argv))[0], **kw)


def test_overrides_are_typed():
    overrides, paths = cap.parse_args(["--embed_size=64", "--learning_rate=1e-3", "--dataset=demo", "--resume",
                                       "--evaluate=false"])
    assert overrides == {"embed_size": 64, "learning_rate": 1e-3, "dataset": "demo", "resume": True,
                         "evaluate": False} and paths is None


def test_defaults_are_the_originals():
    cfg = settings("--dataset=flickr8k")
    assert (cfg.embed_size, cfg.hidden_size, cfg.num_layers, cfg.batch_size, cfg.num_epochs,
            cfg.learning_rate, cfg.freq_threshold, cfg.lr_schedule) == (400, 512, 2, 32, 2, 0.0002, 5, "constant")


def test_settings_are_frozen():
    cfg = settings("--dataset=flickr8k")
    with pytest.raises(cap.dataclasses.FrozenInstanceError):
        cfg.learning_rate = 1.0


@pytest.mark.parametrize("arg, message", [
    ("--embed_sise=3", "unrecognized arguments: --embed_sise=3 (did you mean --embed_size? valid: --dataset "),
    ("--embed_size=big", "argument --embed_size: invalid int value: 'big'"),
    ("--resume=maybe", "argument --resume: expected true or false, not 'maybe'"),
    ("--learning_rate=fast", "argument --learning_rate: invalid float value: 'fast'"),
    ("--batch_size", "argument --batch_size: expected one argument"),
    ("oops", "unrecognized arguments: oops (valid: --dataset "),
])
def test_bad_overrides_are_refused_with_one_line(arg, message):
    with pytest.raises(cap.UserError) as error:
        cap.parse_args([arg])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_an_unknown_name_lists_every_valid_one():
    with pytest.raises(cap.UserError) as error:
        cap.parse_args(["--embed_sise=3"])
    valid = str(error.value).split("valid: ")[1].rstrip(")").split()
    assert valid == [f"--{name}" for name in cap.CONFIG_NAMES] + ["--caption"]


def test_unknown_name_suggests_the_nearest_in_one_line_without_a_traceback():
    result = run_script("--num_epoch=3", timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()  # one line: no usage block, no traceback
    assert line.startswith("error: unrecognized arguments: --num_epoch=3 (did you mean --num_epochs? valid: ")


def test_help_lists_every_setting_with_its_comment_rule_default_and_preset():
    result = run_script("--help", timeout=60)
    assert result.returncode == 0 and all(f"--{name}" in result.stdout for name in cap.CONFIG_NAMES)
    text = " ".join(result.stdout.split())  # argparse wraps the help at the terminal's width
    assert "'auto': demo_accuracy on the demo, else CIDEr" in text and "off it" not in text
    assert "'random': a random ResNet50, to check the pipeline without them" in text
    assert "--num_epochs INT epochs of cross-entropy training; must be at least 1. default: 2, demo preset: 20" in text
    assert "--num_workers INT image-decoding processes; -1: one per CPU core, at most 16; must be -1 or more" in text
    assert "training:" in result.stdout and "model:" in result.stdout  # the constants' sections
    assert "cache_features" not in result.stdout and "caption_figure" not in result.stdout


def test_every_setting_has_a_comment_for_help():
    comments = cap.setting_comments()
    assert list(comments) == cap.CONFIG_NAMES and all(comment for _, comment in comments.values())
    assert comments["decoder"] == ["model", "'lstm' (Show and Tell: the pooled feature is the LSTM's first input) or "
                                            "'attention' (Show, Attend and Tell: attention over image regions)"]


def test_help_to_a_full_device_fails_in_one_line():
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, str(SCRIPT), "--help"], stdout=full, stderr=subprocess.PIPE,
                                text=True, timeout=120)
    assert result.returncode == 1 and "No space left on device" in error_line(result.stderr)


def test_help_does_not_import_torchvision():
    """torchvision pulls in torch._dynamo (about a second): --help answers without it."""
    code = (f"import runpy, sys; sys.argv = ['x', '--help']\ntry: runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
            f"except SystemExit: pass\nprint('torchvision' in sys.modules, 'torch._dynamo' in sys.modules, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stderr.split() == ["False", "False"] and "--init_from" in result.stdout


def test_caption_takes_paths():
    overrides, paths = cap.parse_args(["--caption", "a.jpg", "folder", "--beam_size=5"])
    assert paths == ["a.jpg", "folder"] and overrides == {"beam_size": 5}


def test_every_path_setting_given_relative_is_made_absolute_from_where_the_user_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = ["data_dir", "encoder_weights", "output_dir", "cache_dir", "checkpoint", "init_from"]
    given = {name: f"mine/{name}" for name in names}
    cfg = cap.resolve_settings(given)
    assert {name: getattr(cfg, name) for name in names} == {n: str(tmp_path / v) for n, v in given.items()}


def test_preset_applies_over_the_constants_and_under_the_command_line():
    cfg = settings("--dataset=demo", "--num_epochs=1")
    assert cfg.num_epochs == 1 and cfg.batch_size == cap.PRESETS["demo"]["batch_size"]
    assert cfg.image_size == cap.PRESETS["demo"]["image_size"] and cfg.embed_size == 128
    plain = settings("--dataset=demo", "--preset=none")
    assert (plain.batch_size, plain.embed_size, plain.learning_rate) == (32, 400, 0.0002)
    assert settings("--dataset=flickr8k").batch_size == 32  # no preset of its own
    other = settings("--dataset=flickr8k", "--preset=demo")  # the demo's sizes, but best_metric stays CIDEr
    assert (other.embed_size, other.best_metric, cfg.best_metric) == (128, "CIDEr", "demo_accuracy")


def test_auto_dataset_is_resolved_even_when_given(tmp_path):
    for argv in ([], ["--dataset=auto"]):  # an explicit --dataset=auto once stayed 'auto' (resources/input/auto)
        cfg = settings(*argv)
        assert cfg.dataset in ("demo", "flickr8k") and cfg.data_dir.endswith(f"resources/input/{cfg.dataset}")
    printed = []
    assert settings("--dataset=auto", f"--data_dir={tmp_path}", echo=printed.append).dataset == "flickr8k"
    assert "(--data_dir given)" in printed[0]


def test_an_edited_constant_acts_and_every_difference_is_printed(monkeypatch):
    monkeypatch.setitem(cap.DEFAULTS, "beam_size", 7)  # as if edited at the top of the script
    monkeypatch.setitem(cap.DEFAULTS, "learning_rate", 0.01)
    printed = []
    cfg = settings("--dataset=demo", "--num_epochs=1", echo=printed.append)
    assert cfg.beam_size == 7
    (text,) = printed
    assert "num_epochs      = 1" in text and "(command line)" in text
    assert "learning_rate   = 0.002" in text and "(demo preset; --preset=none keeps the constants)" in text
    assert "beam_size" not in text  # equal to its constant: nothing to say
    assert settings("--dataset=demo", "--preset=none").learning_rate == 0.01


def test_import_has_no_side_effects(tmp_path):
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import flickr_image_caption_with_pytorch_resnet_lstm"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0 and result.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arg, message", [("--batch_size=0", "--batch_size=0: must be at least 1"),
                                          ("--beam_size=0", "must be at least 1"),
                                          ("--max_images=-1", "--max_images=-1: must be 0 or more"),
                                          ("--learning_rate=nan", "--learning_rate=nan: must be a positive"),
                                          ("--learning_rate=-1", "--learning_rate=-1.0: must be a positive"),
                                          ("--learning_rate=inf", "--learning_rate=inf: must be a positive"),
                                          ("--dropout=2", "--dropout=2.0: must be at least 0 and below 1"),
                                          ("--seed=100000000000000000", "--seed=100000000000000000: must be"),
                                          ("--lr_schedule=linear", "--lr_schedule=linear: must be 'constant' or"),
                                          ("--preset=huge", "--preset=huge: must be 'auto', 'none' or a preset"),
                                          ("--dataset=mnist", "--dataset=mnist: must be auto, demo, flickr8k"),
                                          ("--warmup_steps=-5", "must be 0 or more"),
                                          ("--best_metric=cidr", "--best_metric=cidr: did you mean CIDEr? must be 'CIDEr'"),
                                          ("--best_metric=demo_accuracy", "or, on the demo, 'demo_accuracy'"),
                                          ("--learning_rate=1e308", "--learning_rate=1e+308: must be a positive "
                                                                    "number up to 1, such as 0.0002"),
                                          ("--learning_rate=1.5", "--learning_rate=1.5: must be a positive number"),
                                          ("--device=meta", "--device=meta: must be auto, cpu, cuda, cuda:N or mps"),
                                          ("--device=cuda:x", "--device=cuda:x: must be auto, cpu, cuda, cuda:N"),
                                          ("--cache_dir=", "--cache_dir=: must be a folder, such as resources/cache"),
                                          ("--num_workers=-2", "--num_workers=-2: must be -1 or more"),
                                          ("--scst_samples=21", "--scst_samples=21: must be from 1 to 20"),
                                          ("--scst_samples=1", "--scst_samples=1: must be from 1 to 20"),  # mean
                                          ("--output_dir=/", "--output_dir=/: a run writes a dozen files there"),
                                          (f"--output_dir={ROOT}", f"--output_dir={ROOT}: a run writes a dozen"),
                                          (f"--output_dir={Path.home()}/.", f"--output_dir={Path.home()}: a run")])
def test_impossible_values_are_refused(arg, message):
    with pytest.raises(cap.UserError, match=re.escape(message)) as error:
        settings("--dataset=flickr8k", arg)
    assert "\n" not in str(error.value)


def test_the_highest_learning_rate_and_each_device_name_are_accepted():
    assert settings("--dataset=flickr8k", "--learning_rate=1").learning_rate == 1
    for name in ("auto", "cpu", "mps", "cuda", "cuda:1"):  # whether this machine has one is pick_device's question
        assert settings("--dataset=flickr8k", f"--device={name}").device == name


@pytest.mark.parametrize("arg", ["--learning_rate=1e308", "--device=meta"])
def test_a_huge_learning_rate_or_the_meta_device_is_one_line_before_any_work(arg, tmp_path, capsys):
    assert cap.main(["--dataset=demo", arg, f"--data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'out'}"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {arg.replace('1e308', '1e+308')}: must be") and captured.out == ""
    assert len(captured.err.splitlines()) == 1 and list(tmp_path.iterdir()) == []  # no demo set, no output folder


def test_the_demo_needs_30_images_and_other_datasets_ignore_demo_images():
    with pytest.raises(cap.UserError, match=re.escape("--demo_images=29: must be at least 30 on the demo")):
        settings("--dataset=demo", "--demo_images=29")
    assert settings("--dataset=demo", "--demo_images=30").demo_images == 30
    assert settings("--dataset=flickr8k", "--demo_images=29").demo_images == 29


def test_demo_output_inside_its_data_folder_is_refused(tmp_path):
    with pytest.raises(cap.UserError, match="lies in the demo's data folder"):
        settings("--dataset=demo", f"--data_dir={tmp_path}", f"--output_dir={tmp_path}")
    with pytest.raises(cap.UserError, match="lies in the demo's data folder"):
        settings("--dataset=demo", f"--data_dir={tmp_path}", f"--output_dir={tmp_path / 'out'}")
    settings("--dataset=demo", f"--data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'out'}")


def test_bad_settings_give_one_line_before_any_work(tmp_path):
    result = run_script("--dataset=demo", "--learning_rate=nan", f"--data_dir={tmp_path / 'data'}", timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --learning_rate=nan")
    assert not (tmp_path / "data").exists()  # refused before the demo set was made


def test_devices_are_checked():
    for name in ("quantum", "cuda:01", "cuda:128"):  # torch.device refuses the second and wraps the third to -128
        with pytest.raises(cap.UserError, match=re.escape(f"--device={name}: must be auto, cpu, cuda, cuda:N")):
            settings("--dataset=flickr8k", f"--device={name}")
    if not cap.torch.cuda.is_available():
        with pytest.raises(cap.UserError, match="no CUDA GPU"):
            cap.pick_device("cuda")
    if not cap.torch.backends.mps.is_available():
        with pytest.raises(cap.UserError, match="no Apple GPU"):
            cap.pick_device("mps")
    assert cap.pick_device("cpu").type == "cpu"


def test_num_workers_minus_one_and_scst_samples_up_to_20_are_accepted():
    assert settings("--dataset=flickr8k").num_workers == -1  # one per CPU core, at most 16
    assert settings("--dataset=flickr8k", "--scst_samples=20").scst_samples == 20
    assert settings("--dataset=flickr8k", "--scst_samples=1", "--scst_baseline=greedy").scst_samples == 1


def test_the_key_lists_say_what_a_checkpoint_decides():
    assert cap.MODEL_ARGS == ("decoder", "embed_size", "hidden_size", "num_layers", "dropout", "image_size")
    assert cap.RESUME_FIXED[:len(cap.MODEL_ARGS)] == cap.MODEL_ARGS and "max_train_caption_len" in cap.RESUME_FIXED
    assert set(cap.RESUME_FIXED + cap.THIS_COMMAND) <= set(cap.CONFIG_NAMES)
    assert not set(cap.RESUME_FIXED) & set(cap.THIS_COMMAND)
    assert "num_epochs" not in cap.RESUME_FIXED + cap.THIS_COMMAND  # taken from the checkpoint, and changeable
    assert not hasattr(cap, "cache_features") and not hasattr(cap, "caption_figure")


def trained(**changes):
    """A checkpoint's settings as resolve_settings takes them: all but THIS_COMMAND's."""
    cfg = settings("--dataset=demo", "--data_dir=/tmp/demo-data", "--output_dir=/tmp/demo-out")
    values = {n: getattr(cfg, n) for n in cap.CONFIG_NAMES if n not in cap.THIS_COMMAND}
    return values | changes


def test_a_checkpoints_settings_come_under_the_command_line():
    cfg = settings("--learning_rate=0.001", trained=trained(num_epochs=7, decoder="attention", beam_size=2))
    assert (cfg.num_epochs, cfg.decoder, cfg.beam_size, cfg.learning_rate) == (7, "attention", 2, 0.001)
    assert cfg.dataset == "demo" and cfg.data_dir == "/tmp/demo-data"
    printed = []
    settings("--learning_rate=0.001", trained=trained(), echo=printed.append)
    assert "learning_rate   = 0.001" in printed[0] and "(command line; the checkpoint's: 0.002)" in printed[0]
    assert "embed_size" not in printed[0]  # the checkpoint's own: no news


@pytest.mark.parametrize("args, name", [(["--hidden_size=64"], "hidden_size"), (["--decoder=attention"], "decoder"),
                                        (["--resume", "--max_train_caption_len=5"], "max_train_caption_len"),
                                        (["--resume", "--batch_size=8"], "batch_size"),
                                        (["--resume", "--label_smoothing=0.1"], "label_smoothing")])
def test_a_command_line_that_contradicts_the_checkpoint_where_it_cannot_is_refused(args, name):
    with pytest.raises(cap.UserError, match=f"^--{name}=") as error:
        settings(*args, trained=trained())
    assert f"trained with {name}=" in str(error.value)


def test_evaluate_and_caption_may_decode_otherwise_than_the_checkpoint():
    """Decoding changes no weight: --evaluate and --caption (no --resume) override the checkpoint's options."""
    decoding = ["--beam_size=5", "--length_penalty=0.7", "--block_trigrams", "--learned_endings", "--suppress_unk=false"]
    cfg = settings(*decoding, trained=trained())
    assert (cfg.beam_size, cfg.length_penalty, cfg.block_trigrams, cfg.learned_endings, cfg.suppress_unk) == \
        (5, 0.7, True, True, False)
    assert settings("--label_smoothing=0.1", trained=trained()).label_smoothing == 0.1  # --init_from's new run
    for bad in ["--label_smoothing=1", "--label_smoothing=-0.1", "--length_penalty=-1"]:
        with pytest.raises(cap.UserError, match=bad.split("=")[0]):
            settings("--dataset=flickr8k", bad)


def test_outside_a_resume_the_data_and_batches_may_differ_from_the_checkpoints():
    cfg = settings("--batch_size=8", "--max_train_caption_len=5", trained=trained())  # --evaluate, --caption
    assert (cfg.batch_size, cfg.max_train_caption_len) == (8, 5)


def test_a_value_in_another_case_is_taken_and_a_near_miss_named(capsys):
    """--dataset=flickr8K is flickr8k; --dataset=flickr8 gets the nearest value, as a mistyped name does."""
    cfg = settings("--dataset=Flickr8K", "--decoder=LSTM", "--best_metric=cider", "--preset=NONE")
    assert (cfg.dataset, cfg.decoder, cfg.best_metric, cfg.preset) == ("flickr8k", "lstm", "CIDEr", "none")
    assert cfg.data_dir == str(cap.ROOT / "resources/input/flickr8k")
    assert cap.main(["--dataset=flickr8", "--output_dir=/tmp/never-made"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: --dataset=flickr8: did you mean flickr8k? must be auto, demo")
    for arg, near in [("--decoder=atention", "attention"), ("--scst_baseline=greddy", "greedy"),
                      ("--lr_schedule=cosin", "cosine"), ("--caption_format=jsn", "json")]:
        with pytest.raises(cap.UserError, match=f"did you mean {near}\\? must be"):
            settings("--dataset=flickr8k", arg)

