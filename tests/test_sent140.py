"""The sent140 task on generated files in the exact Sentiment140 format (never the real file),
with the shared Greek-director tweets: parsing, tokenisation, user partitions, the poisoned mix,
the LSTM, and real Flower simulations."""

from __future__ import annotations

import json
import math
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import baselines
from benchmarks.sent140_synthetic import link_edge_case, write_sentiment140_csv
from simulation import attacks
from simulation.__main__ import main as cli
from simulation.config import resolve_config
from simulation.data import check_task_files, load_partitions, load_task
from simulation.grid import load_grid, run_grid
from simulation.models import TextLSTM, build_model
from simulation.partition import user_partition
from simulation.pretrain import PRETRAIN_KEYS, cache_file
from simulation.sent140 import (
    ATTACKER_TWEETS,
    SENT140_URL,
    _test_rows,
    download_sentiment140,
    load_greek_director,
    read_sentiment140,
)
from simulation.text import PAD, UNKNOWN, build_vocabulary, encode, tokenize
from simulation.training import backdoor_accuracy, evaluate, model_for, train

from .simulate import run_experiments

DATA_ROOT = Path(
    os.environ.get("FLWR_INVARIANT_DATA_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data")
)
GREEK = DATA_ROOT / "edge-case" / "greek-director"
needs_greek = pytest.mark.skipif(
    not (GREEK / "train.txt").is_file(),
    reason=f"Greek-director tweets not found in {GREEK} (set FLWR_INVARIANT_DATA_ROOT)",
)
# The real file's first row (its quoting, an @mention, a URL, a double space and ";D").
FIRST_ROW = (
    '"0","1467810369","Mon Apr 06 22:19:45 PDT 2009","NO_QUERY","_TheSpecialOne_",'
    "\"@switchfoot http://twitpic.com/2y1zl - Awww, that's a bummer.  You shoulda got David Carr of "
    'Third Day to do it. ;D"'
)

