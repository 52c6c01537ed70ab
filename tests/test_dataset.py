"""Caption files in every supported format, image folders, splits by image, bad input."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from conftest import cap, error_line, run_script, shared

CAPTIONS = [("1000_a.jpg", "A dog runs, fast ."), ("1000_a.jpg", "A brown dog ."),
            ("2000_b.jpg", "Two \"kids\" play ."), ("2000_b.jpg", "Kids, on grass , play .")]


def write_all_formats(folder):
    """The same captions as Kaggle CSV, results.csv (malformed row, BOM), token.txt and Karpathy JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(CAPTIONS, columns=["image", "caption"]).to_csv(folder / "captions.txt", index=False)
    rows = ["image_name| comment_number| comment"]
    for n, (image, caption) in enumerate(CAPTIONS):
        rows.append(f"{image}| {n % 2}| {caption}" if n != 2 else f"{image}| {n % 2} {caption}")  # missing '|'
    (folder / "results.csv").write_bytes(b"\xef\xbb\xbf" + "\n\n".join(rows).encode())  # BOM and blank lines
    (folder / "Flickr8k.token.txt").write_text("\n".join(f"{i}#{n % 2}\t{c}" for n, (i, c) in enumerate(CAPTIONS)))
    images = {}
    for image, caption in CAPTIONS:
        images.setdefault(image, []).append({"raw": caption})
    karpathy = {"images": [{"filename": i, "split": s, "sentences": images[i]}
                           for i, s in zip(images, ["train", "test"])], "dataset": "flickr8k"}
    (folder / "dataset_flickr8k.json").write_text(json.dumps(karpathy))
    return folder


@pytest.mark.parametrize("name", ["captions.txt", "results.csv", "Flickr8k.token.txt", "dataset_flickr8k.json"])
def test_every_format_gives_the_same_captions(tmp_path, name):
    frame, _ = cap.read_captions(write_all_formats(tmp_path) / name)
    assert list(zip(frame["image"], frame["caption"])) == [(i, c.strip()) for i, c in CAPTIONS]


def test_karpathy_json_keeps_its_splits(tmp_path):
    frame, _ = cap.read_captions(write_all_formats(tmp_path) / "dataset_flickr8k.json")
    assert dict(zip(frame["image"], frame["split"])) == {"1000_a.jpg": "train", "2000_b.jpg": "test"}


def test_dropped_rows_are_counted(tmp_path):
    (tmp_path / "captions.txt").write_text('image,caption\na.jpg,"one, two"\na.jpg,"one, two"\nb.jpg,\n\nb.jpg,x\n',
                                           encoding="cp1252")
    frame, dropped = cap.read_captions(tmp_path / "captions.txt")
    assert list(frame["caption"]) == ["one, two", "x"]
    assert dropped == {"duplicate_rows": 1, "empty_captions": 1, "blank_lines": 1}


def test_other_encodings(tmp_path):
    (tmp_path / "captions.txt").write_bytes("image,caption\na.jpg,un café\n".encode("cp1252"))
    assert cap.read_captions(tmp_path / "captions.txt")[0]["caption"][0] == "un café"
    (tmp_path / "captions.txt").write_text("image,caption\na.jpg,un café\n", encoding="utf-16")
    assert cap.read_captions(tmp_path / "captions.txt")[0]["caption"][0] == "un café"


def test_unreadable_row_reported_by_line_number(tmp_path, capsys):
    (tmp_path / "results.csv").write_text("image_name| comment_number| comment\na.jpg| 0| fine\nno separator here\n")
    frame, dropped = cap.read_captions(tmp_path / "results.csv")
    assert len(frame) == 1 and dropped["malformed_rows"] == 1 and "[3]" in capsys.readouterr().err


def test_unknown_format_shows_first_line(tmp_path):
    (tmp_path / "captions.txt").write_text("what is this\n")
    with pytest.raises(cap.UserError, match="'what is this'.*accepted formats"):
        cap.read_captions(tmp_path / "captions.txt")


def test_real_caption_files_agree():
    kaggle, _ = cap.read_captions(shared("flickr8k", "captions.txt"))
    token, _ = cap.read_captions(shared("flickr8k", "Flickr8k.token.txt"))
    assert len(kaggle) == 40455 - 10  # ten rows repeat an image's caption word for word
    token = token[token["image"].isin(set(kaggle["image"]))].reset_index(drop=True)  # one id has no image
    pd.testing.assert_frame_equal(kaggle, token)


