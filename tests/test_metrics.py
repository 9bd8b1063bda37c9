"""Sample-quality metrics (ddpm_lightning/metrics.py) and ddpm-evaluate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_lightning import classifier as C
from ddpm_lightning import metrics as M
from ddpm_lightning.errors import ConfigError

from mnist_fixtures import padded

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
METRIC_KEYS = {
    "n",
    "fid",
    "fid_floor",
    "floor_n",
    "n_test",
    "inception_score",
    "inception_score_test",
    "class_histogram",
    "normalised_entropy",
    "confident_fraction",
    "classifier_sha256",
    "classifier_test_accuracy",
    "mode",
    "classifier_path",
}


def _compose(overrides: list[str]):
    from ddpm_lightning.config import compose_config

    return compose_config("evaluate", overrides)  # as ddpm-evaluate composes (one line for bad keys and types)


# ------------------------------------------------------------------------------------------ Frechet distance
def test_frechet_diagonal_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
    s1, s2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = float(((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum())
    got = M.frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2))
    assert got == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(1 + 6.25 + (1 + 9 - 6) + (4 + 1 - 4) + 0)


def test_frechet_non_commuting_covariances():
    """sigma1 = I: tr((I S)^(1/2)) = sum sqrt(eig S), by hand; and symmetric in its arguments."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    s = a @ a.T + 0.1 * torch.eye(5, dtype=torch.float64)
    mu = torch.randn(5, generator=g, dtype=torch.float64)
    eye, zero = torch.eye(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    expected = float(mu.square().sum() + 5 + s.trace() - 2 * torch.linalg.eigvalsh(s).sqrt().sum())
    assert M.frechet_distance(zero, eye, mu, s) == pytest.approx(expected, rel=1e-10)
    assert M.frechet_distance(mu, s, zero, eye) == pytest.approx(expected, rel=1e-10)
    # two general SPD matrices: torchmetrics' formula (eig of the product) agrees
    from torchmetrics.image.fid import _compute_fid

    b = torch.randn(5, 5, generator=g, dtype=torch.float64)
    s2 = b @ b.T + 0.1 * eye
    ref = float(_compute_fid(mu, s, zero, s2))
    assert M.frechet_distance(mu, s, zero, s2) == pytest.approx(ref, rel=1e-8)
    assert M.frechet_distance(s2.diag(), s2, s2.diag(), s2) < 1e-9  # identical Gaussians


def test_fid_of_shifted_gaussian_samples_matches_mean_shift():
    """N(0, I) vs N(m, I) in 8 dims from 200,000 samples each: FID ~ ||m||^2."""
    g = torch.Generator().manual_seed(1)
    m = torch.tensor([1.0, -0.5, 0.0, 2.0, 0.0, 0.0, 0.3, 0.0], dtype=torch.float64)
    x = torch.randn(200_000, 8, generator=g, dtype=torch.float64)
    y = torch.randn(200_000, 8, generator=g, dtype=torch.float64) + m
    fid = M.frechet_distance(*M.gaussian_stats(x), *M.gaussian_stats(y))
    assert fid == pytest.approx(float(m.square().sum()), abs=0.01)
    assert M.frechet_distance(*M.gaussian_stats(x), *M.gaussian_stats(x)) < 1e-9


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes"):
        M.frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="at least 2"):
        M.gaussian_stats(torch.zeros(1, 4))


# ------------------------------------------------------------------------------------------ IS / coverage
def test_inception_score_extremes():
    one_hot = torch.eye(10).repeat(7, 1)  # 70 confident predictions, every class equally often
    assert M.inception_score(one_hot) == pytest.approx(10.0, rel=1e-12)
    assert M.inception_score(one_hot, splits=7) == pytest.approx(10.0, rel=1e-12)
    same = torch.softmax(torch.randn(1, 10), 1).repeat(50, 1)
    assert M.inception_score(same) == pytest.approx(1.0, abs=1e-12)
    assert M.inception_score(torch.eye(10)[[3] * 20]) == pytest.approx(1.0)  # mode collapse
    two = torch.eye(10)[[0, 1] * 10]
    assert M.inception_score(two) == pytest.approx(2.0)


