"""--caption: captioning new images with a trained checkpoint."""
import itertools
import json
import shutil

import pytest
import torch
import torchvision
from PIL import Image

from conftest import cap, rewritten, run_script


def test_caption_a_folder_with_a_good_image_a_text_file_and_a_corrupt_jpeg(tmp_path, trained_demo, demo_dirs):
    folder = tmp_path / "photos"
    folder.mkdir()
    source = sorted((demo_dirs["data_dir"] / "Images").iterdir())[0]
    Image.open(source).save(folder / "good.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    checkpoint = tmp_path / "run" / "best.pt"
    checkpoint.parent.mkdir()
    shutil.copy(trained_demo / "best.pt", checkpoint)
    result = run_script("--caption", folder, f"--checkpoint={checkpoint}", "--device=cpu")
    lines = result.stdout.strip().splitlines()
    assert result.returncode != 0
    assert len(lines) == 1 and lines[0].startswith(str(folder / "good.png") + "\t") and lines[0].split("\t")[1]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors == [f"error: cannot read image {folder / 'broken.jpg'}"]
    assert "notes.txt" not in result.stdout + result.stderr
    assert f"captioning with {checkpoint}" in result.stderr  # the checkpoint used, named
    page = checkpoint.parent / "report-captions.html"  # beside its checkpoint: never another run's folder
    assert f"results page: {page}" in result.stderr and "good.png" in page.read_text()


def test_the_page_goes_to_output_dir_when_one_is_given(tmp_path, trained_demo, demo_dirs, capsys):
    out = tmp_path / "pages"
    code, _, err = caption(capsys, demo_image(demo_dirs), f"--checkpoint={trained_demo / 'best.pt'}",
                           f"--output_dir={out}")
    assert code == 0 and (out / "report-captions.html").is_file(), err


def test_caption_an_image_file_works_without_the_dataset(tmp_path, trained_demo, demo_dirs):
    image = tmp_path / "one.jpg"
    Image.open(sorted((demo_dirs["data_dir"] / "Images").iterdir())[1]).save(image)
    result = run_script("--caption", image, f"--checkpoint={trained_demo / 'best.pt'}",
                        f"--data_dir={tmp_path / 'no-dataset-here'}")
    assert result.returncode == 0, result.stderr[-2000:]
    path, caption = result.stdout.strip().split("\t")
    assert path == str(image) and any(colour in caption for colour in cap.DEMO_COLOURS)


def test_missing_checkpoint_says_how_to_train(tmp_path):
    result = run_script("--caption", tmp_path, f"--checkpoint={tmp_path / 'best.pt'}")
    assert result.returncode == 2 and "train one first" in result.stderr and "Traceback" not in result.stderr


def test_missing_weights_for_captioning_name_the_file(tmp_path, trained_demo, demo_dirs, capsys):
    image = sorted((demo_dirs["data_dir"] / "Images").iterdir())[0]
    assert cap.main(["--caption", str(image), f"--checkpoint={trained_demo / 'best.pt'}",
                     f"--encoder_weights={tmp_path / 'absent.pth'}"]) == 2
    assert f"error: ResNet50 weights {tmp_path / 'absent.pth'} not found" in capsys.readouterr().err


def test_an_attention_model_draws_each_words_attention_map(tmp_path, trained_attention, demo_dirs, monkeypatch,
                                                           capsys):
    image = sorted((demo_dirs["data_dir"] / "Images").iterdir())[0]
    drawn, real = [], cap.word_maps
    monkeypatch.setattr(cap, "word_maps", lambda *args: drawn.append(real(*args)) or drawn[-1])
    assert cap.main(["--caption", str(image), f"--checkpoint={trained_attention / 'best.pt'}", "--decoder=attention",
                     f"--output_dir={tmp_path}", "--num_workers=0"]) == 0
    caption = capsys.readouterr().out.strip().split("\t")[1]
    (maps,) = drawn[0].values()
    assert [word for word, _ in maps] == caption.split()  # one map per word, in order
    assert all(m.shape == (3, 3) and abs(m.sum() - 1) < 1e-4 for _, m in maps)  # 96 px: a 3x3 grid
    assert (tmp_path / "report-captions.html").stat().st_size > 0


def test_a_checkpoint_of_the_other_decoder_is_refused_naming_the_setting(trained_demo, demo_dirs, capsys):
    image = sorted((demo_dirs["data_dir"] / "Images").iterdir())[0]
    assert cap.main(["--caption", str(image), f"--checkpoint={trained_demo / 'best.pt'}", "--decoder=attention"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: --decoder=attention, but the checkpoint was trained with decoder=lstm")


# --- helpers for the tests below --------------------------------------------------------------------------------
def demo_image(demo_dirs, i=0):
    return sorted((demo_dirs["data_dir"] / "Images").iterdir())[i]


def caption(capsys, *args):
    """cap.main(['--caption', *args]) in this process: (exit code, stdout, stderr). A UserError is exit 2; any
    other exception would propagate, with its traceback."""
    code = cap.main(["--caption", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def refusal(err):
    """The one error line of a refused run; the settings echo may come before it, nothing else."""
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


def setting(name, value):
    return lambda ckpt: ckpt["model_args"].__setitem__(name, value)


# --- checkpoints that are not what they claim: one line each, before any image is read ---------------------------
def test_a_checkpoint_with_overwritten_bytes_is_refused_in_one_line(tmp_path, trained_demo, demo_dirs):
    damaged = tmp_path / "best.pt"
    data = bytearray((trained_demo / "best.pt").read_bytes())
    middle = len(data) // 2  # inside the weights: torch.load itself reads it without complaint
    data[middle:middle + 100] = bytes(range(100))
    damaged.write_bytes(bytes(data))
    result = run_script("--caption", demo_image(demo_dirs), f"--checkpoint={damaged}", timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: checkpoint {damaged} is damaged") and len(result.stderr.splitlines()) == 1


def test_tampering_without_recomputing_the_checksum_is_caught(tmp_path, trained_demo, demo_dirs, capsys):
    def swap_two_words(ckpt):  # a plausible checkpoint still: only the checksum can tell
        vocab = ckpt["vocab"]
        vocab[4], vocab[5] = vocab[5], vocab[4]
    path = rewritten(trained_demo / "best.pt", tmp_path / "swapped.pt", swap_two_words, rehash=False)
    code, out, err = caption(capsys, demo_image(demo_dirs), f"--checkpoint={path}")
    assert (code, out) == (2, "") and err.startswith(f"error: checkpoint {path} is damaged")
    rewritten(trained_demo / "best.pt", path, swap_two_words)  # the same change with the checksum redone is read
    assert caption(capsys, demo_image(demo_dirs), f"--checkpoint={path}")[0] == 0


@pytest.mark.parametrize("change, problem", [
    (setting("attention_heads", 4), "model_args"),
    (lambda ckpt: ckpt["model_args"].pop("dropout"), "model_args"),
    (setting("embed_size", -128), "model_args"),
    (setting("num_layers", 0), "model_args"),
    (setting("hidden_size", True), "model_args"),
    (setting("dropout", "0.3"), "model_args"),
    (setting("decoder", "transformer"), "model_args"),
    (lambda ckpt: ckpt["vocab"].__setitem__(3, "<unk>"), "<UNK>"),
    (lambda ckpt: ckpt.__setitem__("vocab", ckpt["vocab"][4:]), "<UNK>"),
], ids=["extra-model-arg", "missing-model-arg", "negative-size", "zero-layers", "bool-size",
        "string-dropout", "unknown-decoder", "renamed-special", "no-specials"])
def test_a_tampered_checkpoint_is_refused_in_one_line(tmp_path, trained_demo, demo_dirs, capsys, change, problem):
    path = rewritten(trained_demo / "best.pt", tmp_path / "tampered.pt", change)
    code, out, err = caption(capsys, demo_image(demo_dirs), f"--checkpoint={path}")
    assert (code, out) == (2, "") and len(err.splitlines()) == 1
    assert err.startswith(f"error: checkpoint {path} is damaged") and problem in err


@pytest.mark.parametrize("change, mismatch", [
    (lambda ckpt: ckpt["model"].__setitem__("decoder.to_vocab.weight", torch.zeros(36, 255)),
     "size mismatch for decoder.to_vocab.weight: copying a param with shape torch.Size([36, 255])"),
    (lambda ckpt: ckpt.__setitem__("vocab", ckpt["vocab"][:-3]),  # shorter than the model's output layer
     "size mismatch for decoder.embed.weight: copying a param with shape torch.Size([36, 128])"),
    (lambda ckpt: ckpt["model_args"].__setitem__("hidden_size", 300),  # its weights are for 256
     "its model_args are not its config's"),
    (lambda ckpt: ckpt["model"].pop("decoder.to_vocab.bias"), 'Missing key(s) in state_dict: "decoder.to_vocab.bias"'),
    (lambda ckpt: ckpt["model"].__setitem__("decoder.extra", torch.zeros(2)),
     'Unexpected key(s) in state_dict: "decoder.extra"'),
], ids=["weight-of-another-shape", "short-vocabulary", "other-size", "missing-weight", "extra-weight"])
def test_a_checkpoint_whose_weights_do_not_fit_its_model_is_refused_in_one_line(tmp_path, trained_demo, demo_dirs,
                                                                               capsys, change, mismatch):
    assert len(torch.load(trained_demo / "best.pt", weights_only=True)["vocab"]) == 36  # as the cases assume
    path = rewritten(trained_demo / "best.pt", tmp_path / "tampered.pt", change)
    code, out, err = caption(capsys, demo_image(demo_dirs), f"--checkpoint={path}")
    assert (code, out) == (2, "") and len(err.splitlines()) == 1
    assert err.startswith(f"error: checkpoint {path} is damaged") and mismatch in err


# --- what --caption prints ------------------------------------------------------------------------------------------
def test_a_file_name_with_a_tab_or_a_newline_is_one_escaped_record(tmp_path, trained_demo, demo_dirs, capsys):
    folder = tmp_path / "odd names"
    folder.mkdir()
    names = ["tab\there.png", "new\nline.png", "back\\slash\r.png", "plain.png", "bidi\u202egnp.png",
             "line\u2028sep.png"]
    for i, name in enumerate(names):
        Image.open(demo_image(demo_dirs, i)).save(folder / name)
    (folder / "bro\nken.jpg").write_bytes(b"not a jpeg")
    code, out, err = caption(capsys, folder, f"--checkpoint={trained_demo / 'best.pt'}")
    assert code == 1  # the broken image
    escaped = {"back\\slash\r.png": "back\\\\slash\\r.png", "new\nline.png": "new\\nline.png",
               "plain.png": "plain.png", "tab\there.png": "tab\\there.png", "bidi\u202egnp.png": "bidi\\u202egnp.png",
               "line\u2028sep.png": "line\\u2028sep.png"}
    records = out.split("\n")[:-1]  # split("\n"): splitlines() would also split at U+2028
    assert len(records) == 6 and all(line.count("\t") == 1 for line in records)
    assert [line.split("\t")[0] for line in records] == [f"{folder}/{escaped[name]}" for name in sorted(names)]
    assert all(any(colour in line.split("\t")[1] for colour in cap.DEMO_COLOURS) for line in records)
    assert f"error: cannot read image {folder}/bro\\nken.jpg\n" in err


def test_json_lines_hold_the_caption_and_the_beams_n_best(tmp_path, trained_demo, demo_dirs, capsys):
    """--caption_format=json: an object a line, the same caption as the text line, the n-best best first."""
    folder = tmp_path / "json"
    folder.mkdir()
    for i, name in enumerate(["a\u2028b.png", "plain.png"]):  # a line separator: still one line
        Image.open(demo_image(demo_dirs, i)).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    args = [folder, f"--checkpoint={trained_demo / 'best.pt'}", "--beam_size=3"]
    text = caption(capsys, *args)[1].split("\n")[:-1]
    code, out, err = caption(capsys, *args, "--caption_format=json")
    assert code == 1 and f"error: cannot read image {folder / 'broken.jpg'}" in err
    records = [json.loads(line) for line in out.split("\n")[:-1]]  # split("\n"): U+2028 stays inside a record
    assert [r["path"] for r in records] == [str(folder / n) for n in ["a\u2028b.png", "broken.jpg", "plain.png"]]
    assert records[1] == {"path": str(folder / "broken.jpg"), "error": "cannot read image"}
    for record, line in zip([records[0], records[2]], text):
        assert record["caption"] == line.split("\t")[1] == record["n_best"][0]["caption"]
        ranks = [h["log_prob_per_token"] for h in record["n_best"]]
        assert 1 <= len(ranks) <= 3 and ranks == sorted(ranks, reverse=True)
        assert all(h["log_prob"] <= h["log_prob_per_token"] < 0 for h in record["n_best"])


def test_an_attention_checkpoint_captions_without_naming_its_decoder(trained_attention, demo_dirs, capsys):
    code, out, err = caption(capsys, demo_image(demo_dirs), f"--checkpoint={trained_attention / 'best.pt'}")
    assert code == 0, err
    path, text = out.rstrip("\n").split("\t")
    assert path == str(demo_image(demo_dirs)) and text and "\n" not in out.rstrip("\n")
    code, out, err = caption(capsys, demo_image(demo_dirs), f"--checkpoint={trained_attention / 'best.pt'}",
                             "--decoder=lstm")
    assert (code, out) == (2, "")
    assert refusal(err).startswith("error: --decoder=lstm, but the checkpoint was trained with decoder=attention")


@pytest.mark.parametrize("arg, name, trained", [("--embed_size=64", "embed_size", 128),
                                                ("--image_size=224", "image_size", 96),
                                                ("--num_layers=2", "num_layers", 1)])
def test_a_typed_size_that_differs_from_the_checkpoints_is_refused_naming_it(trained_demo, demo_dirs, capsys, arg,
                                                                            name, trained):
    code, out, err = caption(capsys, demo_image(demo_dirs), f"--checkpoint={trained_demo / 'best.pt'}", arg)
    assert (code, out) == (2, "")
    assert refusal(err).startswith(f"error: {arg}, but the checkpoint was trained with {name}={trained}")
    same = caption(capsys, demo_image(demo_dirs), f"--checkpoint={trained_demo / 'best.pt'}", f"--{name}={trained}")
    assert same[0] == 0  # the checkpoint's own value, typed: nothing to refuse


def test_caption_prints_only_the_captioning_settings(trained_demo, demo_dirs, capsys):
    """The checkpoint's training settings (its preset's learning rate, epochs, sizes) are not this run's news."""
    code, out, err = caption(capsys, demo_image(demo_dirs), f"--checkpoint={trained_demo / 'best.pt'}",
                             "--beam_size=2")
    assert code == 0 and len(out.splitlines()) == 1
    header, *lines = err.splitlines()
    assert header.startswith("settings that differ from the checkpoint's")
    shown = [line.split()[0] for line in itertools.takewhile(lambda line: line.startswith("  "), lines)]
    assert set(shown) == {"checkpoint", "beam_size"}, err
    for name in ("learning_rate", "num_epochs", "batch_size", "embed_size", "dataset", "image_size"):
        assert name not in err


# --- which ResNet50 file --caption uses ---------------------------------------------------------------------------
def moved_weights_checkpoint(tmp_path, trained_demo):
    """A copy of the demo checkpoint that records a weights file no longer there (moved to tmp_path/moved/)."""
    ckpt = torch.load(trained_demo / "best.pt", weights_only=True)
    moved = tmp_path / "moved" / "resnet50-test.pth"
    moved.parent.mkdir()
    shutil.copy(ckpt["encoder_weights"], moved)
    gone = str(tmp_path / "gone" / "resnet50-test.pth")

    def record_gone(ckpt):
        ckpt["encoder_weights"] = ckpt["config"]["encoder_weights"] = gone
    return rewritten(trained_demo / "best.pt", tmp_path / "best.pt", record_gone), moved


def test_an_edited_encoder_weights_constant_reaches_caption(tmp_path, trained_demo, demo_dirs, capsys, monkeypatch):
    checkpoint, moved = moved_weights_checkpoint(tmp_path, trained_demo)
    image = demo_image(demo_dirs)
    monkeypatch.setitem(cap.DEFAULTS, "encoder_weights", str(moved))  # as if edited at the top of the script
    code, out, err = caption(capsys, image, f"--checkpoint={checkpoint}")
    assert code == 0, err
    assert out == caption(capsys, image, f"--checkpoint={trained_demo / 'best.pt'}")[1]  # the same weights


def test_the_command_line_then_the_checkpoints_file_then_the_constant(tmp_path, trained_demo, demo_dirs, capsys,
                                                                     monkeypatch, random_weights):
    image = demo_image(demo_dirs)
    monkeypatch.setitem(cap.DEFAULTS, "encoder_weights", str(tmp_path / "constant.pth"))  # absent: never reached here
    code, out, err = caption(capsys, image, f"--checkpoint={trained_demo / 'best.pt'}")
    assert code == 0  # the checkpoint's file, not the absent constant
    code, out, err = caption(capsys, image, f"--checkpoint={trained_demo / 'best.pt'}",
                             f"--encoder_weights={tmp_path / 'typed.pth'}")
    assert (code, out) == (2, "")
    assert refusal(err).startswith(f"error: ResNet50 weights {tmp_path / 'typed.pth'} not found: run ./setup.sh")


def test_other_resnet50_weights_than_the_checkpoints_are_refused_naming_its_file(tmp_path, trained_demo, demo_dirs,
                                                                                  random_weights, capsys):
    other = tmp_path / "resnet50-other.pth"
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), other)
    code, out, err = caption(capsys, demo_image(demo_dirs), f"--checkpoint={trained_demo / 'best.pt'}",
                             f"--encoder_weights={other}")
    assert (code, out) == (2, "")
    assert refusal(err) == (f"error: checkpoint {trained_demo / 'best.pt'} was trained on other ResNet50 weights than "
                            f"{other}: use --encoder_weights={random_weights}, the file it was trained with")


# --- what --caption says besides the captions -------------------------------------------------------------------
def test_a_path_that_is_not_there_is_one_line_and_exit_code_2(tmp_path, trained_demo, demo_dirs, capsys):
    for paths in ([tmp_path / "nope.jpg"], [demo_image(demo_dirs), tmp_path / "nope.jpg"]):
        code, out, err = caption(capsys, *paths, f"--checkpoint={trained_demo / 'best.pt'}")
        assert (code, out) == (2, "") and refusal(err) == f"error: no such file or folder: {tmp_path / 'nope.jpg'}"
    (tmp_path / "empty").mkdir()
    code, out, err = caption(capsys, tmp_path / "empty", f"--checkpoint={trained_demo / 'best.pt'}")
    assert (code, out) == (2, "") and refusal(err) == f"error: no images in {tmp_path / 'empty'}"


def test_a_demo_checkpoint_says_once_that_it_knows_only_shapes(tmp_path, trained_demo, demo_dirs, capsys):
    code, out, err = caption(capsys, demo_image(demo_dirs), demo_image(demo_dirs, 1),
                             f"--checkpoint={trained_demo / 'best.pt'}", f"--output_dir={tmp_path}")
    note = ("note: this checkpoint was trained on the demo set: it knows only coloured shapes. To caption "
            "photos, train on Flickr8k (./setup.sh --flickr8k)")
    assert code == 0 and err.count(note) == 1 and len(out.splitlines()) == 2 and note not in out
    page = (tmp_path / "report-captions.html").read_text()
    data = json.loads(page.split('type="application/json">')[1].split("</script>")[0])
    assert data["note"] == note.removeprefix("note: ") and data["title"] == "captions of 2 images"