def make_images(folder, names, size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", size, (i * 40 % 255, 100, 50)).save(folder / name)


@pytest.mark.parametrize("layout", ["Images", "flickr30k_images/flickr30k_images", "flickr30k_images",
                                    "Flicker8k_Dataset"])
def test_image_folder_layouts(tmp_path, layout):
    make_images(tmp_path / layout, ["1000_a.jpg", "2000_b.jpg"])
    caption_home = tmp_path / "flickr30k_images" if layout.startswith("flickr30k_images/") else tmp_path
    write_all_formats(tmp_path)
    (tmp_path / "captions.txt").rename(caption_home / "captions.txt")
    for other in ["results.csv", "Flickr8k.token.txt", "dataset_flickr8k.json"]:
        (tmp_path / other).unlink()
    caption_file, image_dir = cap.find_dataset_files(tmp_path)
    assert image_dir == tmp_path / layout and caption_file == caption_home / "captions.txt"


def test_split_by_image_without_leakage(tmp_path):
    names = [f"{i}.jpg" for i in range(50)]
    make_images(tmp_path / "Images", names)
    pd.DataFrame([(n, f"caption {k}") for n in names for k in range(5)],
                 columns=["image", "caption"]).to_csv(tmp_path / "captions.txt", index=False)
    frame, _ = cap.load_captions(tmp_path, seed=1)
    assert frame.groupby("image")["split"].nunique().max() == 1
    counts = frame.drop_duplicates("image")["split"].value_counts().to_dict()
    assert counts == {"train": 40, "val": 5, "test": 5}
    again, _ = cap.load_captions(tmp_path, seed=1)
    assert again.equals(frame)


def test_official_split_lists_are_honoured(tmp_path):
    names = [f"{i}.jpg" for i in range(6)]
    make_images(tmp_path / "Images", names)
    pd.DataFrame([(n, "a caption") for n in names], columns=["image", "caption"]).to_csv(
        tmp_path / "captions.txt", index=False)
    for split, listed in [("train", names[:3]), ("dev", names[3:4]), ("test", names[4:5])]:
        (tmp_path / f"Flickr_8k.{split}Images.txt").write_text("\n".join(listed))
    frame, _ = cap.load_captions(tmp_path, seed=1)
    assert dict(zip(frame["image"], frame["split"])) == {
        "0.jpg": "train", "1.jpg": "train", "2.jpg": "train", "3.jpg": "val", "4.jpg": "test"}  # 5.jpg unlisted


def test_max_images_limits_a_partial_run(tmp_path):
    names = [f"{i}.jpg" for i in range(30)]
    make_images(tmp_path / "Images", names)
    pd.DataFrame([(n, "a caption") for n in names], columns=["image", "caption"]).to_csv(
        tmp_path / "captions.txt", index=False)
    frame, _ = cap.load_captions(tmp_path, seed=1, max_images=20)
    assert frame.drop_duplicates("image")["split"].value_counts().to_dict() == {"train": 16, "val": 2, "test": 2}


def test_a_split_without_images_is_a_clear_error(tmp_path):
    names = [f"{i}.jpg" for i in range(30)]
    make_images(tmp_path / "Images", names)
    pd.DataFrame([(n, "a caption") for n in names], columns=["image", "caption"]).to_csv(
        tmp_path / "captions.txt", index=False)
    with pytest.raises(cap.UserError, match="no train images .* use more images"):
        cap.load_captions(tmp_path, seed=1, max_images=2)  # one test and one validation image


def test_missing_images_are_skipped_with_a_warning(tmp_path, capsys):
    names = [f"{i}.jpg" for i in range(12)]
    make_images(tmp_path / "Images", names)
    pd.DataFrame([(n, "x") for n in names + ["gone.jpg"]], columns=["image", "caption"]).to_csv(
        tmp_path / "captions.txt", index=False)
    frame, _ = cap.load_captions(tmp_path, seed=1)
    assert set(frame["image"]) == set(names) and "gone.jpg" in capsys.readouterr().err


def test_image_names_outside_the_image_folder_are_skipped(tmp_path, capsys):
    """A caption file that names /an/absolute/path or ../a/file: never read, whatever is there."""
    names = [f"{i}.jpg" for i in range(12)]
    make_images(tmp_path / "data" / "Images", names)
    make_images(tmp_path / "data", ["beside.jpg"])  # Images/../beside.jpg
    make_images(tmp_path / "elsewhere", ["private.jpg"])
    outside = [str(tmp_path / "elsewhere" / "private.jpg"), "../beside.jpg", "sub/../../beside.jpg"]
    pd.DataFrame([(n, "a caption") for n in names + outside], columns=["image", "caption"]).to_csv(
        tmp_path / "data" / "captions.txt", index=False)
    frame, image_dir = cap.load_captions(tmp_path / "data", seed=1)
    assert sorted(frame["image"].unique()) == sorted(names) and image_dir == tmp_path / "data" / "Images"
    warning = [line for line in capsys.readouterr().err.splitlines() if "point outside" in line]
    assert len(warning) == 1 and "3 image name(s)" in warning[0] and "../beside.jpg" in warning[0]


def test_image_names_the_system_refuses_are_skipped_and_named(tmp_path, capsys):
    """A NUL byte, a name too long for the file system, a symlink loop: each skipped like a missing image."""
    names = [f"{i}.jpg" for i in range(12)]
    make_images(tmp_path / "Images", names)
    (tmp_path / "Images" / "loop.jpg").symlink_to("loop.jpg")
    refused = ["nul\0byte.jpg", "x" * 300 + ".jpg", "loop.jpg"]
    pd.DataFrame([(n, "a caption") for n in names + refused], columns=["image", "caption"]).to_csv(
        tmp_path / "captions.txt", index=False)
    frame, _ = cap.load_captions(tmp_path, seed=1)
    assert set(frame["image"]) == set(names)
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert "3 image name(s)" in warning and "nul\\x00byte.jpg" in warning and "loop.jpg" in warning


def test_captions_without_a_word_are_dropped_and_counted(tmp_path):
    (tmp_path / "captions.txt").write_text('image,caption\na.jpg,A dog .\na.jpg,.\nb.jpg," ... !"\nb.jpg,-- 2 --\n')
    frame, dropped = cap.read_captions(tmp_path / "captions.txt")
    assert list(frame["caption"]) == ["A dog .", "-- 2 --"]  # a digit is a word character
    assert dropped == {"captions_without_words": 2}


def test_a_caption_file_of_punctuation_alone_is_refused_before_training(tmp_path, random_weights, capsys):
    names = [f"{i}.jpg" for i in range(30)]
    make_images(tmp_path / "data" / "Images", names)
    pd.DataFrame([(n, caption) for n in names for caption in (".", "!!", "...")], columns=["image", "caption"]).to_csv(
        tmp_path / "data" / "captions.txt", index=False)
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert cap.main(["--dataset=flickr8k", f"--data_dir={tmp_path / 'data'}", f"--output_dir={out}",
                     f"--cache_dir={cache}", f"--encoder_weights={random_weights}", "--freq_threshold=1",
                     "--num_workers=0"]) == 2
    printed = capsys.readouterr()
    error = error_line(printed.err)
    assert "holds no caption with a word in it" in error and "'captions_without_words': 90" in error
    assert not cache.exists()  # before any feature is computed
    assert not [p.name for p in out.iterdir() if p.name != ".lock"]  # no checkpoint, log or vocabulary


@pytest.mark.parametrize("broken, message", [("no_folder", "does not exist"), ("no_captions", "no caption file"),
                                             ("no_images", "no image folder")])
def test_missing_inputs_give_one_clear_error(tmp_path, capsys, broken, message):
    folder = tmp_path / "data"
    if broken != "no_folder":
        make_images(folder / "Images", ["a.jpg"]) if broken == "no_captions" else folder.mkdir()
        if broken == "no_images":
            (folder / "captions.txt").write_text("image,caption\na.jpg,x\n")
    assert cap.main(["--dataset=flickr8k", f"--data_dir={folder}", f"--output_dir={tmp_path / 'out'}"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and str(folder) in error


def test_a_batch_pads_its_captions_to_the_longest(tmp_path):
    frame = pd.DataFrame([("a.jpg", "a red circle"), ("a.jpg", "red")], columns=["image", "caption"])
    frame["tokens"] = frame["caption"].map(cap.Vocabulary.tokenize)  # as prepare_data gives them
    vocab = cap.Vocabulary(1).build_vocab(frame["caption"])
    source = cap.ImageSource(tmp_path, torch.arange(4.0).view(1, 4), ["a.jpg"])
    dataset = cap.FlickrDataset(frame, vocab, source)
    images, captions = dataset.batch([0, 1])
    assert images.shape == (2, 4) and captions.shape == (2, 5)
    assert captions[1].tolist() == [1, vocab.stoi["red"], 2, 0, 0]


def test_decoded_batches_skip_unreadable_images(tmp_path):
    """The one place that skips them (feature extraction, --caption): each batch holds the readable ones."""
    make_images(tmp_path, ["good.jpg", "good2.jpg"])
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    files = cap.ImageFiles([tmp_path / n for n in ["bad.jpg", "good.jpg", "bad.jpg", "bad.jpg", "good2.jpg"]],
                           cap.image_transform(32))
    batches = [cap.stack_readable([files[i] for i in range(k, min(k + 2, 5))]) for k in range(0, 5, 2)]
    assert [index.tolist() for _, index in batches] == [[1], [], [4]]  # the batch of two bad images: none
    assert [None if images is None else tuple(images.shape) for images, _ in batches] == \
        [(1, 3, 32, 32), None, (1, 3, 32, 32)]


def test_unquoted_commas_and_spaced_header(tmp_path):
    (tmp_path / "captions.txt").write_text("image, caption\na.jpg,A dog, running , fast .\n")
    frame, _ = cap.read_captions(tmp_path / "captions.txt")
    assert list(frame["caption"]) == ["A dog, running , fast ."]


def test_broken_karpathy_json_is_a_clear_error(tmp_path):
    (tmp_path / "dataset_flickr8k.json").write_text('{"images": [')
    with pytest.raises(cap.UserError, match="not a Karpathy-format JSON"):
        cap.read_captions(tmp_path / "dataset_flickr8k.json")


@pytest.mark.parametrize("mode, value, name", [("I;16", 80 * 257, "grey.png"), ("I", 80 * 257, "grey.tif"),
                                               ("I", round(80 / 255 * (2 ** 31 - 1)), "grey.tif")])
def test_16_and_32_bit_images_are_scaled_not_clipped(tmp_path, mode, value, name):
    Image.new(mode, (20, 10), value).save(tmp_path / name)  # a 16-bit PNG; 32-bit TIFFs, 16-bit or full range
    image = cap.open_rgb(tmp_path / name)
    assert image.mode == "RGB" and image.getextrema() == ((80, 80),) * 3
    tensor = cap.image_transform(8)(cap.open_rgb(tmp_path / name))  # the model's input, Normalize undone
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose((tensor * std[:, None, None] + mean[:, None, None]) * 255, torch.tensor(80.0), atol=0.5)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned, the viewer rotates 90 degrees
    Image.new("RGB", (40, 20), (200, 30, 30)).save(tmp_path / "turned.jpg", exif=exif)
    assert cap.open_rgb(tmp_path / "turned.jpg").size == (20, 40)
    assert T.ToImage()(cap.open_rgb(tmp_path / "turned.jpg")).shape == (3, 40, 20)


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r", "mixed"])
@pytest.mark.parametrize("name", ["captions.txt", "results.csv", "Flickr8k.token.txt"])
def test_any_line_endings(tmp_path, name, ending):
    path = write_all_formats(tmp_path) / name
    lines = path.read_bytes().replace(b"\r\n", b"\n").split(b"\n")
    endings = [b"\r\n", b"\n", b"\r"] * len(lines) if ending == "mixed" else [ending.encode()] * len(lines)
    path.write_bytes(b"".join(line + end for line, end in zip(lines, endings)))
    frame, _ = cap.read_captions(path)
    assert list(zip(frame["image"], frame["caption"])) == [(i, c.strip()) for i, c in CAPTIONS]


@pytest.mark.parametrize("ending", ["\r\n", "\r"])
def test_split_lists_with_any_line_endings(tmp_path, ending):
    names = [f"{i}.jpg" for i in range(5)]
    make_images(tmp_path / "Images", names)
    pd.DataFrame([(n, "a caption") for n in names], columns=["image", "caption"]).to_csv(
        tmp_path / "captions.txt", index=False, lineterminator=ending)
    for split, listed in [("train", names[:3]), ("dev", names[3:4]), ("test", names[4:5])]:
        (tmp_path / f"Flickr_8k.{split}Images.txt").write_bytes(ending.join(listed).encode())
    frame, _ = cap.load_captions(tmp_path, seed=1)
    assert list(frame["split"]) == ["train", "train", "train", "val", "test"]


GOOD_ENTRY = {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "A dog ."}]}


@pytest.mark.parametrize("images, message", [
    ([GOOD_ENTRY, {"filename": "b.jpg", "split": "train"}], r"images\[1\] \{'filename': 'b.jpg', 'split': 'train'\}"),
    ([GOOD_ENTRY, {"filename": "b.jpg", "split": "train", "sentences": []}], r"images\[1\] .*'sentences': \[\]\} is"),
    ([GOOD_ENTRY, "b.jpg"], r"images\[1\] 'b.jpg' is not an object"),
    ([GOOD_ENTRY, {**GOOD_ENTRY, "filename": "b.jpg", "sentences": [{"raw": 7}]}], r"images\[1\] .*'raw': 7\}\]\}"),
    ([{**GOOD_ENTRY, "filename": None}], r"images\[0\] \{'filename': None, "),
    ([{**GOOD_ENTRY, "split": "dev"}], r"images\[0\] \{'filename': 'a.jpg', 'split': 'dev', "),
    ([{**GOOD_ENTRY, "split": ["train"]}], r"images\[0\] \{'filename': 'a.jpg', 'split': \['train'\]"),
    ({"a.jpg": GOOD_ENTRY}, r"'images' is a dict, not a list")])
def test_malformed_karpathy_entries_are_clear_errors(tmp_path, images, message):
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps({"images": images}))
    with pytest.raises(cap.UserError, match=message) as error:
        cap.read_captions(path)
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)
    if isinstance(images, list):  # what a valid entry has, and what to do
        assert str(error.value).endswith("is not an object with a 'filename', 'split' (train/restval/val/test), "
                                         "'sentences' of {'raw': caption}: fix or remove it")


