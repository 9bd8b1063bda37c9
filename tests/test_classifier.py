"""The reference MNIST classifier (ddpm_lightning/classifier.py): network, training recipe, weights file, sha256,
paths, and ddpm-train-classifier. The fixtures ``fake_root`` and ``fake_clf`` (conftest.py) serve test_metrics.py
too."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ddpm_lightning import classifier as C
from ddpm_lightning import metrics as M
from ddpm_lightning.errors import ConfigError
from ddpm_lightning.images import as_model_input

from mnist_fixtures import padded

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def test_classifier_shapes_and_roundtrip(fake_clf):
    model, meta = C.load_classifier(fake_clf)
    x = as_model_input(padded(5, 0))
    assert model.features(x).shape == (5, C.FEATURE_DIM) and model(x).shape == (5, 10)
    assert set(meta) >= {"test_accuracy", "epochs", "seed", "sha256_of_weights", "created", "version"}
    assert meta["sha256_of_weights"] == C.weights_sha256(model) and len(meta["sha256_of_weights"]) == 64
    blob = torch.load(fake_clf, weights_only=True)  # plain tensors and builtins only
    assert set(blob) == {"state_dict", "meta"}
    # same uint8 images in either layout -> the same features
    u8 = padded(4, 1)
    f1, p1 = M.classifier_outputs(u8, model)
    f2, p2 = M.classifier_outputs(u8.permute(0, 2, 3, 1), model)
    assert torch.equal(f1, f2) and torch.allclose(p1.sum(1), torch.ones(4, dtype=torch.float64))


def test_training_is_seeded(fake_root, fake_clf, tmp_path):
    again = C.train_classifier(fake_root, tmp_path / "again.pt", max_steps=3, batch_size=32, verbose=False)
    assert again["sha256_of_weights"] == C.load_classifier(fake_clf)[1]["sha256_of_weights"]


def test_load_classifier_errors(tmp_path, fake_clf):
    with pytest.raises(
        ConfigError, match=r"classifier_path=.*no such file; train one there with ddpm-train-classifier data.root="
    ):
        C.load_classifier(tmp_path / "missing.pt")
    blob = torch.load(fake_clf, weights_only=True)
    blob["state_dict"]["head.bias"] = blob["state_dict"]["head.bias"] + 1
    torch.save(blob, tmp_path / "tampered.pt")
    with pytest.raises(ConfigError, match="sha256"):
        C.load_classifier(tmp_path / "tampered.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a file")
    with pytest.raises(ConfigError, match="not a readable classifier file"):
        C.load_classifier(tmp_path / "junk.pt")


def test_missing_classifier_error_names_the_key_and_rekeys_under_a_config_node(tmp_path):
    missing = tmp_path / "mine" / "clf.pt"
    hint = (
        f"no such file; train one there with ddpm-train-classifier data.root=../data out={missing}, or leave it unset "
        "(null) for the packaged reference classifier"
    )
    err = C.missing_classifier_error(missing, root="../data")
    assert isinstance(err, ConfigError) and str(err) == f"classifier_path={str(missing)!r} is invalid: {hint}"
    assert (err.key, err.value, err.allowed) == ("classifier_path", str(missing), hint)
    assert str(err.at("callbacks.fid")) == f"callbacks.fid.classifier_path={str(missing)!r} is invalid: {hint}"
    assert "data.root=<dir containing MNIST/raw> out=" in str(C.missing_classifier_error(missing))
    with pytest.raises(ConfigError) as info:  # load_classifier raises the same error, without a data.root to suggest
        C.load_classifier(missing)
    assert str(info.value) == str(C.missing_classifier_error(missing)) and info.value.key == "classifier_path"


def test_train_classifier_checks_its_own_parameters_before_reading_data(tmp_path):
    for kwargs, message in [
        ({"epochs": 0}, "epochs=0 is invalid: must be an integer >= 1"),
        ({"batch_size": 2.0}, "batch_size=2.0 is invalid: must be an integer >= 1"),
        ({"seed": -1}, "seed=-1 is invalid: must be an integer >= 0"),
        ({"max_steps": 0}, "max_steps=0 is invalid: must be null or a positive integer"),
        ({"train_size": True}, "train_size=True is invalid: must be null or a positive integer"),
        (
            {"out_path": tmp_path},
            f"out={str(tmp_path)!r} is invalid: is a folder; give a file path such as mnist_classifier.pt",
        ),
    ]:
        with pytest.raises(ConfigError) as info:
            C.train_classifier(tmp_path / "no-data", **{"out_path": tmp_path / "c.pt", **kwargs})
        assert str(info.value) == message and info.value.key == message.split("=")[0]


def test_load_classifier_rejects_other_files_naming_classifier_path(tmp_path, fake_clf):
    blob = torch.load(fake_clf, weights_only=True)
    cases = {
        "list.pt": ([1, 2], "not a ddpm-train-classifier file (no state_dict/meta)"),
        "v2.pt": (
            {**blob, "meta": {**blob["meta"], "version": 2}},
            "classifier format version 2, expected 1; retrain with ddpm-train-classifier",
        ),
        "small.pt": (
            {**blob, "state_dict": {"head.bias": torch.zeros(10)}},
            "weights do not fit MNISTClassifier; retrain it",
        ),
    }
    for name, (content, allowed) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(ConfigError) as info:
            C.load_classifier(tmp_path / name)
        assert str(info.value) == f"classifier_path={str(tmp_path / name)!r} is invalid: {allowed}"
        assert str(info.value.at("evaluate")).startswith("evaluate.classifier_path=")


def test_a_missing_packaged_reference_asks_for_a_reinstall(tmp_path, monkeypatch):
    gone = tmp_path / "assets" / "mnist_classifier.pt"
    monkeypatch.setattr(C, "reference_classifier_path", lambda: gone)
    for path in (None, gone):  # the default, or the same file named explicitly: training one there is refused
        with pytest.raises(ConfigError, match=r"^the packaged reference classifier .* is missing: reinstall"):
            C.load_classifier(path)


def test_as_model_input_layouts_and_errors():
    u8 = padded(3, 2)
    x = as_model_input(u8)
    assert x.dtype == torch.float32 and x.shape == (3, 1, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(as_model_input(u8.permute(0, 2, 3, 1)), x) and torch.equal(as_model_input(x), x)
    assert torch.equal(as_model_input(u8.numpy()), x)
    with pytest.raises(ValueError, match=r"must be 4-D .* got shape \(1, 32, 32\)"):
        as_model_input(u8[0])
    with pytest.raises(ValueError, match=r"got shape \(3, 1, 28, 28\)"):
        as_model_input(u8[..., :28, :28])
    with pytest.raises(ValueError, match="must be uint8 .* got torch.int32"):
        as_model_input(u8.int())


def test_trained_classifier_path_respects_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPM_LIGHTNING_CACHE", str(tmp_path))
    assert C.trained_classifier_path() == tmp_path / "mnist_classifier.pt"
    monkeypatch.delenv("DDPM_LIGHTNING_CACHE")
    assert C.trained_classifier_path() == Path.home() / ".cache" / "ddpm_lightning" / "mnist_classifier.pt"
    with pytest.raises(ConfigError, match="is the packaged reference classifier"):
        C.train_classifier("unused", C.reference_classifier_path())


def test_the_packaged_reference_classifier_is_the_default_and_its_sha256_is_pinned(tmp_path, monkeypatch):
    path = C.reference_classifier_path()
    assert path.is_file() and path.stat().st_size < 1_000_000
    model, meta = C.load_classifier()  # the default: no file of the user's needed
    assert meta["sha256_of_weights"] == C.REFERENCE_CLASSIFIER_SHA256 == C.weights_sha256(model)
    assert meta["reference"] is True and meta["test_accuracy"] >= 0.99
    assert sum(p.numel() for p in model.parameters()) < 200_000
    # weights that no longer match the pinned sha256 (an edited or corrupt install): one line, not a silent yardstick
    blob = torch.load(path, weights_only=True)
    blob["state_dict"]["head.bias"] = blob["state_dict"]["head.bias"] + 1e-3
    blob["meta"]["sha256_of_weights"] = "0" * 64
    forged = tmp_path / "assets" / "mnist_classifier.pt"
    forged.parent.mkdir()
    torch.save(blob, forged)
    monkeypatch.setattr(C, "reference_classifier_path", lambda: forged)
    with pytest.raises(ConfigError, match=r"^the packaged reference classifier .* not the pinned 86e9968c") as info:
        C.load_classifier()
    assert "\n" not in str(info.value)


def test_train_classifier_cli(fake_root, tmp_path, run_command):
    out = tmp_path / "c.pt"
    proc = run_command(
        "ddpm-train-classifier", [f"data.root={fake_root}", f"out={out}", "max_steps=2", "batch_size=16"], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout and C.load_classifier(out)[1]["sha256_of_weights"] in proc.stdout
    bad = run_command("ddpm-train-classifier", [f"data.root={fake_root}", "epochs=zero"], cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: epochs='zero' is invalid: must be an integer"
    missing = run_command("ddpm-train-classifier", [f"data.root={tmp_path / 'none'}", f"out={out}"], cwd=tmp_path)
    assert missing.returncode == 2 and "\n" not in missing.stderr.strip() and "data.root" in missing.stderr
