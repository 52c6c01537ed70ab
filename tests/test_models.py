"""EncoderCNN, DecoderRNN and loading ResNet50 weights safely."""
import hashlib
import io
import pickle
from types import SimpleNamespace

import pytest
import torch
import torchvision
from PIL import Image

from conftest import cap


def model_args(**changes):
    """Captioner's args: the MODEL_ARGS dict, small sizes unless changed."""
    args = dict(decoder="lstm", embed_size=16, hidden_size=32, num_layers=2, dropout=0.3, image_size=224)
    return args | changes


def test_the_weights_file_is_loaded_and_extraction_never_changes_it(tmp_path, random_weights):
    """The frozen ResNet50: its weights are the file's, and extracting features (in eval mode) leaves
    its BatchNorm running statistics as they were."""
    saved = torch.load(random_weights, weights_only=True)
    resnet = cap.load_resnet50(random_weights)
    assert torch.equal(resnet.conv1.weight, saved["conv1.weight"])
    resnet.train()  # as a careless caller might hand it over
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    cfg = SimpleNamespace(image_size=64, batch_size=4, num_workers=0, decoder="lstm")
    cap.extract_features(cap.EncoderCNN(1, resnet), [tmp_path / "red.png"], cfg, torch.device("cpu"))
    after = resnet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_encoder_standardises_and_projects_cached_features():
    encoder = cap.EncoderCNN(16)
    encoder.feature_mean.fill_(1.0)
    encoder.feature_std.fill_(2.0)
    features = torch.randn(3, 2048)
    assert torch.allclose(encoder(features), encoder.embed((features - 1) / 2))
    model = cap.Captioner(cap.Vocabulary(1).build_vocab(["a b"]), model_args())
    assert model.args == model_args()
    assert {k for k in model.state_dict() if k.startswith("encoder.")} == {
        "encoder.feature_mean", "encoder.feature_std", "encoder.embed.weight", "encoder.embed.bias"}


def test_decoder_shapes():
    decoder = cap.DecoderRNN(16, 32, vocab_size=50, num_layers=2)
    captions = torch.randint(4, 50, (5, 9))
    assert decoder(torch.randn(5, 16), captions).shape == (5, 8, 50)


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
    """Unpickled, it creates the marker file: proof that loading ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def one_line_refusal(call, *needles):
    """The UserError's message, checked to be one line holding each needle."""
    with pytest.raises(cap.UserError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and all(needle in message for needle in needles), message
    return message


def test_pickled_payload_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "resnet50-custom.pth"
    path.write_bytes(pickle.dumps({"conv1.weight": Payload(marker)}, protocol=2))
    one_line_refusal(lambda: cap.load_resnet50(path), f"{path} cannot be read as plain tensors", "run ./setup.sh")
    assert not marker.exists()


def payload_named_by_its_hash(folder, marker):
    """A pickle that runs code, named as torchvision names its files: resnet50-<its own sha256 prefix>.pth, so
    that the name check passes and only the refusal to unpickle stands between it and the payload."""
    buffer = io.BytesIO()
    torch.save({"conv1.weight": Payload(marker)}, buffer)  # PyTorch's own zip format, as a real .pth
    data = buffer.getvalue()
    path = folder / f"resnet50-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    path.write_bytes(data)
    torch.load(path, weights_only=False)["conv1.weight"].close()  # unpickled, it runs: the marker is made
    assert marker.exists()
    marker.unlink()
    return path


def test_a_pickle_named_with_its_own_hash_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "payload-ran"
    path = payload_named_by_its_hash(tmp_path, marker)
    one_line_refusal(lambda: cap.load_resnet50(path), f"{path} cannot be read as plain tensors (UnpicklingError)",
                     "run ./setup.sh", "(resnet50-0676ba61.pth)")
    assert not marker.exists()


def test_a_pickle_named_with_its_own_hash_is_refused_by_caption(tmp_path, trained_demo, demo_dirs, capsys):
    marker = tmp_path / "payload-ran"
    path = payload_named_by_its_hash(tmp_path, marker)
    image = sorted((demo_dirs["data_dir"] / "Images").iterdir())[0]
    assert cap.main(["--caption", str(image), f"--checkpoint={trained_demo / 'best.pt'}",
                     f"--encoder_weights={path}"]) == 2
    captured = capsys.readouterr()
    (line,) = [line for line in captured.err.splitlines() if not line.startswith(("settings", "  "))]
    assert line.startswith(f"error: {path} cannot be read as plain tensors") and "run ./setup.sh" in line
    assert captured.out == "" and not marker.exists()


def test_truncated_file_without_a_hash_is_called_damaged(tmp_path, random_weights):
    path = tmp_path / "my-resnet50.pth"
    path.write_bytes(random_weights.read_bytes()[:5000])
    one_line_refusal(lambda: cap.load_resnet50(path), f"{path} cannot be read as plain tensors", "it is damaged",
                     "run ./setup.sh")


def test_wrong_weights_or_missing_file(tmp_path):
    path = tmp_path / "resnet50-other.pth"
    torch.save({"fc.weight": torch.zeros(3)}, path)
    one_line_refusal(lambda: cap.load_resnet50(path), f"{path} does not hold ResNet50 weights (Error(s) in loading "
                     f"state_dict for ResNet: Missing key(s) in state_dict: ", "): run ./setup.sh")
    one_line_refusal(lambda: cap.load_resnet50(tmp_path / "absent.pth"), "absent.pth not found: run ./setup.sh")


class LegacyDict(dict):
    """Stands for the old torch.hub file's pickled types, which weights_only=True refuses."""


def test_the_old_torch_hub_format_is_refused_in_one_line_that_says_run_setup(tmp_path, random_weights):
    assert cap.encoder_weights == "resources/models/resnet50-0676ba61.pth"  # what ./setup.sh fetches now
    # intact (its name's hash checks), and still refused: reading it would mean unpickling
    path = named_by_hash(tmp_path, LegacyDict(torch.load(random_weights, weights_only=True)))
    one_line_refusal(lambda: cap.load_resnet50(path), f"{path} cannot be read as plain tensors (UnpicklingError)",
                     "torch.hub's old format (resnet50-19c8e357.pth)", "run ./setup.sh", "(resnet50-0676ba61.pth)")
    # under the old file's own name (its content cannot match that hash here): refused before it is read
    legacy = path.rename(tmp_path / "resnet50-19c8e357.pth")
    one_line_refusal(lambda: cap.load_resnet50(legacy), f"{legacy} is corrupt or incomplete",
                     "delete it and run ./setup.sh")


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
    assert cap.EncoderCNN(1, resnet).grid(torch.randn(1, 3, 64, 64)).shape == (1, 4, 2048)  # a 2x2 grid at 64 px


def test_weights_that_cannot_be_read_are_one_line(tmp_path, random_weights, monkeypatch):
    path = named_by_hash(tmp_path, torch.load(random_weights, weights_only=True))
    real_open = open

    def denied(file, *args, **kwargs):  # as chmod 000 would for a user other than root
        if str(file) == str(path.resolve()):
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(cap.UserError, match=f"cannot read ResNet50 weights {path}: Permission denied"):
        cap.load_resnet50(path)
