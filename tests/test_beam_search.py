"""Beam search: batched and per image, beam 1 is greedy, both decoders; on the trained demo model, ids are words."""
import pytest
import torch

from conftest import cap, greedy_decode

SPECIAL_IDS = {cap.Vocabulary.PAD, cap.Vocabulary.SOS, cap.Vocabulary.EOS}


@pytest.fixture(scope="module")
def trained(trained_run):
    """The trained demo model, its settings, and its test images' cached features and image embeddings."""
    model, data, cfg = trained_run
    features = torch.cat([inputs for inputs, _ in cap.image_batches(data.source, data.images("test"), 64)])
    with torch.no_grad():
        embeds = model.encoder(features)
    return model, cfg, features, embeds


def test_beam_1_equals_greedy_on_a_trained_model(trained):
    model, cfg, _, embeds = trained
    with torch.no_grad():
        assert cap.beam_search(model.decoder, embeds, 1, cfg.max_caption_len) == \
            greedy_decode(model.decoder, embeds, cfg.max_caption_len)


@pytest.mark.parametrize("size", [3, 5])
def test_beam_search_returns_words_alone_and_generate_decodes_them(trained, size):
    """The ids themselves (decode() would hide them): no <PAD>, <SOS> or <EOS>, never empty, within max_len."""
    model, cfg, features, embeds = trained
    beams = cap.beam_search(model.decoder, embeds, size, cfg.max_caption_len)
    assert len(beams) == len(embeds)
    assert all(1 <= len(ids) <= cfg.max_caption_len and not SPECIAL_IDS & set(ids) for ids in beams), beams
    assert all(0 <= i < len(model.vocab) for ids in beams for i in ids)
    assert model.generate(features, size, cfg.max_caption_len) == [" ".join(model.vocab.itos[i] for i in ids)
                                                                   for ids in beams]
    # and decode() drops what a sequence might carry besides words: <SOS>, padding, everything from <EOS> on
    words = beams[0]
    assert model.vocab.decode([cap.Vocabulary.SOS, *words, cap.Vocabulary.EOS, *words, cap.Vocabulary.PAD]) == \
        model.vocab.decode(words)


def test_beam_search_returns_the_best_hypothesis_when_none_ends(trained):
    model, _, _, embeds = trained
    beams = cap.beam_search(model.decoder, embeds[:4], 3, max_len=2)
    assert all(len(ids) == 2 for ids in beams)  # cut at max_len: still a caption, not nothing


def test_greedy_decoding_is_batched_and_per_image_independent():
    torch.manual_seed(0)
    decoder = cap.DecoderRNN(16, 32, vocab_size=30).eval()
    embeds = torch.randn(6, 16)
    batch = cap.beam_search(decoder, embeds, 1, max_len=7)
    assert len(batch) == 6 and all(len(ids) <= 7 for ids in batch)
    assert batch == [cap.beam_search(decoder, embeds[i:i + 1], 1, 7)[0] for i in range(6)]
    assert all(i not in (cap.Vocabulary.PAD, cap.Vocabulary.SOS, cap.Vocabulary.EOS) for ids in batch for i in ids)


def test_beam_search_on_a_random_model_returns_one_caption_per_image():
    torch.manual_seed(0)
    decoder = cap.DecoderRNN(16, 32, vocab_size=30).eval()
    embeds = torch.randn(4, 16)
    with torch.no_grad():
        beams = cap.beam_search(decoder, embeds, beam_size=3, max_len=6)
        assert len(beams) == 4 and all(len(ids) <= 6 for ids in beams)
        assert cap.beam_search(decoder, embeds, 1, 6) == greedy_decode(decoder, embeds, 6)


def test_beam_search_works_with_the_attention_decoder():
    torch.manual_seed(2)
    decoder = cap.AttentionDecoder(16, 32, vocab_size=25).eval()
    cells = torch.randn(5, 4, 16) * 3
    assert cap.beam_search(decoder, cells, 1, 8) == greedy_decode(decoder, cells, 8)
    beams = cap.beam_search(decoder, cells, beam_size=3, max_len=8)
    assert beams == [cap.beam_search(decoder, cells[i:i + 1], 3, 8)[0] for i in range(5)] and all(beams)


def test_batched_beam_search_equals_one_image_at_a_time():
    torch.manual_seed(1)
    decoder = cap.DecoderRNN(16, 32, vocab_size=25).eval()
    embeds = torch.randn(7, 16) * 3
    batched = cap.beam_search(decoder, embeds, beam_size=4, max_len=8)
    assert batched == [cap.beam_search(decoder, embeds[i:i + 1], 4, 8)[0] for i in range(7)]
    assert all(batched)  # <EOS> can never come first: no empty captions