def test_malformed_karpathy_json_stops_the_script_with_one_line(tmp_path):
    make_images(tmp_path / "data" / "Images", ["a.jpg", "b.jpg"])
    broken = {"images": [GOOD_ENTRY, {"filename": "b.jpg", "split": "test"}]}
    (tmp_path / "data" / "dataset_flickr8k.json").write_text(json.dumps(broken))
    result = run_script("--dataset=flickr8k", f"--data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'out'}")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr
    assert "images[1] {'filename': 'b.jpg', 'split': 'test'} is not an object with a 'filename'" in errors[0]


def test_an_image_in_two_split_lists_is_named(tmp_path, capsys):
    names = [f"{i}.jpg" for i in range(6)]
    make_images(tmp_path / "Images", names)
    pd.DataFrame([(n, "a caption") for n in names], columns=["image", "caption"]).to_csv(
        tmp_path / "captions.txt", index=False)
    for split, listed in [("train", names[:4]), ("dev", names[3:5]), ("test", names[1:2] + names[5:])]:
        (tmp_path / f"Flickr_8k.{split}Images.txt").write_text("\n".join(listed))
    frame, _ = cap.load_captions(tmp_path, seed=1)
    assert dict(zip(frame["image"], frame["split"])) == {
        "0.jpg": "train", "1.jpg": "test", "2.jpg": "train", "3.jpg": "val", "4.jpg": "val", "5.jpg": "test"}
    warning = [line for line in capsys.readouterr().err.splitlines() if "more than one" in line]
    assert len(warning) == 1 and "2 image(s)" in warning[0] and "1.jpg (put in test)" in warning[0]
    assert "3.jpg (put in val)" in warning[0]


