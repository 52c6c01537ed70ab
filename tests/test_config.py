"""Config constants and their --name=value overrides."""
import subprocess
import sys

import pytest

from conftest import ROOT, cap, run_script


def test_overrides_are_typed():
    cfg, paths = cap.parse_args(["--embed_size=64", "--learning_rate=1e-3", "--dataset=demo", "--resume",
                                 "--cache_features=false"])
    assert (cfg["embed_size"], cfg["learning_rate"], cfg["dataset"]) == (64, 1e-3, "demo")
    assert cfg["resume"] is True and cfg["cache_features"] is False and paths is None
    assert cfg["_explicit"] == sorted(["embed_size", "learning_rate", "dataset", "resume", "cache_features"])


def test_defaults_are_the_originals():
    cfg, _ = cap.parse_args([])
    assert (cfg["embed_size"], cfg["hidden_size"], cfg["num_layers"], cfg["batch_size"], cfg["num_epochs"],
            cfg["learning_rate"], cfg["freq_threshold"]) == (400, 512, 2, 32, 2, 0.0002, 5)


@pytest.mark.parametrize("arg, message", [
    ("--embed_sise=3", "unrecognized arguments: --embed_sise=3"),
    ("--embed_size=big", "argument --embed_size: invalid int value: 'big'"),
    ("--resume=maybe", "argument --resume: expected true or false"),
    ("--learning_rate=fast", "argument --learning_rate: invalid float value"),
    ("--batch_size", "argument --batch_size: expected one argument"),
    ("oops", "unrecognized arguments: oops"),
])
def test_bad_overrides_are_refused(arg, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cap.parse_args([arg])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_unknown_name_lists_the_valid_ones_without_a_traceback():
    result = run_script("--embed_sise=3", timeout=60)
    assert result.returncode == 2
    assert "unrecognized arguments: --embed_sise=3" in result.stderr and "--embed_size" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_every_setting():
    result = run_script("--help", timeout=60)
    assert result.returncode == 0 and all(f"--{name}" in result.stdout for name in cap.CONFIG_NAMES)


def test_caption_takes_paths():
    cfg, paths = cap.parse_args(["--caption", "a.jpg", "folder", "--beam_size=5"])
    assert paths == ["a.jpg", "folder"] and cfg["beam_size"] == 5


def test_demo_settings_apply_unless_given():
    cfg, _ = cap.parse_args(["--dataset=demo", "--num_epochs=1"])
    cap.resolve_settings(cfg)
    assert cfg["num_epochs"] == 1 and cfg["batch_size"] == cfg["demo_batch_size"]
    assert cfg["image_size"] == cfg["demo_image_size"]


def test_import_has_no_side_effects(tmp_path):
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import flickr_image_caption_with_pytorch_resnet_lstm"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0 and result.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arg, message", [("--batch_size=0", "--batch_size=0: must be at least 1"),
                                          ("--beam_size=0", "must be at least 1"),
                                          ("--max_images=-1", "--max_images=-1: must be 0 or more")])
def test_impossible_values_are_refused(arg, message):
    cfg, _ = cap.parse_args([arg])
    with pytest.raises(cap.UserError, match=message):
        cap.resolve_settings(cfg)


def test_devices_are_checked():
    with pytest.raises(cap.UserError, match="expected auto, cpu, cuda"):
        cap.pick_device("quantum")
    if not cap.torch.cuda.is_available():
        with pytest.raises(cap.UserError, match="no CUDA GPU"):
            cap.pick_device("cuda")
    assert cap.pick_device("cpu").type == "cpu"
