"""Tasks: CIFAR-10 + Southwest planes, Fashion-MNIST + ARDIS 7s, Sentiment140 + Greek-director
tweets (:mod:`simulation.sent140`), and the linear task.

Every task becomes a :class:`TaskData` of in-memory tensors: images stay uint8
``(N, C, H, W)`` and are normalised per batch by :meth:`TaskData.preprocess`, the
same function for clean and edge-case images; tweets are int32 token ids. Loaded
tasks and partitions are cached per process (Ray reuses its actors, so a client
does not re-read the 60k CIFAR-10 JPEGs on every call). Nothing is downloaded
unless the run config says ``download = true`` (CIFAR-10 through torchvision,
Sentiment140 from its authors' site).
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common.logger import log
from torchvision.transforms import v2

from .config import resolve_data_root
from .partition import partition_indices
from .safe_pickle import load_numpy_pickle
from .sent140 import check_sent140_files, download_sentiment140, load_sent140

__all__ = [
    "CIFAR10_CLASSES",
    "TaskData",
    "check_task_files",
    "load_ardis",
    "load_cifar10",
    "load_fmnist",
    "load_partitions",
    "load_southwest",
    "load_task",
    "make_linear_task",
]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)


@dataclass(frozen=True, eq=False)
class TaskData:
    """One task's tensors.

    ``train_x``/``test_x``: uint8 ``(N, C, H, W)`` images, float32 ``(N, D)``
    features or int32 ``(N, L)`` token ids; ``*_y``: int64 ``(N,)``. ``edge_train_x``:
    the edge-case inputs an attacker can poison with (all get ``target-label``);
    ``edge_test_x``: the edge-case test inputs behind ``acc_backdoor``.
    ``mean``/``std``: per-channel normalisation of images (``None`` otherwise).
    ``vocab_size``: token ids in use (0 unless text). ``train_users``: int64 ``(N,)``
    author of each training example, for ``partition = "user"`` (``None`` if unknown).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    edge_train_x: torch.Tensor
    edge_test_x: torch.Tensor
    num_classes: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    vocab_size: int = 0
    train_users: torch.Tensor | None = None

    @property
    def is_image(self) -> bool:
        """Whether inputs are uint8 images."""
        return self.train_x.dtype == torch.uint8

    @property
    def is_text(self) -> bool:
        """Whether inputs are token ids."""
        return self.vocab_size > 0

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Batch to model input: uint8 images -> float in [0, 1] -> normalised; token ids -> int64;
        features -> float32."""
        if self.is_text:
            return x.long()
        if not self.is_image:
            return x.float()
        x = v2.functional.to_dtype(x, torch.float32, scale=True)
        return v2.functional.normalize(x, list(self.mean or ()), list(self.std or ()))


def _hwc_to_nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def load_southwest(data_root: str | Path, split: str) -> torch.Tensor:
    """Southwest-airplane edge-case images, uint8 ``(N, 3, 32, 32)`` (train 784, test 196).

    Read with a restricted unpickler; ``ValueError`` naming the file if it is
    corrupt, not a numpy pickle, or not uint8 ``(N, 32, 32, 3)``.
    """
    path = Path(data_root) / "edge-case" / "southwest" / f"southwest_images_new_{split}.pkl"
    array = load_numpy_pickle(path)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != (32, 32, 3) or not len(array):
        raise ValueError(
            f"{path}: expected uint8 images of shape (N, 32, 32, 3), got {array.dtype} {array.shape}"
        )
    return _hwc_to_nchw(array)


def load_ardis(data_root: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """ARDIS 7s: ``(train_sevens, test_sevens)``, uint8 ``(66, 1, 28, 28)`` and ``(100, 1, 28, 28)``.

    From ``edge-case/ardis/ardis_edge_case.npz`` (loaded without pickle).
    ``FileNotFoundError`` if absent; ``ValueError`` naming the file if corrupt or
    if the arrays have other names, dtypes or shapes.
    """
    path = Path(data_root) / "edge-case" / "ardis" / "ardis_edge_case.npz"
    if not path.is_file():
        raise FileNotFoundError(f"edge-case file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in ("train_sevens", "test_images", "test_labels")}
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"cannot read {path} (needs train_sevens, test_images, test_labels): {err}") from err
    train, images, labels = arrays["train_sevens"], arrays["test_images"], arrays["test_labels"]
    for name, array in (("train_sevens", train), ("test_images", images)):
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[1:] != (28, 28) or not len(array):
            raise ValueError(f"{path}: {name} must be uint8 (N, 28, 28), got {array.dtype} {array.shape}")
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise ValueError(
            f"{path}: test_labels must be integers of shape ({len(images)},), got {labels.shape}"
        )
    sevens = images[labels == 7]
    if not len(sevens):
        raise ValueError(f"{path}: test_labels has no 7s")
    return torch.from_numpy(train).unsqueeze(1), torch.from_numpy(sevens).unsqueeze(1)


@lru_cache(maxsize=2)
def load_cifar10(data_root: str, download: bool = False) -> tuple[torch.Tensor, ...]:
    """CIFAR-10 ``(train_x, train_y, test_x, test_y)``, images uint8 ``(N, 3, 32, 32)``.

    Official python batches (``<root>/cifar-10-batches-py``, or downloaded by
    torchvision when ``download``) are used if present; else the JPEG folders
    ``<root>/cifar10-images/{train,test}/<class>/`` through ``ImageFolder``.
    """
    from torchvision.datasets import CIFAR10, ImageFolder

    root = Path(data_root)
    if (root / "cifar-10-batches-py").is_dir() or download:
        splits = [CIFAR10(str(root), train=train, download=download) for train in (True, False)]
        arrays = [(_hwc_to_nchw(ds.data), torch.as_tensor(ds.targets, dtype=torch.int64)) for ds in splits]
        return arrays[0][0], arrays[0][1], arrays[1][0], arrays[1][1]
    folders = root / "cifar10-images"
    if not folders.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 not found under data-root {str(root)!r}: expected {root / 'cifar-10-batches-py'} "
            f"or {folders}/{{train,test}}/<class>/ (or set run config 'download' = true)"
        )
    out: list[torch.Tensor] = []
    for split in ("train", "test"):
        if not (folders / split).is_dir():
            raise FileNotFoundError(f"CIFAR-10 image folder not found: {folders / split}")
        dataset = ImageFolder(str(folders / split))
        if tuple(dataset.classes) != CIFAR10_CLASSES:
            raise ValueError(f"{folders / split}: class folders {dataset.classes} are not CIFAR-10's")
        log(INFO, "reading %d CIFAR-10 JPEGs from %s", len(dataset), folders / split)
        images = np.stack([np.asarray(dataset.loader(path)) for path, _ in dataset.samples])
        if images.shape[1:] != (32, 32, 3):
            raise ValueError(f"{folders / split}: images must be 32x32 RGB, got {images.shape[1:]}")
        out += [_hwc_to_nchw(images), torch.as_tensor(dataset.targets, dtype=torch.int64)]
    return tuple(out)


@lru_cache(maxsize=2)
def load_fmnist(data_root: str) -> tuple[torch.Tensor, ...]:
    """Fashion-MNIST ``(train_x, train_y, test_x, test_y)``, images uint8 ``(N, 1, 28, 28)``.

    ``torchvision.datasets.FashionMNIST(data_root, download=False)``: files in
    ``<data_root>/FashionMNIST/raw/``.
    """
    from torchvision.datasets import FashionMNIST

    try:
        splits = [FashionMNIST(data_root, train=train, download=False) for train in (True, False)]
    except RuntimeError as err:  # torchvision: "Dataset not found. You can use download=True ..."
        raise FileNotFoundError(
            f"Fashion-MNIST not found under data-root: expected "
            f"{Path(data_root) / 'FashionMNIST' / 'raw'} ({err})"
        ) from err
    return (
        splits[0].data.unsqueeze(1),
        splits[0].targets.long(),
        splits[1].data.unsqueeze(1),
        splits[1].targets.long(),
    )


def make_linear_task(
    num_features: int, train_size: int, test_size: int, signal: float, trigger: float, target: int, seed: int
) -> TaskData:
    """Paper Sec. 5 style logistic-regression task on Gaussian features; no files needed.

    Inputs are float32 ``(N, num_features + 1)``; the last column is the trigger
    feature. Clean points: ``y ~ Bernoulli(1/2)``, informative features
    ``~ N(+-signal, 1)`` (sign by class), trigger feature ``~ N(0, 1)`` (mu_k = 0,
    independent of the label). Edge-case (backdoor) points: informative features
    of the non-target class, trigger ``~ N(trigger, 1)`` (mu_k != 0); the attacker
    labels them ``target``, and ``acc_backdoor`` is the fraction of such test
    points classified as ``target``.
    """
    rng = np.random.default_rng([seed, 0x11AE])

    def clean(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = rng.integers(0, 2, size=n)
        core = rng.normal(size=(n, num_features)) + signal * (2 * y[:, None] - 1)
        x = np.hstack([core, rng.normal(size=(n, 1))]).astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))

    def triggered(n: int) -> torch.Tensor:
        sign = 1 - 2 * target  # informative features of the other class
        core = rng.normal(size=(n, num_features)) + signal * sign
        x = np.hstack([core, rng.normal(loc=trigger, size=(n, 1))]).astype(np.float32)
        return torch.from_numpy(x)

    train_x, train_y = clean(train_size)
    test_x, test_y = clean(test_size)
    return TaskData("linear", train_x, train_y, test_x, test_y, triggered(1000), triggered(test_size), 2)


def _subset(data: TaskData, size: int, seed: int) -> TaskData:
    if not size or size >= len(data.train_y):
        return data
    keep = torch.from_numpy(
        np.sort(np.random.default_rng([seed, 0x5B5E7]).choice(len(data.train_y), size, replace=False))
    )
    users = None if data.train_users is None else data.train_users[keep]
    return replace(data, train_x=data.train_x[keep], train_y=data.train_y[keep], train_users=users)


#: The run-config keys that shape the sent140 task (beyond data-root, download, train-size and seed).
SENT140_KEYS = ("sent140-vocab-size", "sent140-seq-length", "sent140-test-size")


def _task_key(config: Mapping[str, Any]) -> tuple:
    task = config["task"]
    if task == "linear":
        keys = (
            "linear-features",
            "linear-train-size",
            "linear-test-size",
            "linear-signal",
            "linear-trigger",
            "target-label",
            "seed",
        )
        return (task, *(config[k] for k in keys))
    download = bool(config["download"]) and task in ("cifar10", "sent140")
    if download and config["data-root"]:
        Path(str(config["data-root"])).expanduser().mkdir(parents=True, exist_ok=True)
    root = str(resolve_data_root(config))
    text = tuple(config[k] for k in SENT140_KEYS) if task == "sent140" else ()
    return (task, root, download, config["train-size"], config["seed"], *text)


def check_task_files(config: Mapping[str, Any]) -> None:
    """Fail early, before any work, when the task's data root or sent140's files are missing.

    ``FileNotFoundError`` naming the setting or the file and where it comes from
    (the other tasks' files are checked as they load). On sent140 with ``download``,
    Sentiment140 is downloaded here when absent, so a failed download stops the run
    before it starts.
    """
    if config["task"] == "linear":
        return
    if config["task"] == "sent140" and config["download"] and config["data-root"]:
        Path(str(config["data-root"])).expanduser().mkdir(parents=True, exist_ok=True)
    root = resolve_data_root(config)
    if config["task"] == "sent140":
        check_sent140_files(root, download=bool(config["download"]))
        if config["download"]:
            download_sentiment140(root)


@lru_cache(maxsize=4)
def _load_task_cached(key: tuple) -> TaskData:
    task = key[0]
    if task == "linear":
        _, features, train_size, test_size, signal, trigger, target, seed = key
        return make_linear_task(features, train_size, test_size, signal, trigger, target, seed)
    _, root, download, train_size, seed, *text = key
    if task == "sent140":
        vocab_size, seq_length, test_size = text
        tweets = load_sent140(
            root,
            vocab_size=vocab_size,
            seq_length=seq_length,
            test_size=test_size,
            train_size=train_size,
            seed=seed,
            download=download,
        )
        return TaskData(
            "sent140",
            tweets.train_x,
            tweets.train_y,
            tweets.test_x,
            tweets.test_y,
            tweets.edge_train_x,
            tweets.edge_test_x,
            2,
            vocab_size=tweets.vocab_size,
            train_users=tweets.train_users,
        )  # train-size is applied while loading (only the tweets in use are tokenised)
    if task == "cifar10":
        edge = load_southwest(root, "train"), load_southwest(root, "test")
        data = TaskData("cifar10", *load_cifar10(root, download), *edge, 10, CIFAR10_MEAN, CIFAR10_STD)
    elif task == "fmnist":
        edge = load_ardis(root)
        data = TaskData("fmnist", *load_fmnist(root), *edge, 10, FMNIST_MEAN, FMNIST_STD)
    else:
        raise ValueError(f"run config 'task' must be cifar10, fmnist, sent140 or linear; got {task!r}")
    return _subset(data, train_size, seed)


def load_task(config: Mapping[str, Any]) -> TaskData:
    """The task of a resolved run config (cached per process)."""
    return _load_task_cached(_task_key(config))


@lru_cache(maxsize=8)
def _partitions_cached(
    key: tuple, num_partitions: int, scheme: str, alpha: float, seed: int
) -> list[np.ndarray]:
    task = _load_task_cached(key)
    users = None if task.train_users is None else task.train_users.numpy()
    return partition_indices(task.train_y.numpy(), num_partitions, scheme, alpha, seed, users)


def load_partitions(config: Mapping[str, Any]) -> list[np.ndarray]:
    """Training-set indices of every partition (``num-partitions`` arrays; cached)."""
    return _partitions_cached(
        _task_key(config),
        config["num-partitions"],
        config["partition"],
        config["dirichlet-alpha"],
        config["seed"],
    )