def test_class_histogram_entropy_and_confidence():
    uniform = torch.eye(10).repeat(3, 1)
    hist = M.class_histogram(uniform)
    assert hist.tolist() == [3] * 10
    assert M.normalised_entropy(hist) == pytest.approx(1.0, abs=1e-12)
    single = M.class_histogram(torch.eye(10)[[4] * 9])
    assert single.tolist() == [0, 0, 0, 0, 9, 0, 0, 0, 0, 0]
    assert M.normalised_entropy(single) == 0.0 and math.copysign(1.0, M.normalised_entropy(single)) == 1.0  # not -0.0
    assert M.normalised_entropy(torch.tensor([1, 1, 0, 0, 0, 0, 0, 0, 0, 0])) == pytest.approx(
        math.log(2) / math.log(10)
    )
    probs = torch.tensor([[0.95, 0.05] + [0.0] * 8, [0.5, 0.5] + [0.0] * 8, [0.0] * 9 + [1.0], [0.1] * 10])
    assert M.confident_fraction(probs) == pytest.approx(0.5)
    assert M.confident_fraction(probs, threshold=0.99) == pytest.approx(0.25)
    assert M.confident_fraction(probs, threshold=0.1) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ classifier
# ------------------------------------------------------------------------------------------ classifier features
def test_fid_of_a_set_with_itself_is_zero(fake_clf):
    model, _ = C.load_classifier(fake_clf)
    imgs = padded(40, 3)
    fa, _ = M.classifier_outputs(imgs, model)
    scale = float(M.gaussian_stats(fa)[1].trace())
    assert M.classifier_fid(imgs, imgs, model) <= 1e-6 * scale
    assert M.classifier_fid(imgs, padded(40, 4), model) > 0


def test_evaluate_images_keys(fake_root, fake_clf):
    from ddpm_lightning.mnist import load_mnist_split

    model, meta = C.load_classifier(fake_clf)
    train, _ = load_mnist_split(fake_root, train=True)
    test, _ = load_mnist_split(fake_root, train=False)
    out = M.evaluate_images(padded(10, 5).permute(0, 2, 3, 1), model, test, train, meta=meta)
    assert out["n"] == 10 and out["floor_n"] == 10 and out["n_test"] == 32
    assert sum(out["class_histogram"]) == 10 and len(out["class_histogram"]) == 10
    assert 0 <= out["normalised_entropy"] <= 1 and 1 <= out["inception_score"] <= 10
    assert out["classifier_sha256"] == meta["sha256_of_weights"]
    same = M.evaluate_images(train[:20], model, test, train, meta=meta)
    assert same["fid"] == pytest.approx(same["fid_floor"])  # the images are the floor's images


# ------------------------------------------------------------------------------------------ CLIs
@pytest.fixture(scope="module")
def samples_npz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("samples") / "samples.npz"
    np.savez(path, padded(16, 7).permute(0, 2, 3, 1).numpy())  # ddpm-sample's layout (N, 32, 32, 1) uint8
    return path


