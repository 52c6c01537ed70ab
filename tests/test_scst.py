"""Self-critical sequence training: the CIDEr-D reward, sampling, the phase in the loop, its resume, torchrun."""
import random
import shutil
import signal

import pandas as pd
import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from conftest import TINY_DEMO, cap, demo_args, error_line, greedy_decode, shared
from test_models import model_args
from test_training import assert_same_run, start_training, wait_for


def word_ids(gts, res):
    """Word ids (from 1) of the words in coco-caption style {image: [caption]} dicts, and the vocabulary size."""
    words = sorted({w for captions in [*gts.values(), *res.values()] for c in captions for w in c.split()})
    index = {w: i + 1 for i, w in enumerate(words)}
    return (lambda caption: [index[w] for w in caption.split()]), len(words) + 1


def test_cider_d_equals_coco_captions_cider_per_image_on_flickr8k():
    from pycocoevalcap.cider.cider import Cider
    frame = pd.read_csv(shared("flickr8k", "captions.txt"))
    refs = frame.groupby("image")["caption"].apply(list)
    rng = random.Random(0)
    gts = {i: [cap.metric_text(c) for c in refs[name]] for i, name in enumerate(sorted(refs.index)[:800])}
    # hypotheses of every kind: an own reference or a neighbour's, cut to 1-20 words (one word: no bigram at all)
    res = {i: [" ".join(rng.choice(gts[rng.choice([i, i, (i + 1) % len(gts)])]).split()[:rng.randint(1, 20)])]
           for i in gts}
    ids, vocab_size = word_ids(gts, res)
    reward = cap.CiderD([[ids(c) for c in gts[i]] for i in gts], vocab_size)
    hyps = pad_sequence([torch.tensor(ids(res[i][0])) for i in gts], batch_first=True)
    ours = reward(hyps, torch.arange(len(gts)))
    mean, theirs = Cider().compute_score(gts, res)
    assert ours.numpy() == pytest.approx(theirs, abs=1e-6)
    assert 0.3 < mean < 3 and (ours == 0).any()  # some hypotheses share nothing with their references
    # the same captions scored a few at a time, out of order and with repeats, score the same
    order = torch.tensor([5, 3, 3, 700, 0])
    assert reward(hyps[order], order).tolist() == pytest.approx(ours[order].tolist(), abs=1e-12)


def test_cider_d_of_hand_made_captions():
    # two images; the second's references share nothing with the first's
    reward = cap.CiderD([[[1, 2, 3, 4], [1, 2, 3, 5]], [[6, 7, 8]]], vocab_size=9)
    exact, other, empty = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[6, 7, 8, 0]]), torch.tensor([[0, 0]])
    first = torch.tensor([0])
    assert reward(exact, first) > reward(torch.tensor([[1, 2]]), first) > 0
    assert reward(other, first).item() == 0 and reward(empty, first).item() == 0
    assert reward(torch.tensor([[1]]), first).item() > 0  # one word, one column: no bigram, still scored
    # an n-gram every image has scores nothing: a document frequency of all images makes its idf 0
    everywhere = cap.CiderD([[[1, 2]], [[1, 3]]], vocab_size=4)
    assert everywhere(torch.tensor([[1]]), torch.tensor([0])).item() == 0


def test_the_reward_scores_only_the_words_it_is_told_to():
    # word 5 is punctuation here: left out of references and captions alike, wherever it stands
    scored = torch.tensor([False, True, True, True, True, False])
    plain, filtered = cap.CiderD([[[1, 2, 3]], [[4, 4]]], 6), cap.CiderD([[[1, 5, 2, 3, 5]], [[4, 5, 4]]], 6, scored)
    images = torch.tensor([0, 0, 1])
    hyps = torch.tensor([[1, 2, 3, 0, 0], [5, 1, 2, 5, 3], [4, 4, 5, 0, 0]])
    same = torch.tensor([[1, 2, 3], [1, 2, 3], [4, 4, 0]])
    assert filtered(hyps, images).tolist() == pytest.approx(plain(same, images).tolist())
    assert filtered(hyps, images)[0] > 0


def test_a_vocabulary_too_big_for_the_codes_is_refused():
    with pytest.raises(cap.UserError, match="raise --freq_threshold"):
        cap.CiderD([[[1, 2]]], vocab_size=60_000)


