"""Tokenization and vocabulary."""
import json
import re

import pandas as pd
import pytest

from conftest import cap, shared

Vocabulary = cap.Vocabulary


def test_tokenizer_is_spacy_english_lowercased():
    assert Vocabulary.tokenize("A dog's ball, isn't it?") == ["a", "dog", "'s", "ball", ",", "is", "n't", "it", "?"]


def test_specials_and_threshold():
    vocab = Vocabulary(freq_threshold=2).build_vocab(["a dog runs", "a dog sits", "a cat"])
    assert vocab.itos[:4] == ["<PAD>", "<SOS>", "<EOS>", "<UNK>"]
    assert (vocab.stoi["<PAD>"], vocab.stoi["<SOS>"], vocab.stoi["<EOS>"], vocab.stoi["<UNK>"]) == (0, 1, 2, 3)
    assert set(vocab.itos[4:]) == {"a", "dog"} and len(vocab) == 6
    assert vocab.numericalize("a cat dog") == [vocab.stoi["a"], 3, vocab.stoi["dog"]]
    assert vocab.decode([1, vocab.stoi["a"], 3, 2, vocab.stoi["dog"]]) == "a <UNK>"


def test_a_runs_vocab_json_rebuilds_its_vocabulary_and_its_endings(trained_demo):
    vocab = cap.restore(trained_demo / "best.pt")[0].vocab
    loaded = Vocabulary(**json.loads((trained_demo / "vocab.json").read_text()))  # as prepare_outputs writes it
    assert loaded.itos == vocab.itos and loaded.stoi == vocab.stoi and loaded.freq_threshold == vocab.freq_threshold
    assert loaded.endings == vocab.endings and "." in vocab.endings


def test_endings_are_each_caption_s_last_word_and_the_punctuation_after_it():
    def endings(captions, freq_threshold):
        return cap.build_vocabulary([Vocabulary.tokenize(c) for c in captions], freq_threshold).endings
    assert endings(["a dog runs .", "a dog sits !", "the dog , .", "a zebra"], 1) == \
        ["!", ",", ".", "dog", "runs", "sits", "zebra"]
    assert endings(["a dog runs .", "a dog runs", "a zebra"], 2) == ["<UNK>", "runs"]  # '.' and 'zebra' are rare


def test_learned_endings_come_from_the_training_split_alone(tmp_path, random_weights):
    """The validation and test captions end on 'cat' and '!', which no training caption ends on."""
    from PIL import Image
    names = [f"{i}.jpg" for i in range(5)]
    (tmp_path / "Images").mkdir()
    for i, name in enumerate(names):
        Image.new("RGB", (40, 40), (50 * i, 0, 0)).save(tmp_path / "Images" / name)
    captions = {"train": ["a dog runs .", "a cat sits on grass ."], "dev": ["a dog sits on a cat"], "test": ["cat !"]}
    listed = {"train": names[:3], "dev": names[3:4], "test": names[4:]}
    rows = [(name, caption) for split, group in listed.items() for name in group for caption in captions[split]]
    pd.DataFrame(rows, columns=["image", "caption"]).to_csv(tmp_path / "captions.txt", index=False)
    for split, group in listed.items():
        (tmp_path / f"Flickr_8k.{split}Images.txt").write_text("\n".join(group))
    cfg = cap.resolve_settings({"dataset": "flickr8k", "data_dir": str(tmp_path), "cache_dir": str(tmp_path / "cache"),
                                "output_dir": str(tmp_path / "out"), "encoder_weights": str(random_weights),
                                "freq_threshold": 1, "image_size": 32, "num_workers": 0})
    vocab = cap.prepare_data(cfg, cap.torch.device("cpu"), build_vocab=True).vocab
    assert "cat" in vocab.stoi and vocab.endings == [".", "grass", "runs"]


def test_real_flickr8k_vocabulary_has_2994_entries():
    path = shared("flickr8k", "captions.txt")
    every_row = pd.read_csv(path)["caption"].tolist()  # as the original script read it
    assert len(every_row) == 40455 and len(Vocabulary(5).build_vocab(every_row)) == 2994
    frame, dropped = cap.read_captions(path)  # the script drops the file's 10 repeated rows
    assert len(frame) == 40445 and dropped == {"duplicate_rows": 10}
    assert len(Vocabulary(5).build_vocab(frame["caption"].tolist())) == 2994


def test_vocabulary_must_start_with_specials():
    specials = re.escape("a vocabulary must start with ['<PAD>', '<SOS>', '<EOS>', '<UNK>']")
    with pytest.raises(ValueError, match=specials):
        Vocabulary(5, ["a", "b"])
    with pytest.raises(ValueError, match=specials):
        Vocabulary(5, ["<SOS>", "<PAD>", "<EOS>", "<UNK>", "a"])  # all four, but out of order
    assert Vocabulary(5, [*Vocabulary.SPECIALS, "a"]).stoi["a"] == 4


@pytest.mark.parametrize("space", ["\n", "\t", "  ", "\u2028", "\u0085", "\u00a0", " \n\t "])
def test_whitespace_is_never_a_word(space):
    """spaCy makes tokens of these: the vocabulary, the training captions and the metrics never see them."""
    caption = f"a dog{space}runs {space} fast"
    assert Vocabulary.tokenize(caption) == ["a", "dog", "runs", "fast"]
    assert Vocabulary.tokenize("a cat") == ["a", "cat"]
    vocab = Vocabulary(1).build_vocab([caption])
    assert vocab.itos[4:] == ["a", "dog", "fast", "runs"]
    assert Vocabulary.UNK not in vocab.numericalize(caption)
