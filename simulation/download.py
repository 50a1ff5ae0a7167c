"""Download the edge-case files with sha256 checks, and build ``ardis_edge_case.npz``.

Never called by the apps, the tests or CI (they run offline); run it once on a
machine with network access::

    python -m simulation.download --data-root ~/data        # all edge-case files

Files land under ``<data-root>/edge-case/{southwest,ardis,greek-director}/``. Downloads use
torchvision's ``download_url``; torchvision checks only md5, so the sha256 check
is done here after every download and before any reuse of an existing file.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.common.logger import log

from .safe_pickle import placeholder_pickle_module

__all__ = [
    "EDGE_CASE_FILES",
    "EdgeCaseFile",
    "build_ardis_npz",
    "check_sha256",
    "download_edge_case",
    "sha256sum",
]

_INVARIANT = "https://raw.githubusercontent.com/Xiaoyang-Wang/InvariantAggregator/b4895051885286cb9f5a3f0559b4488cb3857a66"
_ROSEAGG = "https://raw.githubusercontent.com/SleepedCat/RoseAgg/615dc3fa79b91224360aeb89fd1d195b09e0573c"
_OOD = "https://raw.githubusercontent.com/ksreenivasan/OOD_Federated_Learning/90969695cf0f1c5b009744fc2ccd4fbde817b8cb"


@dataclass(frozen=True)
class EdgeCaseFile:
    """One downloadable file: where it goes under the data root, its URL and sha256."""

    relpath: str
    url: str
    sha256: str


EDGE_CASE_FILES: dict[str, EdgeCaseFile] = {
    "southwest-train": EdgeCaseFile(
        "edge-case/southwest/southwest_images_new_train.pkl",
        f"{_INVARIANT}/experiments/backdoor_CIFAR/utils/data/SA/southwest_images_new_train.pkl",
        "4dfb293d5bfc073cb26f9019d37b7660bb4cfbe4b8d0cf9843523e884539b26a",
    ),
    "southwest-test": EdgeCaseFile(
        "edge-case/southwest/southwest_images_new_test.pkl",
        f"{_INVARIANT}/experiments/backdoor_CIFAR/utils/data/SA/southwest_images_new_test.pkl",
        "cad0410ce01bd53af349fd2094799a8c58c508ae39ec1c01d038868cb1e5d64d",
    ),
    "ardis-test": EdgeCaseFile(
        "edge-case/ardis/ardis_test_dataset.pt",
        f"{_ROSEAGG}/FL_Backdoor_CV/data/ARDIS/ardis_test_dataset.pt",
        "8a2354b14b08a38fb735e383b3373c7c04b063acfcd01e8a417e4eacd019158d",
    ),
    "ardis-poisoned": EdgeCaseFile(
        "edge-case/ardis/poisoned_dataset_fraction_0.1",
        f"{_OOD}/poisoned_dataset_fraction_0.1",
        "fe21ecf9a9defec701c2b7857cd96af15ce3a97cb7a511166c7d6149cb6b96f3",
    ),
    "greek-director-train": EdgeCaseFile(
        "edge-case/greek-director/train.txt",
        f"{_OOD}/language-tasks-fl/data/sentiment-140/greek-director-backdoor/train.txt",
        "204e9c1b98aa1ad8b222c26fa4c77e7af71de32abc8eeac5b35c549099bf25ec",
    ),
    "greek-director-test": EdgeCaseFile(
        "edge-case/greek-director/test.txt",
        f"{_OOD}/language-tasks-fl/data/sentiment-140/greek-director-backdoor/test.txt",
        "80fde4c91c27ecc86e5b2805b4129442d688feb8f384298497a4e0ac9b936b80",
    ),
}


def sha256sum(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: str | Path, expected: str) -> None:
    """Raise ``FileNotFoundError`` if ``path`` is absent, ``ValueError`` on a checksum mismatch."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    actual = sha256sum(path)
    if actual != expected.lower():
        raise ValueError(f"checksum mismatch for {path}: sha256 {actual}, expected {expected}")


def download_edge_case(data_root: str | Path, names: list[str] | None = None) -> list[Path]:
    """Download (if absent) and sha256-check the named files of :data:`EDGE_CASE_FILES`.

    An existing file with the right checksum is kept; a mismatch (existing or
    downloaded) raises ``ValueError`` and the bad file is left for inspection.
    Needs network access. Returns the local paths.
    """
    from torchvision.datasets.utils import download_url

    paths = []
    for name in names or list(EDGE_CASE_FILES):
        if name not in EDGE_CASE_FILES:
            raise ValueError(f"unknown edge-case file {name!r}; known: {', '.join(EDGE_CASE_FILES)}")
        spec = EDGE_CASE_FILES[name]
        path = Path(data_root) / spec.relpath
        if not path.is_file():
            log(INFO, "downloading %s to %s", spec.url, path)
            download_url(spec.url, str(path.parent), filename=path.name)
        check_sha256(path, spec.sha256)
        paths.append(path)
    return paths


def build_ardis_npz(data_root: str | Path) -> Path:
    """Write ``edge-case/ardis/ardis_edge_case.npz`` from the two ARDIS ``torch.save`` files.

    ``train_sevens`` uint8 (66, 28, 28) = rows 100..165 of the poisoned set;
    ``test_images`` uint8 (1000, 28, 28) and ``test_labels`` int64 (1000,) from the
    ARDIS test set. The files are loaded with a restricted unpickler
    (torchvision objects become placeholders; no arbitrary code runs).
    """
    import torch

    ardis = Path(data_root) / "edge-case" / "ardis"
    module = placeholder_pickle_module()
    for name in ("ardis-test", "ardis-poisoned"):
        check_sha256(Path(data_root) / EDGE_CASE_FILES[name].relpath, EDGE_CASE_FILES[name].sha256)
    test = torch.load(ardis / "ardis_test_dataset.pt", weights_only=False, pickle_module=module)
    poisoned = torch.load(ardis / "poisoned_dataset_fraction_0.1", weights_only=False, pickle_module=module)
    out = ardis / "ardis_edge_case.npz"
    np.savez(
        out,
        train_sevens=np.asarray(poisoned.data[100:166], dtype=np.uint8),
        test_images=np.asarray(test.data, dtype=np.uint8),
        test_labels=np.asarray(test.targets, dtype=np.int64),
    )
    return out


def main() -> None:
    """CLI: download all edge-case files into ``--data-root`` and build the ARDIS npz."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    args = parser.parse_args()
    for path in download_edge_case(args.data_root):
        log(INFO, "ok (sha256 verified): %s", path)
    log(INFO, "wrote %s", build_ardis_npz(args.data_root))


if __name__ == "__main__":
    main()