def test_suppress_unk_keeps_unk_out_of_scst_samples_and_their_greedy_baseline():
    torch.manual_seed(0)
    model = cap.Captioner(cap.Vocabulary(1).build_vocab([["a", "b", "c"]]), model_args())
    with torch.no_grad():
        model.decoder.to_vocab.bias[cap.Vocabulary.UNK] += 4.0  # a model that says <UNK> most
    inputs = torch.randn(4, 2048)
    words, logps = model(inputs, samples=5, max_len=6)
    assert (words == cap.Vocabulary.UNK).any()
    words, logps = model(inputs, samples=5, max_len=6, never=[cap.Vocabulary.UNK])
    assert not (words == cap.Vocabulary.UNK).any() and logps.isfinite().all()
    logps.sum().backward()  # still a gradient for REINFORCE
    assert model.decoder.to_vocab.weight.grad.abs().sum() > 0
    with torch.no_grad():
        greedy, _ = model.eval()(inputs, max_len=6, greedy=True, never=[cap.Vocabulary.UNK])
    assert not (greedy == cap.Vocabulary.UNK).any()


@pytest.mark.parametrize("decoder", ["lstm", "attention"])
def test_sampled_captions_end_with_eos_and_respect_max_len(decoder):
    torch.manual_seed(0)
    vocab = cap.Vocabulary(1).build_vocab([["a", "b", "c"]])
    model = cap.Captioner(vocab, model_args(decoder=decoder))
    inputs = torch.randn(3, 4, 2048) if decoder == "attention" else torch.randn(3, 2048)
    words, logps = model(inputs, samples=4, max_len=6)
    assert words.shape == logps.shape and words.shape[0] == 12 and words.shape[1] <= 6
    for seq, logp in zip(words.tolist(), logps):
        assert seq[0] not in (cap.Vocabulary.PAD, cap.Vocabulary.SOS, cap.Vocabulary.EOS)
        end = seq.index(cap.Vocabulary.EOS) + 1 if cap.Vocabulary.EOS in seq else len(seq)
        assert cap.Vocabulary.SOS not in seq and cap.Vocabulary.PAD not in seq[:end]
        assert set(seq[end:]) <= {cap.Vocabulary.PAD} and (logp[end:] == 0).all() and (logp[:end] < 0).all()
    logps.sum().backward()  # the sampled words' log-probabilities carry gradients to the decoder
    assert model.decoder.embed.weight.grad.abs().sum() > 0
    with torch.no_grad():
        greedy, _ = model.eval()(inputs, max_len=6, greedy=True)
        expected = greedy_decode(model.decoder, model.encoder(inputs), 6)
    assert [vocab.decode(seq) for seq in greedy.tolist()] == [vocab.decode(seq) for seq in expected]


@pytest.mark.parametrize("setting, message", [
    ("--scst_samples=1", "scst_samples=1: must be from 1 to 20"),
    ("--scst_baseline=best", "scst_baseline=best: must be 'mean' or 'greedy'"),
    ("--scst_learning_rate=0", "scst_learning_rate=0.0: must be a positive number"),
    ("--scst_epochs=-1", "scst_epochs=-1: must be 0 or more")])
def test_impossible_scst_settings_are_refused(tmp_path, setting, message, capsys):
    assert cap.main([*TINY_DEMO, f"--output_dir={tmp_path}", setting]) == 2
    assert message in error_line(capsys.readouterr().err)


def scst_args(demo_dirs, weights, out, *extra):
    return demo_args(demo_dirs, weights, out, "--num_epochs=1", "--scst_epochs=1", "--max_batches_per_epoch=6",
                     "--beam_size=1", *extra)


@pytest.fixture(scope="module")
def scst_run(tmp_path_factory, demo_dirs, random_weights, trained_demo):
    """One cross-entropy epoch, then a self-critical one, of 6 steps each, on the shared small demo."""
    out = tmp_path_factory.mktemp("scst")
    assert cap.main(scst_args(demo_dirs, random_weights, out, "--log_every=1")) == 0
    return out


