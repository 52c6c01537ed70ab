import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

import flickr_image_caption_with_pytorch_resnet_lstm as cap  # noqa: E402

SCRIPT = ROOT / "flickr_image_caption_with_pytorch_resnet_lstm.py"
# A small demo run that still shows the model reading the image (see tests/test_demo.py for figures).
SMALL_DEMO = ["--dataset=demo", "--demo_images=1000", "--image_size=96", "--num_epochs=16",
              "--batch_size=32", "--learning_rate=0.002", "--embed_size=128", "--hidden_size=256",
              "--sample_every=0", "--num_workers=0", "--seed=3"]


def greedy_decode(decoder, image_embeds, max_len):
    """The reference that beam search with beam_size=1 must match: the most likely word at each step."""
    state = decoder.start(image_embeds)
    tokens = torch.full((image_embeds.size(0),), cap.Vocabulary.SOS)
    steps = []
    for t in range(max_len):
        logp, state = decoder.step(tokens, state, first=t == 0)
        tokens = logp.argmax(-1)
        steps.append(tokens)
    ids = torch.stack(steps, 1).tolist()
    return [seq[:seq.index(cap.Vocabulary.EOS)] if cap.Vocabulary.EOS in seq else seq for seq in ids]


def rewritten(source, target, change, rehash=True):
    """A copy of a checkpoint changed by change(ckpt), its checksum redone (rehash) as a careful tamperer would,
    so that only the structural checks can refuse it."""
    ckpt = torch.load(source, weights_only=True)
    change(ckpt)
    if rehash:
        ckpt["model_sha256"] = cap.model_sha256(ckpt)
    torch.save(ckpt, target)
    return target


def error_line(err):
    """The one line a refused run prints to stderr ('error: ...'), checked to be its only error and traceback-free."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


def shared(*parts):
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the team's shared data is not beside this clone)")
    return path


def run_script(*args, timeout=300, **kwargs):
    """Runs the script as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kwargs)


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory):
    """A random-init ResNet50 .pth, as a user's downloaded file would hold real weights."""
    path = tmp_path_factory.mktemp("weights") / "resnet50-test.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def demo_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    return {"data_dir": base / "data", "cache_dir": base / "cache"}


# A demo a test makes for itself, in its own folders, when the shared one will not do: as small as the checks allow.
TINY_DEMO = ["--dataset=demo", "--demo_images=60", "--image_size=64", "--batch_size=16", "--embed_size=32",
             "--hidden_size=64", "--sample_every=0", "--num_workers=0", "--beam_size=1"]


def demo_args(demo_dirs, weights, out, *extra):
    return [*SMALL_DEMO, f"--data_dir={demo_dirs['data_dir']}", f"--cache_dir={demo_dirs['cache_dir']}",
            f"--encoder_weights={weights}", f"--output_dir={out}", *extra]


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory, demo_dirs, random_weights):
    """One small demo training run shared by the tests that need a trained model."""
    out = tmp_path_factory.mktemp("demo_out")
    assert cap.main(demo_args(demo_dirs, random_weights, out)) == 0
    return out


@pytest.fixture(scope="session")
def trained_run(trained_demo, demo_dirs, random_weights):
    """The trained demo model (best.pt), its data and settings, loaded as the script itself loads them."""
    cfg = cap.resolve_settings(cap.parse_args(demo_args(demo_dirs, random_weights, trained_demo))[0])
    model, _ = cap.restore(trained_demo / "best.pt")
    return model.eval(), cap.prepare_data(cfg, torch.device("cpu")), cfg


@pytest.fixture(scope="session")
def trained_attention(tmp_path_factory, demo_dirs, random_weights, trained_demo):
    """A short attention-decoder run on the same demo set (after trained_demo, which makes it): enough for its
    checkpoint, grid cache and figures, not for good captions."""
    out = tmp_path_factory.mktemp("attention_out")
    assert cap.main(demo_args(demo_dirs, random_weights, out, "--decoder=attention", "--num_epochs=1",
                              "--max_batches_per_epoch=20", "--beam_size=1")) == 0
    return out
