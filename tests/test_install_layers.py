"""The plain install: the strategies, the numpy core and the numpy baselines need only flwr, numpy and
threadpoolctl.

Each check runs in a fresh interpreter in which the heavy packages cannot be imported, as after
``pip install flwr-invariant`` without extras (``.ci/run`` also checks a real plain install).
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "ray", "sklearn", "matplotlib", "tqdm", "yaml", "numba")
BLOCK = f"import sys\nfor name in {HEAVY!r}:\n    sys.modules[name] = None  # import raises ImportError\n"


def run_without_heavy_packages(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_strategies_core_and_numpy_baselines_work_without_the_extras() -> None:
    code = """
import numpy as np
import baselines
import flwr_invariant.serverapp
from flwr_invariant import InvariantAggregation
from flwr_invariant.aggregate import invariant_update
from flwr_invariant.engines import select_engine
engine = select_engine("numpy")
weights, fraction = engine([np.zeros(3)], [[np.ones(3)], [np.ones(3)]], tau=0.6, trim_ratio=0.2)
assert fraction == 1.0 and weights[0].tolist() == [1.0, 1.0, 1.0]  # w - (w - w_i)
InvariantAggregation(tau=0.7), flwr_invariant.serverapp.InvariantAggregation(tau=0.7)
assert "robust-lr" in baselines.DEFENSES and "flame" in baselines.DEFENSES
from baselines.alignins import AlignIns
from baselines.crfl import CRFL
from baselines.fltrust import FLTrust
from baselines.multi_metrics import MultiMetrics
AlignIns(), CRFL(seed=0), FLTrust(), MultiMetrics()
print("ok")
"""
    result = run_without_heavy_packages(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_piece_that_needs_an_extra_names_it() -> None:
    cases = {
        "import simulation.config": "pip install 'flwr-invariant[simulation]'",
        "import baselines.flain_repair": "pip install 'flwr-invariant[simulation]'",
        "import baselines.server_side": "pip install 'flwr-invariant[simulation]'",
        "from flwr_invariant.engines import select_engine; select_engine('torch')": (
            "pip install 'flwr-invariant[torch]'"
        ),
        "import numpy as np; from baselines.flame import flame_admitted; flame_admitted(np.eye(4))": (
            "pip install 'flwr-invariant[simulation]'"
        ),
        "import numpy as np; from baselines.deepsight import clustering_labels as c; c(np.eye(3))": (
            "pip install 'flwr-invariant[simulation]'"
        ),
    }
    for code, extra in cases.items():
        result = run_without_heavy_packages(code)
        assert result.returncode != 0 and "ImportError" in result.stderr, code
        assert extra in result.stderr, (code, result.stderr[-500:])