def test_evaluate_cli_writes_metrics(fake_root, fake_clf, samples_npz, tmp_path, run_command):
    out = tmp_path / "eval"
    args = [f"samples={samples_npz}", f"data.root={fake_root}", f"classifier_path={fake_clf}", f"out_dir={out}"]
    proc = run_command("ddpm-evaluate", args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(data) and data["n"] == 16 and data["mode"] == "samples"
    assert "FID vs 32 test images" in proc.stdout and "Inception Score" in proc.stdout
    # the same out_dir again: refused (one line, exit 2) unless overwrite=true
    again = run_command("ddpm-evaluate", args, cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0 and "overwrite=true" in again.stderr
    assert "Traceback" not in again.stderr


def test_evaluate_needs_no_classifier_of_the_users(fake_root, samples_npz, tmp_path, run_command, monkeypatch):
    """An empty HOME and cache: the packaged reference classifier scores, and metrics.json names its sha256."""
    monkeypatch.delenv("DDPM_LIGHTNING_CACHE", raising=False)
    proc = run_command(
        "ddpm-evaluate",
        [f"samples={samples_npz}", f"data.root={fake_root}", f"out_dir={tmp_path / 'e'}"],
        cwd=tmp_path,
        env={"HOME": str(tmp_path / "home")},
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert data["classifier_sha256"] == C.REFERENCE_CLASSIFIER_SHA256 and data["classifier_reference"] is True
    assert f"the reference classifier {C.REFERENCE_CLASSIFIER_SHA256[:16]}" in proc.stdout
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("*.pt"))  # nothing in the cache


def test_a_missing_classifier_file_exits_2_with_a_hint_that_works(fake_root, samples_npz, tmp_path, run_command):
    missing = tmp_path / "mine" / "clf.pt"
    args = [
        f"samples={samples_npz}",
        f"data.root={fake_root}",
        f"out_dir={tmp_path / 'e'}",
        f"classifier_path={missing}",
    ]
    proc = run_command("ddpm-evaluate", args, cwd=tmp_path)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and f"ddpm-train-classifier data.root={fake_root} out={missing}," in line
    assert "leave it unset (null) for the packaged reference classifier" in line
    hint = line.split("train one there with ", 1)[1].split(",", 1)[0].split()  # the suggested command, as printed
    assert run_command(hint[0], hint[1:], cwd=tmp_path).returncode == 0 and missing.is_file()
    assert run_command("ddpm-evaluate", args, cwd=tmp_path).returncode == 0
    assert (
        run_command("ddpm-evaluate", [*args[:-1], "classifier_path=null", "overwrite=true"], cwd=tmp_path).returncode
        == 0
    )


def _evaluate(overrides: list[str]):
    from ddpm_lightning.evaluation import evaluate

    return evaluate(_compose(overrides))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ([], "exactly one of samples"),
        (["samples=nope.npz"], r"samples='nope.npz' is invalid: no such file"),
        (["samples=real", "ckpt_path=x.ckpt"], "exactly one of samples"),
        (["ckpt_path=missing.ckpt"], r"ckpt_path='missing.ckpt' is invalid: no such checkpoint file"),
        (["samples=real", "n=1"], r"n=1 is invalid"),
        (["samples=real", "train_classifier_if_missing=maybe"], "train_classifier_if_missing='maybe' is invalid"),
        (["samples=real", "classifier_epochs=0"], "classifier_epochs=0 is invalid"),
        (["samples=real", "n=100000"], r"n=100000 is invalid: exceeds the 64 training images"),
        (["samples=real", "nll=true"], r"nll=True is invalid: the bound needs the network: give ckpt_path="),
        (["samples=real", "nll=maybe"], r"nll='maybe' is invalid"),
    ],
)
def test_evaluate_bad_inputs(overrides, match, fake_root, fake_clf, tmp_path):
    with pytest.raises(ConfigError, match=match) as info:
        _evaluate([*overrides, f"data.root={fake_root}", f"classifier_path={fake_clf}", f"out_dir={tmp_path}"])
    assert "\n" not in str(info.value)


