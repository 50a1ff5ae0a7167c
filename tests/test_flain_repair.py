"""FLAIN's server-side repair of a real torch model (needs the 'simulation' extra)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="FLAIN's repair needs torch (the 'simulation' extra)")

from flwr.app import ArrayRecord  # noqa: E402
from torch import nn  # noqa: E402

from baselines.flain_repair import FlainRepair  # noqa: E402


def test_flain_repair_flips_a_dormant_backdoor_neuron_without_hurting_clean_accuracy():
    torch.manual_seed(0)

    def model_fn():
        return nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))

    model = model_fn()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        model[0].bias.copy_(torch.tensor([0.0, 0.0, -1.0]))  # neuron 2 never fires on clean data
        model[2].weight.zero_()
        model[2].bias.zero_()
    initial = ArrayRecord(model.state_dict())
    with torch.no_grad():  # training: clean neurons learn the task, neuron 2 a large backdoor push
        model[2].weight.copy_(torch.tensor([[1.0, -1.0, -5.0], [-1.0, 1.0, 5.0]]))
    final = ArrayRecord(model.state_dict())
    points = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.5], [0.3, 1.5]])
    labels = torch.tensor([0, 1, 0, 1])
    repair = FlainRepair(model_fn, [(points, labels)], layer_name="2")
    repaired, report = repair(initial, final)
    weight = repaired.to_torch_state_dict()["2.weight"].numpy()
    assert report["flain_flipped"] == 1 and report["flain_aux_accuracy_after"] == 1.0
    scale = np.linalg.norm([[1, -1, -5], [-1, 1, 5]]) / np.linalg.norm([[1, -1, 5], [-1, 1, -5]])
    np.testing.assert_allclose(weight, np.array([[1, -1, 5], [-1, 1, -5]]) * scale, atol=1e-5)
