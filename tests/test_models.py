"""EncoderCNN, DecoderRNN and loading ResNet50 weights safely."""
import hashlib
import pickle

import pytest
import torch
import torchvision

from conftest import cap, greedy_decode


def test_encoder_loads_the_weights_file_and_is_frozen(random_weights):
    saved = torch.load(random_weights, weights_only=True)
    encoder = cap.EncoderCNN(32, cap.load_resnet50(random_weights))
    assert torch.equal(encoder.resnet.conv1.weight, saved["conv1.weight"])
    assert not any(p.requires_grad for p in encoder.resnet.parameters())
    assert all(p.requires_grad for p in encoder.embed.parameters())
    images = torch.randn(2, 3, 64, 64)
    encoder(images).sum().backward()
    assert all(p.grad is None for p in encoder.resnet.parameters()) and encoder.embed.weight.grad is not None


def test_batchnorm_statistics_never_change_in_train_mode(random_weights):
    encoder = cap.EncoderCNN(32, cap.load_resnet50(random_weights))
    before = {k: v.clone() for k, v in encoder.resnet.state_dict().items()}
    encoder.train()
    assert not encoder.resnet.training and encoder.embed.training
    for _ in range(2):
        encoder(torch.randn(4, 3, 64, 64) * 3 + 1)
    after = encoder.resnet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_encoder_takes_cached_features_too():
    encoder = cap.EncoderCNN(16)
    encoder.feature_mean.fill_(1.0)
    encoder.feature_std.fill_(2.0)
    features = torch.randn(3, 2048)
    assert torch.allclose(encoder(features), encoder.embed((features - 1) / 2))
    model = cap.Captioner(cap.Vocabulary(1).build_vocab(["a b"]), 16, 32, resnet=encoder.resnet)
    assert {k for k in model.trainable_state_dict() if k.startswith("encoder.")} == {
        "encoder.feature_mean", "encoder.feature_std", "encoder.embed.weight", "encoder.embed.bias"}


def test_decoder_shapes():
    decoder = cap.DecoderRNN(16, 32, vocab_size=50, num_layers=2)
    captions = torch.randint(4, 50, (5, 9))
    assert decoder(torch.randn(5, 16), captions).shape == (5, 8, 50)


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


def test_attention_decoder_shapes_and_state_contract():
    torch.manual_seed(0)
    decoder = cap.AttentionDecoder(16, 32, vocab_size=50, num_layers=3)
    cells, captions = torch.randn(5, 9, 16), torch.randint(4, 50, (5, 8))  # a 3x3 grid of 16-d cells
    logits, alphas = decoder(cells, captions, alphas=True)
    assert logits.shape == (5, 7, 50) and alphas.shape == (5, 7, 9)
    assert torch.allclose(alphas.sum(-1), torch.ones(5, 7))  # a distribution over the grid at every word
    state = decoder.start(cells)
    assert all(s.size(1) == 5 for s in state) and state[0].shape == (3, 5, 32)  # the batch in dimension 1
    logp, state = decoder.step(torch.full((5,), cap.Vocabulary.SOS), state, first=True)
    assert logp.shape == (5, 50) and all(s.size(1) == 5 for s in state)
    assert torch.isinf(logp[:, [cap.Vocabulary.PAD, cap.Vocabulary.SOS, cap.Vocabulary.EOS]]).all()
    decoder.eval()  # teacher forcing and step by step give the same words
    logits = decoder(cells, captions)
    state, steps = decoder.start(cells), []
    for t in range(7):
        logp, state = decoder.step(captions[:, t], state)
        steps.append(logp)
    assert torch.allclose(torch.stack(steps, 1)[..., 4:], logits.log_softmax(-1)[..., 4:], atol=1e-5)


def test_the_attention_decoder_looks_at_the_image():
    """Moving the only informative cell moves the attention with it: the context comes from the grid."""
    torch.manual_seed(0)
    decoder = cap.AttentionDecoder(8, 16, vocab_size=20).eval()
    with torch.no_grad():
        decoder.key.weight.zero_()
        decoder.key.weight[:, 0] = 5.0  # cells are keyed by their first feature only
        decoder.score.weight.fill_(1.0)
        cells = torch.zeros(2, 4, 8)
        cells[0, 1, 0] = cells[1, 3, 0] = 1.0
        _, alphas = decoder(cells, torch.randint(4, 20, (2, 3)), alphas=True)
    assert alphas[0, 0].argmax() == 1 and alphas[1, 0].argmax() == 3


def test_beam_search_works_with_the_attention_decoder():
    torch.manual_seed(2)
    decoder = cap.AttentionDecoder(16, 32, vocab_size=25).eval()
    cells = torch.randn(5, 4, 16) * 3
    assert cap.beam_search(decoder, cells, 1, 8) == greedy_decode(decoder, cells, 8)
    beams = cap.beam_search(decoder, cells, beam_size=3, max_len=8)
    assert beams == [cap.beam_search(decoder, cells[i:i + 1], 3, 8)[0] for i in range(5)] and all(beams)


def test_the_doubly_stochastic_penalty_is_training_only():
    torch.manual_seed(0)
    vocab = cap.Vocabulary(1).build_vocab(["a red circle on the left"])
    model = cap.Captioner(vocab, 16, 32, dropout=0.0, decoder="attention")
    cells, captions = torch.randn(3, 4, 2048), torch.randint(4, len(vocab), (3, 6))
    captions[0, 4:] = cap.Vocabulary.PAD  # a shorter caption: its padding looks at nothing
    with torch.no_grad():
        trained, _, _ = model.train()(cells, captions)
        validated, logits, targets = model.eval()(cells, captions)
        _, alphas = model.decoder(model.encoder(cells), captions, alphas=True)  # (3, 5, 4)
    alphas[0, 3:] = 0
    penalty = cap.DOUBLY_STOCHASTIC_WEIGHT * ((1 - alphas.sum(1)) ** 2).mean()
    cross_entropy = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                                      ignore_index=cap.Vocabulary.PAD)
    assert validated.item() == pytest.approx(cross_entropy.item()) and penalty > 0.01
    assert trained.item() == pytest.approx(cross_entropy.item() + penalty.item())