def test_the_real_split_lists_do_not_overlap(tmp_path, capsys):
    for name in cap.SPLIT_FILES.values():
        (tmp_path / name).write_bytes(shared("flickr8k", name).read_bytes())
    frame = pd.DataFrame({"image": ["1000268201_693b08cb0e.jpg"], "caption": ["x"]})
    assert cap.assign_splits(frame, tmp_path, seed=1)[0]["split"].tolist() == ["train"]
    assert "more than one" not in capsys.readouterr().err


def test_a_very_long_training_caption_is_cut(tmp_path, capsys):
    frame = pd.DataFrame([("a.jpg", " ".join(["dog"] * 10_000)), ("a.jpg", "a dog")], columns=["image", "caption"])
    frame["tokens"] = frame["caption"].map(cap.Vocabulary.tokenize)
    source = cap.ImageSource(tmp_path, torch.zeros(1, 4), ["a.jpg"])
    dataset = cap.FlickrDataset(frame, cap.Vocabulary(1).build_vocab(["a dog"]), source, max_len=100)
    assert dataset.lengths.tolist() == [102, 4] and dataset.padded.shape == (2, 102)  # <SOS>, 100 words, <EOS>
    assert dataset.padded[0, -1] == cap.Vocabulary.EOS and dataset.padded[1].tolist()[4:] == [0] * 98
    assert "1 caption(s) longer than 100 words" in capsys.readouterr().out
    assert cap.FlickrDataset(frame, cap.Vocabulary(1), source).lengths[0] == 10_002  # no limit by default


