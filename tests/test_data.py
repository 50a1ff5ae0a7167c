"""Datasets, restricted unpickling, checksums and partitions of the simulation package."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simulation.config import resolve_config, resolve_data_root
from simulation.data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    TaskData,
    load_ardis,
    load_cifar10,
    load_fmnist,
    load_southwest,
    load_task,
)
from simulation.download import EDGE_CASE_FILES, build_ardis_npz, check_sha256, download_edge_case, sha256sum
from simulation.partition import attacker_partitions, dirichlet_partition, iid_partition, is_attacking
from simulation.safe_pickle import NumpyOnlyUnpickler, load_numpy_pickle

DATA_ROOT = Path(
    os.environ.get("FLWR_INVARIANT_DATA_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data")
)
needs_data = pytest.mark.skipif(
    not DATA_ROOT.is_dir(), reason=f"offline data not found at {DATA_ROOT} (set FLWR_INVARIANT_DATA_ROOT)"
)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --- restricted unpickler ------------------------------------------------------------------------


def test_unpickler_refuses_os_system(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(ValueError, match=r"evil\.pkl.*refusing to load global (posix|os|nt)\.system"):
        load_numpy_pickle(path)
    assert not marker.exists()
    with path.open("rb") as handle, pytest.raises(pickle.UnpicklingError):
        NumpyOnlyUnpickler(handle).load()


def test_unpickler_refuses_non_array_objects(tmp_path: Path) -> None:
    path = tmp_path / "dict.pkl"
    path.write_bytes(pickle.dumps({"a": np.zeros(3)}))  # a dict of arrays is a dict, not an array
    with pytest.raises(ValueError, match="dict.pkl"):
        load_numpy_pickle(path)
    path.write_bytes(pickle.dumps(Path("x")))  # any other class is refused
    with pytest.raises(ValueError, match="refusing"):
        load_numpy_pickle(path)


@pytest.mark.parametrize("protocol", [2, 3, 5])
def test_unpickler_loads_numpy_arrays(tmp_path: Path, protocol: int) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "a.pkl"
    path.write_bytes(pickle.dumps(array, protocol=protocol))
    np.testing.assert_array_equal(load_numpy_pickle(path), array)


@needs_data
def test_real_southwest_files_load() -> None:
    train, test = load_southwest(DATA_ROOT, "train"), load_southwest(DATA_ROOT, "test")
    assert train.shape == (784, 3, 32, 32) and test.shape == (196, 3, 32, 32)
    assert train.dtype == torch.uint8 and int(train.max()) > 200


def test_southwest_bad_files(tmp_path: Path) -> None:
    folder = tmp_path / "edge-case" / "southwest"
    folder.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="southwest_images_new_train.pkl"):
        load_southwest(tmp_path, "train")
    path = folder / "southwest_images_new_train.pkl"
    path.write_bytes(pickle.dumps(np.zeros((5, 28, 28), dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"southwest_images_new_train\.pkl.*\(N, 32, 32, 3\)"):
        load_southwest(tmp_path, "train")
    path.write_bytes(b"\x80\x03 this is not a pickle")
    with pytest.raises(ValueError, match="southwest_images_new_train.pkl"):
        load_southwest(tmp_path, "train")


# --- ARDIS and Fashion-MNIST ---------------------------------------------------------------------


@needs_data
def test_ardis_loads() -> None:
    train, test = load_ardis(DATA_ROOT)
    assert train.shape == (66, 1, 28, 28) and test.shape == (100, 1, 28, 28)
    assert train.dtype == test.dtype == torch.uint8


def test_ardis_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ardis_edge_case.npz"):
        load_ardis(tmp_path)
    folder = tmp_path / "edge-case" / "ardis"
    folder.mkdir(parents=True)
    path = folder / "ardis_edge_case.npz"
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="ardis_edge_case.npz"):
        load_ardis(tmp_path)
    np.savez(
        path,
        train_sevens=np.zeros((66, 32, 32), np.uint8),
        test_images=np.zeros((10, 28, 28), np.uint8),
        test_labels=np.full(10, 7),
    )
    with pytest.raises(ValueError, match=r"train_sevens must be uint8 \(N, 28, 28\)"):
        load_ardis(tmp_path)
    np.savez(path, sevens=np.zeros((66, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="needs train_sevens"):
        load_ardis(tmp_path)


@needs_data
def test_fmnist_loads() -> None:
    train_x, train_y, test_x, test_y = load_fmnist(str(DATA_ROOT))
    assert train_x.shape == (60000, 1, 28, 28) and test_x.shape == (10000, 1, 28, 28)
    assert train_y.dtype == torch.int64 and set(train_y.unique().tolist()) == set(range(10))


def test_missing_data_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLWR_INVARIANT_DATA_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match="'data-root'"):
        resolve_data_root({"data-root": ""})
    with pytest.raises(FileNotFoundError, match="'data-root'"):
        load_task(resolve_config({"task": "fmnist", "data-root": ""}))
    with pytest.raises(FileNotFoundError, match="FashionMNIST"):
        load_fmnist(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cifar10-images"):
        load_cifar10(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="'data-root'"):
        resolve_data_root({"data-root": str(tmp_path / "nope")})


def test_cifar10_image_folder_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in CIFAR10_CLASSES:
            (tmp_path / "cifar10-images" / split / cls).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "cifar10-images" / split / cls / f"{i:04d}.jpg")
    train_x, train_y, test_x, test_y = load_cifar10(str(tmp_path))
    assert train_x.shape == (20, 3, 32, 32) and train_x.dtype == torch.uint8
    assert train_y.tolist() == [c for c in range(10) for _ in range(2)] and len(test_y) == 20


def test_edge_case_images_are_normalised_like_clean_ones() -> None:
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    task = TaskData(
        "t",
        images,
        torch.zeros(4, dtype=torch.int64),
        images,
        torch.zeros(4, dtype=torch.int64),
        images[:2],
        images[2:],
        10,
        CIFAR10_MEAN,
        CIFAR10_STD,
    )
    expected = (images.float() / 255 - torch.tensor(CIFAR10_MEAN)[:, None, None]) / torch.tensor(CIFAR10_STD)[
        :, None, None
    ]
    torch.testing.assert_close(task.preprocess(images), expected)
    torch.testing.assert_close(task.preprocess(task.edge_test_x), expected[2:])


# --- checksums and the download helper (no network) ----------------------------------------------


def test_check_sha256(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256sum(path) == digest
    check_sha256(path, digest.upper())
    with pytest.raises(ValueError, match=r"checksum mismatch for .*f\.bin"):
        check_sha256(path, "0" * 64)
    with pytest.raises(FileNotFoundError):
        check_sha256(tmp_path / "missing", digest)


@needs_data
def test_download_helper_verifies_existing_files_offline(tmp_path: Path) -> None:
    for name in ("southwest-test", "ardis-test", "ardis-poisoned"):
        target = tmp_path / EDGE_CASE_FILES[name].relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(DATA_ROOT / EDGE_CASE_FILES[name].relpath)
    paths = download_edge_case(
        tmp_path, ["southwest-test", "ardis-test", "ardis-poisoned"]
    )  # present: no download
    assert [p.name for p in paths] == [
        "southwest_images_new_test.pkl",
        "ardis_test_dataset.pt",
        "poisoned_dataset_fraction_0.1",
    ]
    out = build_ardis_npz(tmp_path)
    with np.load(out) as built, np.load(DATA_ROOT / "edge-case/ardis/ardis_edge_case.npz") as shipped:
        for key in ("train_sevens", "test_images", "test_labels"):
            np.testing.assert_array_equal(built[key], shipped[key])
    bad = tmp_path / "edge-case/southwest/southwest_images_new_train.pkl"
    bad.write_bytes(b"tampered")
    with pytest.raises(ValueError, match="checksum mismatch"):
        download_edge_case(tmp_path, ["southwest-train"])
    with pytest.raises(ValueError, match="unknown edge-case file"):
        download_edge_case(tmp_path, ["mnist"])


# --- partitions ----------------------------------------------------------------------------------


def test_dirichlet_split_reproducible_and_seed_dependent() -> None:
    labels = np.random.default_rng(1).integers(0, 10, size=5000)
    first = dirichlet_partition(labels, 20, 0.5, seed=3)
    again = dirichlet_partition(labels, 20, 0.5, seed=3)
    other = dirichlet_partition(labels, 20, 0.5, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert np.array_equal(np.sort(np.concatenate(first)), np.arange(5000))  # each example exactly once
    shares = np.array([np.bincount(labels[p], minlength=10) / len(p) for p in first])
    assert shares.max() > 0.3  # label skew (IID would give about 0.1 everywhere)


def test_iid_split() -> None:
    parts = iid_partition(1003, 10, seed=0)
    assert sorted(len(p) for p in parts) == [100] * 7 + [101] * 3
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1003))
    assert not np.array_equal(parts[0], iid_partition(1003, 10, seed=1)[0])


def test_attacker_pool() -> None:
    pool = attacker_partitions(100, 0.2, seed=0, schedule="pool")
    assert len(pool) == 20 and pool == attacker_partitions(100, 0.2, seed=0, schedule="pool")
    assert pool != attacker_partitions(100, 0.2, seed=1, schedule="pool")
    assert (
        attacker_partitions(10, 0.0, 0, "pool") == [] and len(attacker_partitions(10, 1.0, 0, "pool")) == 10
    )
    (single,) = attacker_partitions(100, 0.2, 0, "every-k")
    assert [is_attacking(single, r, [single], "every-k", 5) for r in range(1, 11)] == [False] * 4 + [True] + [
        False
    ] * 4 + [True]
    assert is_attacking(pool[0], 3, pool, "pool", 5) and not is_attacking(pool[0] + 0.5, 3, pool, "pool", 5)
    with pytest.raises(ValueError, match="malicious-fraction"):
        attacker_partitions(100, 1.5, 0, "pool")


# --- run config ----------------------------------------------------------------------------------


def test_config_defaults_and_errors() -> None:
    config = resolve_config({"task": "cifar10"})
    assert config["model"] == "resnet18-cifar" and config["target-label"] == 9
    assert resolve_config({"task": "fmnist"})["target-label"] == 1
    assert resolve_config({"lr": "0.05", "download": "true"})["lr"] == 0.05
    with pytest.raises(ValueError, match="'attack' must be one of"):
        resolve_config({"attack": "steal-everything"})
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="'malicious-fraction' must be in \\[0, 1\\]"):
            resolve_config({"malicious-fraction": bad})
    with pytest.raises(ValueError, match="'batch-size' must be an integer"):
        resolve_config({"batch-size": "many"})
    with pytest.raises(ValueError, match="'clients-per-round'"):
        resolve_config({"num-partitions": 5, "clients-per-round": 10})
    with pytest.raises(ValueError, match="'backdoor'"):
        resolve_config({"task": "linear", "backdoor": "pixel"})