def named_by_hash(tmp_path, state):
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return path.rename(tmp_path / f"resnet50-{digest[:8]}.pth")


def test_hash_named_file_is_verified(tmp_path, random_weights):
    path = named_by_hash(tmp_path, torch.load(random_weights, weights_only=True))
    assert isinstance(cap.load_resnet50(path), torchvision.models.ResNet)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(cap.UserError, match=f"{path.name} is corrupt.*setup.sh"):
        cap.load_resnet50(path)


def test_truncated_torchvision_file_names_setup(tmp_path, random_weights):
    path = tmp_path / "resnet50-0676ba61.pth"
    path.write_bytes(random_weights.read_bytes()[:1000])
    with pytest.raises(cap.UserError, match="corrupt or incomplete.*setup.sh"):
        cap.load_resnet50(path)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_payload_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "resnet50-custom.pth"
    path.write_bytes(pickle.dumps({"conv1.weight": Payload(marker)}, protocol=2))
    with pytest.raises(cap.UserError, match="refused because loading it could run code"):
        cap.load_resnet50(path)
    assert not marker.exists()
    # a hash in the name is no licence either: only the known legacy torch.hub file may be unpickled
    named = named_by_hash(tmp_path, {"x": 1})
    named.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    named = named.rename(tmp_path / f"resnet50-{hashlib.sha256(named.read_bytes()).hexdigest()[:8]}.pth")
    with pytest.raises(cap.UserError, match="refused"):
        cap.load_resnet50(named)
    assert not marker.exists()


def test_truncated_file_without_a_hash_is_called_damaged(tmp_path, random_weights):
    path = tmp_path / "my-resnet50.pth"
    path.write_bytes(random_weights.read_bytes()[:5000])
    with pytest.raises(cap.UserError, match="is damaged or not a PyTorch weights file.*setup.sh"):
        cap.load_resnet50(path)


def test_batched_beam_search_equals_one_image_at_a_time():
    torch.manual_seed(1)
    decoder = cap.DecoderRNN(16, 32, vocab_size=25).eval()
    embeds = torch.randn(7, 16) * 3
    batched = cap.beam_search(decoder, embeds, beam_size=4, max_len=8)
    assert batched == [cap.beam_search(decoder, embeds[i:i + 1], 4, 8)[0] for i in range(7)]
    assert all(batched)  # <EOS> can never come first: no empty captions


def test_wrong_weights_or_missing_file(tmp_path):
    path = tmp_path / "resnet50-other.pth"
    torch.save({"fc.weight": torch.zeros(3)}, path)
    with pytest.raises(cap.UserError, match="does not hold ResNet50 weights"):
        cap.load_resnet50(path)
    with pytest.raises(cap.UserError, match="not found: run ./setup.sh"):
        cap.load_resnet50(tmp_path / "absent.pth")


class LegacyDict(dict):
    """Stands for the old torch.hub file's pickled types, which weights_only=True refuses."""


def test_known_legacy_file_is_unpickled_only_after_its_hash_checks(tmp_path, random_weights, monkeypatch):
    path = named_by_hash(tmp_path, LegacyDict(torch.load(random_weights, weights_only=True)))
    with pytest.raises(cap.UserError, match="refused"):
        cap.load_resnet50(path)  # a name not on the known list is never unpickled
    monkeypatch.setattr(cap, "KNOWN_LEGACY_WEIGHTS", {path.name})
    assert isinstance(cap.load_resnet50(path), torchvision.models.ResNet)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(cap.UserError, match="corrupt or incomplete"):
        cap.load_resnet50(path)  # tampered: the hash check stops it before any unpickling


def test_missing_weights_for_flickr8k_name_the_setup_step(tmp_path, capsys):
    data = tmp_path / "flickr8k"
    (data / "Images").mkdir(parents=True)
    for i in range(10):
        cap.Image.new("RGB", (8, 8)).save(data / "Images" / f"{i}.jpg")
    (data / "captions.txt").write_text("image,caption\n" + "".join(f"{i}.jpg,a caption\n" for i in range(10)))
    args = ["--dataset=flickr8k", f"--data_dir={data}", f"--encoder_weights={tmp_path / 'absent.pth'}",
            f"--output_dir={tmp_path / 'out'}", f"--cache_dir={tmp_path / 'cache'}"]
    assert cap.main(args) == 2
    assert "absent.pth not found: run ./setup.sh" in capsys.readouterr().err


def test_loading_the_backbone_leaves_the_global_rng_alone(random_weights):
    # else the same seed trains differently with and without a feature cache (which skips loading ResNet50)
    torch.manual_seed(1)
    resnet = cap.load_resnet50(random_weights)
    drawn = torch.rand(1)
    torch.manual_seed(1)
    assert torch.equal(drawn, torch.rand(1))
    saved = torch.load(random_weights, weights_only=True)
    tensors = {**dict(resnet.named_parameters()), **dict(resnet.named_buffers())}
    assert all(t.device.type == "cpu" for t in tensors.values()) and len(tensors) == len(saved) - 2  # less fc
    assert all(torch.equal(t, saved[k]) for k, t in tensors.items())
    assert cap.resnet_grid(resnet, torch.randn(1, 3, 64, 64)).shape == (1, 4, 2048)  # a 2x2 grid at 64 px
