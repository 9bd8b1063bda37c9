"""Specification of ddpm_lightning.mnist (file checks, loading) and ddpm_lightning.data (the DataModule).

Most tests run on tiny synthetic IDX files (64 train / 32 test images, see
``mnist_fixtures.py``); the ``requires_real_mnist`` tests check the real dataset.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from ddpm_lightning.data import MNISTDataModule
from ddpm_lightning.images import to_model_range
from ddpm_lightning.mnist import EXPECTED_FILES, MNISTDataError, check_mnist_files, load_mnist_split

from mnist_fixtures import (
    FILE_NAMES,
    REAL_MNIST_ROOT,
    make_fake_mnist_arrays,
    read_idx,
    requires_real_mnist,
    write_idx_images,
    write_idx_labels,
)

N_TRAIN, N_TEST = 64, 32  # sizes written by the fake_mnist_root fixture


def padded_reference(digits: np.ndarray) -> torch.Tensor:
    """Expected padded uint8 tensor (N, 1, 32, 32) built by hand from (N, 28, 28) digits."""
    out = torch.zeros((digits.shape[0], 1, 32, 32), dtype=torch.uint8)
    out[:, 0, 2:30, 2:30] = torch.from_numpy(np.array(digits))
    return out


# --------------------------------------------------------------------------- constants


def test_expected_file_sizes_are_the_genuine_mnist_sizes():
    assert EXPECTED_FILES == {
        "train-images-idx3-ubyte": 47040016,
        "train-labels-idx1-ubyte": 60008,
        "t10k-images-idx3-ubyte": 7840016,
        "t10k-labels-idx1-ubyte": 10008,
    }


def test_fake_files_are_valid_idx(fake_mnist_root):
    raw = fake_mnist_root / "MNIST" / "raw"
    arrays = make_fake_mnist_arrays(N_TRAIN, N_TEST, seed=0)
    for split, (img_name, lbl_name) in FILE_NAMES.items():
        np.testing.assert_array_equal(read_idx(raw / img_name), arrays[split][0])
        np.testing.assert_array_equal(read_idx(raw / lbl_name), arrays[split][1])
    assert (raw / "train-images-idx3-ubyte").stat().st_size == 16 + N_TRAIN * 784
    assert (raw / "t10k-labels-idx1-ubyte").stat().st_size == 8 + N_TEST


# --------------------------------------------------------------------------- scaling / padding


def test_load_split_pads_28x28_digits_to_32x32_with_black_border(fake_mnist_root):
    digits, labels = make_fake_mnist_arrays(N_TRAIN, N_TEST, seed=0)["train"]
    images, got_labels = load_mnist_split(fake_mnist_root, train=True)

    assert images.dtype == torch.uint8
    assert images.shape == (N_TRAIN, 1, 32, 32)
    assert torch.equal(images, padded_reference(digits))
    assert got_labels.dtype == torch.int64
    assert got_labels.shape == (N_TRAIN,)
    assert got_labels.tolist() == labels.tolist()


def test_test_split_is_the_t10k_files(fake_mnist_root):
    digits, labels = make_fake_mnist_arrays(N_TRAIN, N_TEST, seed=0)["test"]
    images, got_labels = load_mnist_split(fake_mnist_root, train=False)
    assert images.shape == (N_TEST, 1, 32, 32)
    assert torch.equal(images, padded_reference(digits))
    assert got_labels.tolist() == labels.tolist()


def test_model_range_border_is_exactly_minus_one_and_centre_is_x_over_255_times_2_minus_1(
    fake_mnist_root,
):
    digits, _ = make_fake_mnist_arrays(N_TRAIN, N_TEST, seed=0)["train"]
    images, _ = load_mnist_split(fake_mnist_root, train=True)
    x = to_model_range(images)

    assert x.dtype == torch.float32
    assert x.shape == (N_TRAIN, 1, 32, 32)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.all(x[:, 0][:, border] == -1.0)
    expected_centre = torch.from_numpy(np.array(digits)).to(torch.float32) / 255 * 2 - 1
    assert torch.equal(x[:, 0, 2:30, 2:30], expected_centre)
    # the fake digits have non-zero edges, so the border really is added padding
    assert torch.all(x[:, 0, 2, 2:30] > -1.0)
    assert x.min() >= -1.0 and x.max() == 1.0


# --------------------------------------------------------------------------- subsets


@pytest.mark.parametrize("subset_size", [1, 10, N_TRAIN])
def test_subset_size_keeps_the_first_n_training_images(fake_mnist_root, subset_size):
    digits, labels = make_fake_mnist_arrays(N_TRAIN, N_TEST, seed=0)["train"]
    dm = MNISTDataModule(root=fake_mnist_root, subset_size=subset_size, val_size=8)
    dm.setup("fit")
    assert dm.num_train == subset_size
    assert dm.train_images.dtype == torch.uint8
    assert torch.equal(dm.train_images, padded_reference(digits[:subset_size]))
    assert dm.train_labels.tolist() == labels[:subset_size].tolist()


def test_subset_size_none_uses_all_training_images(fake_mnist_root):
    digits, _ = make_fake_mnist_arrays(N_TRAIN, N_TEST, seed=0)["train"]
    dm = MNISTDataModule(root=fake_mnist_root, subset_size=None, val_size=8)
    dm.setup("fit")
    assert dm.num_train == N_TRAIN
    assert torch.equal(dm.train_images, padded_reference(digits))


def test_val_subset_is_the_first_val_size_test_images_and_deterministic(fake_mnist_root):
    digits, labels = make_fake_mnist_arrays(N_TRAIN, N_TEST, seed=0)["test"]
    dm1 = MNISTDataModule(root=fake_mnist_root, val_size=12, seed=0)
    dm2 = MNISTDataModule(root=fake_mnist_root, val_size=12, seed=123)
    dm1.setup("fit")
    dm2.setup("validate")
    assert dm1.num_val == 12
    assert torch.equal(dm1.val_images, padded_reference(digits[:12]))
    assert dm1.val_labels.tolist() == labels[:12].tolist()
    assert torch.equal(dm1.val_images, dm2.val_images)
    assert torch.equal(dm1.val_labels, dm2.val_labels)


def test_setup_is_idempotent(fake_mnist_root):
    dm = MNISTDataModule(root=fake_mnist_root, subset_size=5, val_size=4)
    dm.setup("fit")
    train_images, val_images = dm.train_images, dm.val_images
    dm.setup("validate")
    dm.setup("fit")
    assert dm.train_images is train_images
    assert dm.val_images is val_images


def test_num_train_before_setup_is_an_error(fake_mnist_root):
    dm = MNISTDataModule(root=fake_mnist_root)
    with pytest.raises(RuntimeError, match="setup"):
        _ = dm.num_train


# --------------------------------------------------------------------------- loaders


def _epoch(loader):
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_train_loader_yields_float_batches_in_model_range_covering_the_subset(fake_mnist_root):
    dm = MNISTDataModule(root=fake_mnist_root, batch_size=16, subset_size=50, val_size=8)
    dm.setup("fit")
    batches = list(dm.train_dataloader())

    assert [b[0].shape[0] for b in batches] == [16, 16, 16, 2]  # no drop_last
    for x, y in batches:
        assert x.shape[1:] == (1, 32, 32)
        assert x.dtype == torch.float32
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
        assert x.min() >= -1.0 and x.max() <= 1.0
    x, y = _epoch(batches)
    # same multiset of images: sort both by a per-image key and compare exactly
    expected = to_model_range(dm.train_images)
    key_got = x.flatten(1).sum(1) + 1e3 * y
    key_exp = expected.flatten(1).sum(1) + 1e3 * dm.train_labels
    assert torch.equal(x[key_got.argsort()], expected[key_exp.argsort()])
    assert sorted(y.tolist()) == sorted(dm.train_labels.tolist())


def test_train_shuffle_is_reproducible_for_the_same_seed(fake_mnist_root):
    def order(seed):
        dm = MNISTDataModule(root=fake_mnist_root, batch_size=8, seed=seed, val_size=8)
        dm.setup("fit")
        return _epoch(dm.train_dataloader())

    x_a, y_a = order(seed=0)
    x_b, y_b = order(seed=0)
    x_c, _ = order(seed=1)
    assert torch.equal(x_a, x_b) and torch.equal(y_a, y_b)
    assert not torch.equal(x_a, x_c)
    # and it is actually shuffled
    dm = MNISTDataModule(root=fake_mnist_root, val_size=8)
    dm.setup("fit")
    assert not torch.equal(x_a, to_model_range(dm.train_images))


def test_val_loader_is_in_order_with_the_same_batch_size(fake_mnist_root):
    dm = MNISTDataModule(root=fake_mnist_root, batch_size=5, val_size=12)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert [b[0].shape[0] for b in batches] == [5, 5, 2]
    x, y = _epoch(batches)
    assert torch.equal(x, to_model_range(dm.val_images))
    assert torch.equal(y, dm.val_labels)


def test_loader_worker_settings(fake_mnist_root):
    dm = MNISTDataModule(root=fake_mnist_root, num_workers=2, pin_memory=True, val_size=8)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.num_workers == 2 and loader.persistent_workers and loader.pin_memory
    dm0 = MNISTDataModule(root=fake_mnist_root, num_workers=0, val_size=8)
    dm0.setup("fit")
    assert dm0.train_dataloader().persistent_workers is False
    assert dm0.val_dataloader().persistent_workers is False


# --------------------------------------------------------------------------- file errors


def test_check_mnist_files_accepts_valid_files_and_returns_the_raw_dir(fake_mnist_root):
    assert check_mnist_files(fake_mnist_root) == fake_mnist_root / "MNIST" / "raw"
    assert check_mnist_files(str(fake_mnist_root)) == fake_mnist_root / "MNIST" / "raw"


def test_missing_root_fails_in_prepare_data_with_a_data_root_hint(tmp_path):
    root = tmp_path / "nowhere"
    dm = MNISTDataModule(root=root)
    with pytest.raises(MNISTDataError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert "\n" not in msg
    for name in EXPECTED_FILES:
        assert name in msg
    assert str(root / "MNIST" / "raw") in msg
    assert "data.root=" in msg
    assert "data.download=true" in msg
    assert not root.exists()  # nothing downloaded or created


def test_one_missing_file_is_named_alone(fake_mnist_root):
    (fake_mnist_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(MNISTDataError) as err:
        check_mnist_files(fake_mnist_root)
    msg = str(err.value)
    assert str(fake_mnist_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte") in msg
    assert "train-images-idx3-ubyte" not in msg
    assert "data.root" in msg


def test_missing_files_raise_our_error_from_setup_and_load_not_torchvisions(tmp_path):
    with pytest.raises(MNISTDataError, match="data.root"):
        load_mnist_split(tmp_path, train=True)
    with pytest.raises(MNISTDataError, match="data.root"):
        MNISTDataModule(root=tmp_path).setup("fit")


@pytest.mark.parametrize("name", list(EXPECTED_FILES))
def test_truncated_file_is_reported_with_its_actual_and_expected_size(fake_mnist_root, name):
    path = fake_mnist_root / "MNIST" / "raw" / name
    expected = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(expected - 5)
    with pytest.raises(MNISTDataError) as err:
        MNISTDataModule(root=fake_mnist_root).prepare_data()
    msg = str(err.value)
    assert "\n" not in msg
    assert name in msg
    assert f"{expected - 5} bytes" in msg
    assert f"expected {expected} bytes" in msg
    # loading also fails with our error, not an AssertionError from torchvision
    with pytest.raises(MNISTDataError, match=name):
        load_mnist_split(fake_mnist_root, train=name.startswith("train"))


def test_file_shorter_than_its_header_is_reported(fake_mnist_root):
    path = fake_mnist_root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08")
    with pytest.raises(MNISTDataError, match=r"train-images-idx3-ubyte.*actual size 3 bytes"):
        check_mnist_files(fake_mnist_root)


def test_extra_bytes_are_reported_too(fake_mnist_root):
    path = fake_mnist_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    with open(path, "ab") as f:
        f.write(b"\x00" * 784)
    with pytest.raises(MNISTDataError) as err:
        check_mnist_files(fake_mnist_root)
    assert f"actual size {16 + 33 * 784} bytes" in str(err.value)
    assert f"expected {16 + 32 * 784} bytes" in str(err.value)


def test_bad_magic_number_is_reported(fake_mnist_root):
    raw = fake_mnist_root / "MNIST" / "raw"
    digits, _ = make_fake_mnist_arrays(N_TRAIN, N_TEST, seed=0)["train"]
    write_idx_images(raw / "train-images-idx3-ubyte", digits, magic=2049)
    with pytest.raises(MNISTDataError) as err:
        check_mnist_files(fake_mnist_root)
    msg = str(err.value)
    assert "train-images-idx3-ubyte" in msg
    assert "magic" in msg and "2049" in msg and "2051" in msg
    assert f"actual size {16 + N_TRAIN * 784} bytes" in msg


def test_bad_label_magic_number_is_reported(fake_mnist_root):
    raw = fake_mnist_root / "MNIST" / "raw"
    write_idx_labels(raw / "t10k-labels-idx1-ubyte", np.zeros(N_TEST, np.uint8), magic=2051)
    with pytest.raises(MNISTDataError, match=r"t10k-labels-idx1-ubyte.*magic number 2051"):
        check_mnist_files(fake_mnist_root)


def test_image_and_label_counts_must_match(fake_mnist_root):
    raw = fake_mnist_root / "MNIST" / "raw"
    write_idx_labels(raw / "train-labels-idx1-ubyte", np.zeros(N_TRAIN - 1, np.uint8))
    with pytest.raises(MNISTDataError) as err:
        check_mnist_files(fake_mnist_root)
    msg = str(err.value)
    assert f"{N_TRAIN} images" in msg and f"{N_TRAIN - 1} labels" in msg


def _corrupt(raw, case):
    """Damage one file in ``raw`` as ``case`` says; returns (file name, text the message must hold)."""
    digits, _ = make_fake_mnist_arrays(N_TRAIN, N_TEST, seed=0)["train"]
    if case == "not_28x28":  # same bytes, header says 14x56: torchvision reads it happily
        write_idx_images(raw / "train-images-idx3-ubyte", digits.reshape(N_TRAIN, 14, 56))
        return "train-images-idx3-ubyte", "images are 14x56, expected 28x28"
    if case == "label_out_of_range":
        write_idx_labels(raw / "t10k-labels-idx1-ubyte", np.full(N_TEST, 10, np.uint8))
        return "t10k-labels-idx1-ubyte", "labels range 10..10, expected 0..9"
    if case == "zero_items":  # self-consistent header, but torchvision refuses the empty buffer
        write_idx_labels(raw / "train-labels-idx1-ubyte", np.zeros(0, np.uint8))
        return "train-labels-idx1-ubyte", "torchvision cannot read it"
    if case == "negative_count":  # torchvision reads the count as unsigned
        path = raw / "t10k-labels-idx1-ubyte"
        path.write_bytes(path.read_bytes()[:4] + (-1).to_bytes(4, "big", signed=True) + path.read_bytes()[8:])
        return "t10k-labels-idx1-ubyte", f"actual size {8 + N_TEST} bytes, expected {8 + 2**32 - 1} bytes"
    if case == "float_images":  # IDX type 0x0D (float32), 3 dims
        path = raw / "t10k-images-idx3-ubyte"
        path.write_bytes((0x0D03).to_bytes(4, "big") + path.read_bytes()[4:])
        return "t10k-images-idx3-ubyte", f"bad IDX magic number {0x0D03} (expected 2051)"
    if case == "empty":
        (raw / "train-images-idx3-ubyte").write_bytes(b"")
        return "train-images-idx3-ubyte", "actual size 0 bytes, smaller than the 16-byte IDX header"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case", ["not_28x28", "label_out_of_range", "zero_items", "negative_count", "float_images", "empty"]
)
def test_corrupt_files_give_one_line_errors_in_check_and_load(fake_mnist_root, case):
    name, text = _corrupt(fake_mnist_root / "MNIST" / "raw", case)
    with pytest.raises(MNISTDataError) as err:
        check_mnist_files(fake_mnist_root)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(fake_mnist_root / "MNIST" / "raw" / name) in msg
    assert text in msg
    assert "actual size" in msg or "labels range" in msg
    with pytest.raises(MNISTDataError, match=name):
        load_mnist_split(fake_mnist_root, train=name.startswith("train"))


def test_load_parses_each_file_of_its_split_once_and_only_those(fake_mnist_root, monkeypatch):
    import ddpm_lightning.mnist as mnist

    calls = []
    for reader in ("read_image_file", "read_label_file"):
        real = getattr(mnist, reader)
        monkeypatch.setattr(mnist, reader, lambda path, real=real: calls.append(Path(path).name) or real(path))
    monkeypatch.setattr(torchvision.datasets, "MNIST", None)  # not through the dataset class either
    load_mnist_split(fake_mnist_root, train=False)
    assert calls == ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def test_download_mnist_checks_the_files_and_reports_corrupt_ones_as_ours(fake_mnist_root, monkeypatch):
    import ddpm_lightning.mnist as mnist

    seen = []
    monkeypatch.setattr(torchvision.datasets, "MNIST", lambda root, train, download: seen.append((root, download)))
    assert mnist.download_mnist(fake_mnist_root) == fake_mnist_root / "MNIST" / "raw"
    assert seen == [(str(fake_mnist_root), True)]

    def torchvision_fails(root, train, download):  # e.g. an AssertionError on a corrupt file already there
        raise AssertionError()

    monkeypatch.setattr(torchvision.datasets, "MNIST", torchvision_fails)
    _corrupt(fake_mnist_root / "MNIST" / "raw", "empty")
    with pytest.raises(MNISTDataError, match="train-images-idx3-ubyte.*actual size 0 bytes"):
        MNISTDataModule(root=fake_mnist_root, download=True).prepare_data()


def test_download_errors_propagate_when_files_are_missing(tmp_path, monkeypatch):
    def offline(root, train, download):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(RuntimeError, match="Error downloading"):
        MNISTDataModule(root=tmp_path, download=True).prepare_data()


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs, key, value",
    [
        ({"batch_size": 0}, "batch_size", "0"),
        ({"batch_size": -1}, "batch_size", "-1"),
        ({"batch_size": 2.5}, "batch_size", "2.5"),
        ({"batch_size": True}, "batch_size", "True"),
        ({"subset_size": 0}, "subset_size", "0"),
        ({"subset_size": -3}, "subset_size", "-3"),
        ({"val_size": 0}, "val_size", "0"),
        ({"val_size": 10001}, "val_size", "10001"),
        ({"num_workers": -1}, "num_workers", "-1"),
        ({"download": "yes"}, "download", "yes"),
    ],
)
def test_bad_arguments_are_rejected_at_construction(kwargs, key, value):
    with pytest.raises(ValueError) as err:
        MNISTDataModule(root="unused", **kwargs)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{key}=")
    assert value in msg
    assert "is invalid" in msg


def test_batch_size_message_reads_as_documented():
    with pytest.raises(ValueError) as err:
        MNISTDataModule(batch_size=0)
    assert str(err.value) == "batch_size=0 is invalid: must be a positive integer"
    # the component names its own parameter; the config boundary adds the node's path
    assert str(err.value.at("data")) == "data.batch_size=0 is invalid: must be a positive integer"


@pytest.mark.parametrize(
    "kwargs, key, value, available",
    [
        ({"subset_size": N_TRAIN + 1}, "subset_size", N_TRAIN + 1, N_TRAIN),
        ({"val_size": N_TEST + 1}, "val_size", N_TEST + 1, N_TEST),
    ],
)
def test_sizes_larger_than_the_data_on_disk_are_rejected_in_setup(fake_mnist_root, kwargs, key, value, available):
    dm = MNISTDataModule(root=fake_mnist_root, **kwargs)
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert msg.startswith(f"{key}={value} is invalid")
    assert f"only {available} " in msg


def test_valid_arguments_are_kept(fake_mnist_root):
    dm = MNISTDataModule(root=str(fake_mnist_root), batch_size=7, subset_size=9, val_size=3, num_workers=0, seed=5)
    assert (dm.batch_size, dm.subset_size, dm.val_size, dm.seed) == (7, 9, 3, 5)
    assert dm.root == fake_mnist_root
    assert dm.hparams["batch_size"] == 7


# --------------------------------------------------------------------------- real MNIST

MNIST_TRAIN_CLASS_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def real_dm():
    if not (REAL_MNIST_ROOT / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip("real MNIST absent")
    dm = MNISTDataModule(root=REAL_MNIST_ROOT, batch_size=256, val_size=1000)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.mark.slow
@requires_real_mnist
def test_real_mnist_files_pass_the_check_and_have_the_genuine_sizes():
    raw = check_mnist_files(REAL_MNIST_ROOT)
    assert raw == REAL_MNIST_ROOT / "MNIST" / "raw"
    for name, size in EXPECTED_FILES.items():
        assert os.path.getsize(raw / name) == size


@pytest.mark.slow
@requires_real_mnist
def test_real_mnist_train_split(real_dm):
    tv = torchvision.datasets.MNIST(str(REAL_MNIST_ROOT), train=True, download=False)
    assert real_dm.num_train == 60000
    assert real_dm.train_images.shape == (60000, 1, 32, 32)
    assert real_dm.train_images.dtype == torch.uint8
    assert real_dm.train_labels[0].item() == 5  # MNIST's first training digit is a 5
    assert real_dm.train_labels.sum().item() == tv.targets.sum().item() == 267236
    assert torch.bincount(real_dm.train_labels).tolist() == MNIST_TRAIN_CLASS_COUNTS
    assert torch.equal(real_dm.train_images[:, 0, 2:30, 2:30], tv.data)
    assert real_dm.train_images[:, :, :2].sum() == 0 and real_dm.train_images[:, :, 30:].sum() == 0
    assert real_dm.train_images[..., :2].sum() == 0 and real_dm.train_images[..., 30:].sum() == 0


@pytest.mark.slow
@requires_real_mnist
def test_real_mnist_val_split_is_the_first_1000_test_images(real_dm):
    test_images, test_labels = load_mnist_split(REAL_MNIST_ROOT, train=False)
    assert test_images.shape == (10000, 1, 32, 32)
    assert torch.bincount(test_labels).tolist() == MNIST_TEST_CLASS_COUNTS
    assert real_dm.num_val == 1000
    assert torch.equal(real_dm.val_images, test_images[:1000])
    assert real_dm.val_labels[:3].tolist() == [7, 2, 1]  # first MNIST test digits


@pytest.mark.slow
@requires_real_mnist
def test_real_mnist_batches_are_in_model_range(real_dm):
    x, y = next(iter(real_dm.train_dataloader()))
    assert x.shape == (256, 1, 32, 32) and x.dtype == torch.float32
    assert y.shape == (256,) and y.dtype == torch.int64
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.all(x[:, :, :2] == -1.0) and torch.all(x[..., 30:] == -1.0)
