"""--caption: captioning new images with a trained checkpoint."""
import pytest
from PIL import Image

from conftest import cap, run_script


def test_caption_a_folder_with_a_good_image_a_text_file_and_a_corrupt_jpeg(tmp_path, trained_demo, demo_dirs):
    folder = tmp_path / "photos"
    folder.mkdir()
    source = sorted((demo_dirs["data_dir"] / "Images").iterdir())[0]
    Image.open(source).save(folder / "good.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    figure = tmp_path / "captions.png"
    result = run_script("--caption", folder, f"--checkpoint={trained_demo / 'best.pt'}",
                        f"--caption_figure={figure}", "--device=cpu")
    lines = result.stdout.strip().splitlines()
    assert result.returncode != 0
    assert len(lines) == 1 and lines[0].startswith(str(folder / "good.png") + "\t") and lines[0].split("\t")[1]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors == [f"error: cannot read image {folder / 'broken.jpg'}"]
    assert "notes.txt" not in result.stdout + result.stderr and figure.stat().st_size > 0


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


@pytest.mark.parametrize("figure, message", [("nowhere/out.png", "its folder"), ("out.xyz", "name an image file"),
                                             (".", "name an image file")])
def test_a_bad_figure_path_is_refused_before_captioning(tmp_path, trained_demo, demo_dirs, figure, message):
    image = sorted((demo_dirs["data_dir"] / "Images").iterdir())[0]
    result = run_script("--caption", image, f"--checkpoint={trained_demo / 'best.pt'}",
                        f"--caption_figure={tmp_path / figure}")
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert f"error: --caption_figure={tmp_path / figure}: {message}" in result.stderr


def test_missing_weights_for_captioning_name_the_file(tmp_path, trained_demo, demo_dirs, capsys):
    image = sorted((demo_dirs["data_dir"] / "Images").iterdir())[0]
    assert cap.main(["--caption", str(image), f"--checkpoint={trained_demo / 'best.pt'}",
                     f"--encoder_weights={tmp_path / 'absent.pth'}"]) == 2
    assert f"error: ResNet50 weights {tmp_path / 'absent.pth'} not found" in capsys.readouterr().err


def test_an_attention_model_draws_each_words_attention_map(tmp_path, trained_attention, demo_dirs, monkeypatch,
                                                           capsys):
    image = sorted((demo_dirs["data_dir"] / "Images").iterdir())[0]
    figure, drawn = tmp_path / "attention.png", []
    real = cap.save_caption_figure
    monkeypatch.setattr(cap, "save_caption_figure", lambda items, path, maps=None: drawn.append(maps) or
                        real(items, path, maps))
    assert cap.main(["--caption", str(image), f"--checkpoint={trained_attention / 'best.pt'}", "--decoder=attention",
                     f"--caption_figure={figure}", "--num_workers=0"]) == 0
    caption = capsys.readouterr().out.strip().split("\t")[1]
    (maps,) = drawn[0]
    assert [word for word, _ in maps] == caption.split()  # one map per word, in order
    assert all(m.shape == (3, 3) and abs(m.sum() - 1) < 1e-4 for _, m in maps)  # 96 px: a 3x3 grid
    assert figure.stat().st_size > 0


def test_a_checkpoint_of_the_other_decoder_is_refused_naming_the_setting(trained_demo, demo_dirs, capsys):
    image = sorted((demo_dirs["data_dir"] / "Images").iterdir())[0]
    assert cap.main(["--caption", str(image), f"--checkpoint={trained_demo / 'best.pt'}", "--decoder=attention"]) == 2
    assert (f"checkpoint {trained_demo / 'best.pt'} has the 'lstm' decoder but the settings say --decoder=attention: "
            f"run with --decoder=lstm" in capsys.readouterr().err)