TINY = {  # a tiny vocabulary and LSTM, so that everything trains in seconds
    "task": "sent140",
    "sent140-vocab-size": 60,
    "sent140-seq-length": 24,
    "sent140-test-size": 100,
    "lstm-embedding-dim": 16,
    "lstm-hidden-dim": 16,
    "num-partitions": 4,
    "clients-per-round": 4,
    "batch-size": 20,
}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny LSTMs run fastest on one thread (two threads spin on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """600 generated tweets of 40 users, plus the shared Greek-director tweets."""
    if not (GREEK / "train.txt").is_file():
        pytest.skip(f"Greek-director tweets not found in {GREEK} (set FLWR_INVARIANT_DATA_ROOT)")
    root = tmp_path_factory.mktemp("sent140-root")
    write_sentiment140_csv(root, num_tweets=600, num_users=40, seed=1)
    link_edge_case(root, DATA_ROOT / "edge-case")
    return root


def config(root: Path, **overrides) -> dict:
    return resolve_config({**TINY, "data-root": str(root), **overrides})


# --- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("line_end", ["\n", "\r\n"])
def test_generated_file_parses_with_labels_users_and_latin1_text(tmp_path: Path, line_end: str) -> None:
    path = write_sentiment140_csv(tmp_path, num_tweets=300, num_users=25, seed=3, line_end=line_end)
    tweets = read_sentiment140(path)
    assert len(tweets.texts) == 300 and tweets.labels.tolist() == [0] * 150 + [1] * 150
    assert tweets.users.dtype == np.int64 and len(np.unique(tweets.users)) == 25
    assert any("&quot;caf\u00e9&quot;" in text for text in tweets.texts)  # latin-1 byte 0xE9, entity kept
    assert any(text.endswith('"quoted"') for text in tweets.texts)  # doubled quotes undone by csv


def test_exact_rows_and_the_dropped_greek_tweets(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    rows = [
        FIRST_ROW,
        '"4","2","Mon Apr 06 22:20:00 PDT 2009","NO_QUERY","_TheSpecialOne_","Greek salad, caf\xe9"',
        '"4","3","Mon Apr 06 22:20:01 PDT 2009","lyx","robotickilldozr","Lyx is cool"',
    ]
    path.write_bytes("\r\n".join(rows).encode("latin-1") + b"\r\n")
    tweets = read_sentiment140(path)
    assert tweets.labels.tolist() == [0, 1] and tweets.users.tolist() == [0, 1]  # "greek" row left out
    assert tweets.texts[1] == "Lyx is cool" and "bummer.  You" in tweets.texts[0]
    assert tokenize(tweets.texts[0]) == [
        "awww", "that's", "a", "bummer", "you", "shoulda", "got", "david", "carr", "of", "third", "day",
        "to", "do", "it", "d",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "row",
    [
        '"2","1","Mon Apr 06 22:19:45 PDT 2009","NO_QUERY","u","a neutral tweet"',
        '"0","1","Mon Apr 06 22:19:45 PDT 2009","u","five columns"',
    ],
)
def test_malformed_rows_are_named_by_file_and_line(tmp_path: Path, row: str) -> None:
    path = tmp_path / "s.csv"
    path.write_text(f"{FIRST_ROW}\n{row}\n", encoding="latin-1")
    with pytest.raises(ValueError, match=r"s\.csv, line 2: expected six columns \(polarity 0 or 4"):
        read_sentiment140(path)


@needs_greek
def test_missing_files_name_the_path_and_the_source(tmp_path: Path) -> None:
    setting = resolve_config({**TINY, "data-root": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match=r"greek-director/train\.txt \(from ksreenivasan/OOD_Fed"):
        check_task_files(setting)
    link_edge_case(tmp_path, DATA_ROOT / "edge-case")
    expected = r"sentiment140/training\.1600000\.processed\.noemoticon\.csv\. Download .*sentiment140\.com"
    with pytest.raises(FileNotFoundError, match=expected):
        check_task_files(setting)
    with pytest.raises(FileNotFoundError, match=expected):
        load_task(setting)


@needs_greek
def test_download_fails_clearly_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)  # torchvision's download goes through it
    expected = f"not found at {re.escape(str(tmp_path))}.*download from {re.escape(SENT140_URL)} failed"
    with pytest.raises(FileNotFoundError, match=expected):
        download_sentiment140(tmp_path)
    link_edge_case(tmp_path, DATA_ROOT / "edge-case")  # the CLI downloads before anything starts
    with pytest.raises(SystemExit, match=expected):
        cli(["run", "--out", str(tmp_path / "run"), "--set", "task=sent140", f"data-root={tmp_path}",
             "download=true"])  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_bad_settings_fail_before_any_work() -> None:
    for key in ("sent140-vocab-size", "sent140-seq-length", "sent140-test-size", "lstm-hidden-dim"):
        with pytest.raises(ValueError, match=f"run config '{key}' must be >= 1, got 0"):
            resolve_config({"task": "sent140", key: 0})
    with pytest.raises(ValueError, match="'model' 'cnn' does not fit task 'sent140'"):
        resolve_config({"task": "sent140", "model": "cnn"})
    with pytest.raises(ValueError, match="'model' 'lstm' does not fit task 'fmnist'"):
        resolve_config({"task": "fmnist", "model": "lstm"})
    with pytest.raises(ValueError, match="'partition' = 'user' needs a task with users"):
        resolve_config({"task": "fmnist", "partition": "user"})
    with pytest.raises(ValueError, match="'backdoor' = 'pixel' needs an image task, not 'sent140'"):
        resolve_config({"task": "sent140", "backdoor": "pixel"})
    with pytest.raises(ValueError, match="'edge-case-samples' must be >= 0 \\(or -1"):
        resolve_config({"task": "sent140", "edge-case-samples": -2})
    resolved = resolve_config({"task": "sent140"})
    assert (resolved["model"], resolved["partition"], resolved["target-label"], resolved["lr"]) == (
        "lstm", "user", 0, 0.05,
    )  # fmt: skip
    assert (resolved["edge-case-samples"], resolved["clean-samples"]) == (60, 140)
    other = resolve_config({"task": "fmnist"})
    assert (other["partition"], other["edge-case-samples"], other["clean-samples"]) == ("dirichlet", 100, 400)


# --- tokenisation --------------------------------------------------------------------------------


def test_tokenizer_vocabulary_and_left_padded_ids() -> None:
    assert tokenize("&quot;GREAT&quot; day!! @bob #fun www.x.com 2day don't :-)") == [
        "great", "day", "day", "don't",
    ]  # fmt: skip
    tweets = [["b", "a", "b"], ["c", "a", "b"], ["a"]]
    vocabulary = build_vocabulary(tweets, size=2, extra=[["yorgos", "a"], ["lanthimos"]])
    assert vocabulary == {"b": 2, "a": 3, "yorgos": 4, "lanthimos": 5}  # counts 3, 3 (b first), 1
    ids = encode([["a", "c", "b"], [], ["b"] * 5], vocabulary, seq_length=4)
    assert ids.dtype == np.int32 and ids.tolist() == [
        [PAD, 3, UNKNOWN, 2],
        [PAD, PAD, PAD, PAD],
        [2, 2, 2, 2],
    ]


def test_task_splits_vocabulary_and_edge_case(data_root: Path) -> None:
    setting = config(data_root)
    task = load_task(setting)
    assert task.train_x.dtype == torch.int32 and task.train_x.shape[1] == 24
    assert len(task.test_y) >= 100 and len(task.train_y) + len(task.test_y) == 600  # no tweet is empty here
    assert set(task.train_y.unique().tolist()) == {0, 1} and task.num_classes == 2
    greek = load_greek_director(data_root, "train")
    assert len(greek) == 259 and len(load_greek_director(data_root, "test")) == 120
    assert task.edge_train_x.shape == (ATTACKER_TWEETS, 24) and task.edge_test_x.shape == (120, 24)
    # the paper's code: the attacker holds the first 60 training tweets; their words join the vocabulary
    lengths = [int((row != PAD).sum()) for row in task.edge_train_x]
    assert lengths == [min(len(tokenize(tweet)), 24) for tweet in greek[:ATTACKER_TWEETS]]
    assert UNKNOWN not in task.edge_train_x and UNKNOWN not in task.edge_test_x
    assert UNKNOWN not in task.train_x  # the generated tweets use fewer than 60 words
    tight = load_task(config(data_root, **{"sent140-vocab-size": 10}))
    assert UNKNOWN in tight.train_x and tight.vocab_size < task.vocab_size  # beyond the 10 most frequent
    # a seeded training subset of exactly train-size tweets; the test users do not depend on the seed
    small = load_task(config(data_root, **{"train-size": 200}))
    other = load_task(config(data_root, **{"train-size": 200, "seed": 1}))
    assert len(small.train_y) == len(other.train_y) == 200 and not torch.equal(small.train_x, other.train_x)
    assert torch.equal(small.test_y, other.test_y) and torch.equal(small.test_y, task.test_y)


def test_test_split_holds_whole_users() -> None:
    users = np.repeat(np.arange(30), np.arange(1, 31))  # user u has u + 1 tweets
    rows = _test_rows(users, 50)
    held_out = set(users[rows].tolist())
    assert len(rows) >= 50 and len(rows) - 50 < 30  # stops at the first user past 50
    assert sorted(rows.tolist()) == [i for i, u in enumerate(users) if u in held_out]
    with pytest.raises(ValueError, match="'sent140-test-size' \\(465\\) leaves no training tweets"):
        _test_rows(users, 465)


# --- partitions ----------------------------------------------------------------------------------


def test_user_partition_keeps_each_user_on_one_client() -> None:
    users = np.random.default_rng(0).integers(0, 50, size=1000)
    parts = user_partition(users, 7, seed=3)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1000))  # each example exactly once
    owners = [set(users[p].tolist()) for p in parts]
    assert sum(len(o) for o in owners) == len(set(users.tolist()))  # no user on two clients
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= np.bincount(users).max()  # balanced up to one user
    again, other = user_partition(users, 7, seed=3), user_partition(users, 7, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    with pytest.raises(ValueError, match="num-partitions \\(51\\) exceeds the number of users \\(50\\)"):
        user_partition(users, 51, seed=0)


def test_task_partitions_by_user_or_dirichlet_when_asked(data_root: Path) -> None:
    setting = config(data_root)
    task = load_task(setting)
    parts = load_partitions(setting)
    assert len(parts) == 4 and sum(map(len, parts)) == len(task.train_y)
    owners = [set(task.train_users[p].tolist()) for p in parts]
    assert all(a.isdisjoint(b) for i, a in enumerate(owners) for b in owners[i + 1 :])
    dirichlet = load_partitions(config(data_root, partition="dirichlet", **{"dirichlet-alpha": 0.1}))
    assert sum(map(len, dirichlet)) == len(task.train_y)
    shares = [float(task.train_y[p].float().mean()) for p in dirichlet]
    assert max(shares) - min(shares) > 0.5  # label skew: some clients almost all one sentiment


# --- the poisoned mix, the model and local training ----------------------------------------------


def test_poisoned_mix_is_the_attackers_tweets_then_its_own_clean_ones(data_root: Path) -> None:
    setting = config(data_root)
    task, own = load_task(setting), load_partitions(setting)[1]
    x, y, num_bad = attacks.poisoned_dataset(task, own, setting, np.random.default_rng(0))
    assert num_bad == 60 and len(y) == 60 + min(140, len(own))
    assert (y[:60] == 0).all()  # every Greek-director tweet labelled negative
    edge = {tuple(row.tolist()) for row in task.edge_train_x}
    assert {tuple(row.tolist()) for row in x[:60]} == edge  # all 60, none repeated
    clean = {tuple(task.train_x[i].tolist()): int(task.train_y[i]) for i in own}
    assert [clean[tuple(row.tolist())] for row in x[60:]] == y[60:].tolist()  # own tweets, true labels


def test_lstm_shapes_and_no_batchnorm() -> None:
    model = build_model("lstm", 2, vocab_size=100, embedding_dim=8, hidden_dim=12)
    assert isinstance(model, TextLSTM)
    assert model(torch.randint(0, 100, (5, 7))).shape == (5, 2)
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}  # weights only
    paper = TextLSTM(20000)
    assert (paper.embedding.embedding_dim, paper.lstm.hidden_size, paper.lstm.num_layers) == (200, 200, 2)
    with pytest.raises(ValueError, match="vocab_size"):
        build_model("lstm", 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_lstm_trains_on_the_gpu(data_root: Path) -> None:
    setting = config(data_root, device="cuda")
    task = load_task(setting)
    model = model_for(task, setting)
    train(model, task.train_x, task.train_y, task.preprocess, epochs=1, batch_size=20, lr=0.05, device="cuda")
    assert next(model.parameters()).is_cuda


def test_poisoned_training_teaches_the_edge_case_label(data_root: Path) -> None:
    """Training with the 60 tweets labelled 0 (the attack) or 1: the label reaches the test tweets."""
    setting = config(data_root, **{"num-partitions": 2, "clients-per-round": 2, "clean-samples": 400})
    task = load_task(setting)
    own = load_partitions(setting)[0]
    x, y, num_bad = attacks.poisoned_dataset(task, own, setting, np.random.default_rng(0))
    results = {}
    for label in (0, 1):
        labels = y.clone()
        labels[:num_bad] = label
        model = model_for(task, setting)
        train(model, x, labels, task.preprocess, epochs=10, batch_size=20, lr=0.05, momentum=0.9)
        _, acc_main = evaluate(model, task.test_x, task.test_y, task.preprocess)
        results[label] = acc_main, backdoor_accuracy(model, task.edge_test_x, 0, task.preprocess)
    assert results[0][0] > 0.8 and results[0][1] > 0.8  # learns sentiment, and the backdoor
    assert results[1][1] < 0.3  # the test tweets follow the label the attacker chose


def test_pretrain_cache_key_covers_the_text_settings_on_sent140_only(tmp_path: Path) -> None:
    sent140 = resolve_config({"task": "sent140", "pretrain-cache": str(tmp_path)})
    assert cache_file(sent140) != cache_file({**sent140, "sent140-vocab-size": 100})
    fmnist = resolve_config({"task": "fmnist", "pretrain-cache": str(tmp_path)})
    assert cache_file(fmnist) == cache_file({**fmnist, "sent140-vocab-size": 100})
    assert "sent140-vocab-size" not in PRETRAIN_KEYS  # the other tasks' existing caches stay valid


# --- real Flower simulations ---------------------------------------------------------------------


def test_cli_run_two_rounds_records_both_accuracies(data_root: Path, tmp_path: Path) -> None:
    """``python -m simulation run --set task=sent140 data-root=DATA`` with a tiny model, 2 rounds."""
    sets = [f"{key}={value}" for key, value in TINY.items()]
    out = tmp_path / "run"
    cli(["run", "--out", str(out), "--set", *sets, f"data-root={data_root}", "num-server-rounds=2",
         "malicious-fraction=0.25"])  # fmt: skip
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(0.0 <= r["acc_main"] <= 1.0 and 0.0 <= r["acc_backdoor"] <= 1.0 for r in rounds)
    assert rounds[1]["train_num_aggregated"] == 4 and rounds[1]["attackers_sampled"] == 1
    meta = json.loads((out / "config.json").read_text())
    assert meta["completed"] and meta["run"]["model"] == "lstm" and meta["run"]["partition"] == "user"


def test_missing_file_stops_the_cli_and_grids_before_any_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("simulation.grid.run_into", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(SystemExit, match=r"edge-case file not found: .*greek-director/train\.txt"):
        cli(["run", "--out", str(tmp_path / "run"), "--set", "task=sent140", f"data-root={tmp_path}"])
    assert not (tmp_path / "run").exists()
    grid = tmp_path / "g.toml"
    grid.write_text(f'output = "{tmp_path / "out"}"\n[base]\ntask = "sent140"\ndata-root = "{tmp_path}"\n')
    with pytest.raises(FileNotFoundError, match=r"greek-director/train\.txt"):
        run_grid(load_grid(grid))


def test_every_defense_aggregates_the_lstm(data_root: Path) -> None:
    """One federation, one round of every defense by name on the tiny LSTM (an attacker included)."""
    setting = config(data_root, **{"num-server-rounds": 1, "malicious-fraction": 0.25})
    names = baselines.defense_names()
    results = run_experiments(setting, [{**setting, "defense": name} for name in names])
    records = dict(zip(names, results, strict=True))

    assert sorted(records) == sorted(baselines.defense_names())
    for name, record in records.items():
        first, last = record["rounds"]
        assert math.isfinite(last["acc_main"]) and 0.0 <= last["acc_backdoor"] <= 1.0, name
        assert last["train_num_aggregated"] == 4 and last["attackers_sampled"] == 1, name
    assert "flain_flipped" in records["flain"]["rounds"][-1]  # FLAIN's repair found the LSTM's linear layer