def test_the_self_critical_phase_follows_in_the_same_files(scst_run):
    batches = pd.read_csv(scst_run / "loss_per_batch.csv")
    assert batches["phase"].tolist() == ["cross-entropy"] * 6 + ["self-critical"] * 6
    assert batches["step"].tolist() == list(range(1, 13)) and batches["epoch"].tolist() == [1] * 6 + [2] * 6
    scst = batches[batches["phase"] == "self-critical"]
    assert (scst["lr"] == 5e-5).all() and scst["reward"].between(0, 1000).all() and scst["greedy_cider"].notna().all()
    assert batches.loc[batches["phase"] == "cross-entropy", ["reward", "greedy_cider"]].isna().all().all()
    epochs = pd.read_csv(scst_run / "loss_per_epoch.csv")
    assert epochs["phase"].tolist() == ["cross-entropy", "self-critical"]
    # the epoch's reward is the mean of its steps' (6 steps of 32 images, 5 samples each)
    assert epochs["reward"].iloc[1:].tolist() == pytest.approx(scst.groupby("epoch")["reward"].mean().tolist())
    assert epochs["CIDEr"].notna().all() and (scst_run / "test_metrics.json").is_file()


def test_ctrl_c_mid_scst_resumes_exactly(tmp_path, demo_dirs, random_weights, scst_run):
    out = tmp_path / "out"
    process = start_training(scst_args(demo_dirs, random_weights, out, "--log_every=1"))
    batch_log = out / "loss_per_batch.csv"
    wait_for(lambda: batch_log.exists() and len(batch_log.read_text().splitlines()) >= 9, process)  # 2 SCST steps
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output[-2000:]
    assert torch.load(out / "last.pt", weights_only=True)["step"] > 6  # stopped in the self-critical phase
    assert cap.main(scst_args(demo_dirs, random_weights, out, "--log_every=1", "--resume")) == 0
    assert_same_run(out, scst_run)


def test_kill_9_mid_scst_resumes_exactly(tmp_path, demo_dirs, random_weights, scst_run):
    out = tmp_path / "out"
    process = start_training(scst_args(demo_dirs, random_weights, out, "--log_every=1"))
    batch_log = out / "loss_per_batch.csv"  # killed in the self-critical epoch: resumed from the cross-entropy one
    wait_for(lambda: batch_log.exists() and "self-critical" in batch_log.read_text(), process)
    process.kill()
    process.wait()
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    assert cap.main(scst_args(demo_dirs, random_weights, out, "--log_every=1", "--resume")) == 0
    assert_same_run(out, scst_run)


def test_changing_num_epochs_once_scst_has_begun_is_refused(tmp_path, demo_dirs, random_weights, scst_run, capsys):
    out = tmp_path / "out"
    shutil.copytree(scst_run, out)
    assert cap.main(scst_args(demo_dirs, random_weights, out, "--resume", "--num_epochs=2")) == 2
    line = error_line(capsys.readouterr().err)
    assert "--num_epochs=2" in line and "num_epochs=1" in line


def test_scst_added_with_resume_after_cross_entropy_is_the_same_run(tmp_path, demo_dirs, random_weights, scst_run,
                                                                     capsys):
    out = tmp_path / "out"
    assert cap.main(scst_args(demo_dirs, random_weights, out, "--log_every=1", "--scst_epochs=0")) == 0
    assert cap.main(scst_args(demo_dirs, random_weights, out, "--log_every=1", "--resume")) == 0
    echo = capsys.readouterr().out  # the settings that differ from the checkpoint's, and its value
    assert any("scst_epochs" in line and "the checkpoint's: 0" in line for line in echo.splitlines())
    assert_same_run(out, scst_run)


def test_the_greedy_baseline_trains_too_with_the_attention_decoder(tmp_path, random_weights):
    out = tmp_path / "out"
    assert cap.main([*TINY_DEMO, f"--data_dir={tmp_path / 'data'}", f"--encoder_weights={random_weights}",
                     f"--output_dir={out}", "--num_epochs=1", "--scst_epochs=1", "--scst_baseline=greedy",
                     "--scst_samples=1", "--decoder=attention"]) == 0
    batches = pd.read_csv(out / "loss_per_batch.csv")  # 48 training images in batches of 16
    assert (batches["phase"] == "self-critical").sum() == 3 and batches["reward"].notna().sum() == 3