def test_evaluate_bad_data_and_samples(fake_clf, tmp_path, fake_root, samples_npz):
    from ddpm_lightning.errors import MNISTDataError

    with pytest.raises(MNISTDataError, match="data.root"):
        _evaluate(
            ["samples=real", f"data.root={tmp_path / 'empty'}", f"classifier_path={fake_clf}", f"out_dir={tmp_path}"]
        )
    bad = tmp_path / "bad.npz"
    np.savez(bad, np.zeros((4, 28, 28), dtype=np.uint8))
    with pytest.raises(ConfigError, match=r"arr_0 must be \(N, 32, 32, 1\)"):
        _evaluate([f"samples={bad}", f"data.root={fake_root}", f"classifier_path={fake_clf}", f"out_dir={tmp_path}"])
    np.savez(bad, np.zeros((4, 32, 32, 1), dtype=np.float32))
    with pytest.raises(ConfigError, match="must be uint8"):
        _evaluate([f"samples={bad}", f"data.root={fake_root}", f"classifier_path={fake_clf}", f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="n=17 is invalid: exceeds the 16 images"):
        _evaluate(
            [
                f"samples={samples_npz}",
                "n=17",
                f"data.root={fake_root}",
                f"classifier_path={fake_clf}",
                f"out_dir={tmp_path}",
            ]
        )


def test_evaluate_real_mode_and_training_if_missing(fake_root, tmp_path, monkeypatch, capsys):
    out = _evaluate(
        [
            "samples=real",
            "n=8",
            f"data.root={fake_root}",
            f"classifier_path={tmp_path / 'cache' / 'mnist_classifier.pt'}",
            "train_classifier_if_missing=true",
            "classifier_epochs=1",
            f"out_dir={tmp_path / 'e'}",
        ]
    )
    assert (tmp_path / "cache" / "mnist_classifier.pt").is_file()
    assert "training it now" in capsys.readouterr().out
    assert out["mode"] == "real" and out["n"] == 8 and out["floor_n"] == 8
    assert METRIC_KEYS <= set(json.loads((tmp_path / "e" / "metrics.json").read_text()))


def test_evaluate_from_checkpoint(fake_root, fake_clf, tiny_ckpt, tmp_path):
    """ckpt_path mode: ddpm-sample's sample() into out_dir/samples, then the metrics (the session's tiny checkpoint)."""
    ckpt = tiny_ckpt
    out = _evaluate(
        [
            f"ckpt_path={ckpt}",
            "num_samples=6",
            "sampler.steps=2",
            "device=cpu",
            f"data.root={fake_root}",
            f"classifier_path={fake_clf}",
            f"out_dir={tmp_path / 'e'}",
        ]
    )
    assert out["mode"] == "checkpoint" and out["n"] == 6
    with np.load(tmp_path / "e" / "samples" / "samples.npz") as f:
        assert f["arr_0"].shape == (6, 32, 32, 1)


# ------------------------------------------------------------------------------------------ real MNIST
@pytest.mark.slow
def test_real_mnist_classifier_and_floor(real_mnist_root, tmp_path):
    """The packaged reference classifier is >= 99% accurate on the real test images; the real floor is small."""
    from ddpm_lightning.mnist import load_mnist_split

    model, meta = C.load_classifier()
    train, _ = load_mnist_split(real_mnist_root, train=True)
    test, test_labels = load_mnist_split(real_mnist_root, train=False)
    _, probs = M.classifier_outputs(test, model)
    accuracy = float((probs.argmax(1) == test_labels).double().mean())
    assert accuracy >= 0.99 and abs(accuracy - meta["test_accuracy"]) < 1e-9
    real = M.evaluate_images(train[-1000:], model, test, train, meta=meta)
    noise = M.evaluate_images(
        torch.randint(0, 256, (1000, 1, 32, 32), dtype=torch.uint8), model, test, train, meta=meta
    )
    assert real["normalised_entropy"] > 0.97 and real["inception_score"] > 7
    assert real["fid"] < 0.1 * noise["fid"] and real["fid_floor"] < 0.1 * noise["fid"]


def test_inception_fid_is_skipped_cleanly_offline(fake_root, fake_clf, samples_npz, tmp_path, capsys):
    """Without torch-fidelity / the Inception weights the standard FID is reported as skipped, not an error."""
    import importlib.util

    if importlib.util.find_spec("torch_fidelity") is not None:
        pytest.skip("torch-fidelity is installed here: the skip path cannot be exercised")
    m = _evaluate(
        [
            f"samples={samples_npz}",
            "inception_fid=true",
            f"data.root={fake_root}",
            f"classifier_path={fake_clf}",
            f"out_dir={tmp_path}",
        ]
    )
    assert m["inception_fid"] is None and "torch" in m["inception_fid_skipped"].lower()
    assert m["fid"] >= 0  # the classifier metrics are still there
    assert "Inception-v3 FID (standard)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["inception_fid"] is None and saved["inception_fid_skipped"]