def write_coco(folder, n_images=30):
    """MS-COCO's layout in miniature: dataset_coco.json (Karpathy's), train2014/ and val2014/. Val and test images
    come from val2014, as does restval (trained on), like the 113,287 / 5,000 / 5,000 split."""
    entries, rng = [], np.random.default_rng(0)
    for i in range(n_images):
        split = ["val", "test", "restval", "train", "train", "train"][i % 6]
        folder_name = "train2014" if split == "train" else "val2014"
        name = f"COCO_{folder_name}_{i:012d}.jpg"
        (folder / folder_name).mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 255, 3)
        Image.fromarray(np.broadcast_to(colour, (40, 50, 3)).astype(np.uint8)).save(folder / folder_name / name)
        sentences = [{"raw": f"A {'red' if colour[0] > 127 else 'dark'} picture number {j} .", "tokens": []}
                     for j in range(5)]
        entries.append({"filepath": folder_name, "filename": name, "split": split, "cocoid": i,
                        "sentences": sentences})
    (folder / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return folder


def test_coco_karpathy_split_and_image_folders(tmp_path):
    frame, image_dir = cap.load_captions(write_coco(tmp_path / "coco"), seed=0)
    assert image_dir == tmp_path / "coco"
    splits = frame.drop_duplicates("image").set_index("image")["split"]
    assert splits.value_counts().to_dict() == {"train": 20, "val": 5, "test": 5}  # restval is trained on
    assert splits["val2014/COCO_val2014_000000000002.jpg"] == "train"  # restval
    assert splits["train2014/COCO_train2014_000000000003.jpg"] == "train"
    assert all((image_dir / name).is_file() for name in splits.index)


def test_a_coco_run_trains_and_reports(tmp_path, random_weights):
    data_dir, out = write_coco(tmp_path / "coco"), tmp_path / "out"
    assert cap.main(["--dataset=coco", f"--data_dir={data_dir}", f"--output_dir={out}",
                     f"--cache_dir={tmp_path / 'cache'}", f"--encoder_weights={random_weights}", "--num_epochs=1",
                     "--image_size=32", "--embed_size=16", "--hidden_size=32", "--freq_threshold=1", "--beam_size=1",
                     "--sample_every=0", "--num_workers=0"]) == 0
    captions = pd.read_csv(out / "test_captions.csv")
    assert len(captions) == 5 and captions["image"].str.startswith("val2014/COCO_val2014_").all()


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"])
def test_a_quoted_caption_over_two_lines_reads_the_same_with_any_line_ending(tmp_path, ending):
    path = tmp_path / "captions.txt"
    path.write_bytes(f'image,caption{ending}a.jpg,"a dog{ending}runs"{ending}b.jpg,a cat{ending}'.encode())
    frame, _ = cap.read_captions(path)
    assert frame["caption"].tolist() == ["a dog\nruns", "a cat"]


def test_an_image_in_two_karpathy_splits_is_never_both_trained_on_and_scored(tmp_path, capsys):
    """Issue 28.1: as with the official lists, it goes in the last of train, val, test, with a warning."""
    names = ["a.jpg", "b.jpg", "c.jpg", "t.jpg", "v.jpg", "s.jpg"]
    make_images(tmp_path / "Images", names)
    entries = [("a.jpg", "train", "A dog ."), ("a.jpg", "test", "A brown dog ."), ("b.jpg", "restval", "A cat ."),
               ("b.jpg", "val", "A grey cat ."), ("c.jpg", "train", "A bird ."), ("c.jpg", "train", "A red bird ."),
               ("t.jpg", "train", "A tree ."), ("v.jpg", "val", "A van ."), ("s.jpg", "test", "A sun .")]
    images = [{"filename": name, "split": split, "sentences": [{"raw": caption}]} for name, split, caption in entries]
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": images}))
    frame, _ = cap.load_captions(tmp_path, seed=1)
    assert frame.groupby("image")["split"].nunique().max() == 1
    assert dict(zip(frame["image"], frame["split"])) == {
        "a.jpg": "test", "b.jpg": "val", "c.jpg": "train", "t.jpg": "train", "v.jpg": "val", "s.jpg": "test"}
    assert len(frame) == 9  # every caption kept, with its image's one split
    printed = capsys.readouterr()
    warning = [line for line in printed.err.splitlines() if "more than one split" in line]
    assert len(warning) == 1 and "2 image(s)" in warning[0] and "a.jpg (put in test)" in warning[0]
    assert "b.jpg (put in val)" in warning[0] and "c.jpg" not in warning[0]
    assert "train 2, val 2, test 2 images" in printed.out  # the log counts each image once


def test_a_deeply_nested_karpathy_json_is_one_line_naming_it(tmp_path, capsys):
    """Issue 28.8: 100,000 levels gave a RecursionError traceback."""
    make_images(tmp_path / "data" / "Images", ["a.jpg"])
    path = tmp_path / "data" / "dataset_flickr8k.json"
    path.write_text('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(cap.UserError, match="not a Karpathy-format JSON") as error:
        cap.read_captions(path)
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)
    assert cap.main(["--dataset=flickr8k", f"--data_dir={path.parent}", f"--output_dir={tmp_path / 'out'}"]) == 2
    assert str(path) in error_line(capsys.readouterr().err)


def test_captions_of_underscores_have_no_word(tmp_path):
    """Issue 28.11: '_' is a word character to regular expressions, not a word to the metrics."""
    (tmp_path / "captions.txt").write_text("image,caption\na.jpg,_\na.jpg,__ _\nb.jpg,a_b\nb.jpg,_1_\nb.jpg,_ .\n")
    frame, dropped = cap.read_captions(tmp_path / "captions.txt")
    assert list(frame["caption"]) == ["a_b", "_1_"]
    assert dropped == {"captions_without_words": 3}
    (tmp_path / "captions.txt").write_text("image,caption\na.jpg,_\nb.jpg,__\n")
    with pytest.raises(cap.UserError, match="no caption with a word"):
        cap.read_captions(tmp_path / "captions.txt")


def test_split_list_names_may_hold_spaces(tmp_path, capsys):
    """Issue 28.17: the lists are read a name a line, not split at every space."""
    names = ["my dog.jpg", "a b c.jpg", "0.jpg", "1 .jpg", "two  spaces.jpg"]
    make_images(tmp_path / "Images", names)
    pd.DataFrame([(n, "a caption") for n in names], columns=["image", "caption"]).to_csv(
        tmp_path / "captions.txt", index=False)
    for split, listed in [("train", names[:3]), ("dev", names[3:4]), ("test", names[4:])]:
        (tmp_path / f"Flickr_8k.{split}Images.txt").write_text("\n".join(f"{n} \r" for n in listed) + "\n\n")
    frame, _ = cap.load_captions(tmp_path, seed=1)
    assert dict(zip(frame["image"], frame["split"])) == {
        "my dog.jpg": "train", "a b c.jpg": "train", "0.jpg": "train", "1 .jpg": "val", "two  spaces.jpg": "test"}
    assert "no official split list" not in capsys.readouterr().out


@pytest.mark.parametrize("separator", ["\u2028", "\u0085", "\x0c"])
def test_a_line_separator_inside_a_caption_ends_no_line(tmp_path, separator):
    """Only \\n, \\r\\n and \\r end a line: a token file's caption holding U+2028 stays one caption."""
    path = tmp_path / "Flickr8k.token.txt"
    path.write_text(f"a.jpg#0\tA dog{separator}runs .\na.jpg#1\tA cat .\n")
    frame, dropped = cap.read_captions(path)
    assert list(frame["caption"]) == [f"A dog{separator}runs .", "A cat ."] and dropped == {}
    assert cap.Vocabulary.tokenize(frame["caption"][0]) == ["a", "dog", "runs", "."]
