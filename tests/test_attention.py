"""The attention decoder: its shapes and state, that it looks at the image, its penalty, and end to end (conftest's
trained_attention run): its checkpoint, its test report's figures, --evaluate with its maps, a resume refused."""
import json

import pandas as pd
import pytest
import torch

from conftest import cap, demo_args
from test_models import model_args


def test_an_attention_run_records_its_decoder_and_its_demo_figures_are_its_captions(trained_attention, demo_dirs):
    ckpt = torch.load(trained_attention / "best.pt", weights_only=True)
    assert ckpt["model_args"]["decoder"] == ckpt["config"]["decoder"] == "attention"
    assert {"encoder.embed.weight", "decoder.key.weight", "decoder.gate.weight"} <= set(ckpt["model"])
    report = json.loads((trained_attention / "test_metrics.json").read_text())
    captions = pd.read_csv(trained_attention / "test_captions.csv", keep_default_na=False)
    assert report["beam_size"] == 1 and report["images"] == len(captions) == 100  # so these are the greedy ones
    greedy, shapes = dict(zip(captions["image"], captions["caption"])), cap.demo_truth(demo_dirs["data_dir"])
    (single, n_single), (two, n_two) = (cap.demo_accuracy(greedy, shapes, n) for n in (1, 2))
    assert n_single + n_two == 100 and n_two > 10
    assert report["scale"] == 100  # figures are stored x100, as they are shown
    assert report["demo_colour_shape_accuracy"] == pytest.approx(100 * single)
    assert report["demo_two_shape_accuracy"] == pytest.approx(100 * two)


def test_evaluate_an_attention_checkpoint_with_its_maps(trained_attention, demo_dirs, random_weights):
    assert cap.main(demo_args(demo_dirs, random_weights, trained_attention, "--evaluate", "--beam_size=3")) == 0
    report = json.loads((trained_attention / "test_metrics-best-beam3.json").read_text())
    assert report["images"] == 100 and "demo_two_shape_accuracy" in report
    captions = pd.read_csv(trained_attention / "test_captions-best-beam3.csv", keep_default_na=False)
    caption_of = dict(zip(captions["image"], captions["caption"]))
    page = (trained_attention / "report-best-beam3.html").read_text()
    rows = json.loads(page.split('type="application/json">')[1].split("</script>")[0])["rows"]
    assert len(rows) == 100
    for row in rows:  # each generated word with its map (96 px: a 3x3 grid), on the results page
        name, maps = row["name"], row["maps"]
        assert [w for w, _ in maps] == caption_of[name].split()
        assert all(len(m) == 9 and abs(sum(m) - 1) < 0.01 for _, m in maps)


def test_resuming_with_the_other_decoder_is_refused(demo_dirs, random_weights, trained_attention, capsys):
    """--resume takes the decoder from the checkpoint; naming the other one is refused, naming it."""
    assert cap.main(demo_args(demo_dirs, random_weights, trained_attention, "--resume", "--decoder=lstm")) == 2
    error = capsys.readouterr().err
    assert "--decoder=lstm" in error and "decoder=attention" in error


def test_attention_decoder_shapes_and_state_contract():
    torch.manual_seed(0)
    decoder = cap.AttentionDecoder(16, 32, vocab_size=50, num_layers=3)
    cells, captions = torch.randn(5, 9, 16), torch.randint(4, 50, (5, 8))  # a 3x3 grid of 16-d cells
    logits, alphas = decoder(cells, captions, alphas=True)
    assert logits.shape == (5, 7, 50) and alphas.shape == (5, 7, 9)
    assert torch.allclose(alphas.sum(-1), torch.ones(5, 7))  # a distribution over the grid at every word
    state = decoder.start(cells)
    assert isinstance(state, cap.AttentionState) and state.h.shape == state.c.shape == (3, 5, 32)
    assert all(s.size(1) == 5 for s in state)  # the batch in dimension 1, for reorder
    logp, state = decoder.step(torch.full((5,), cap.Vocabulary.SOS), state, first=True)
    assert logp.shape == (5, 50) and all(s.size(1) == 5 for s in state)
    assert torch.equal(state.alpha[0], decoder(cells, captions[:, :2], alphas=True)[1][:, 0])
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


def test_the_doubly_stochastic_penalty_is_training_only():
    torch.manual_seed(0)
    vocab = cap.Vocabulary(1).build_vocab(["a red circle on the left"])
    model = cap.Captioner(vocab, model_args(dropout=0.0, decoder="attention"))
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
