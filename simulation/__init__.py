"""Simulation side of flwr-invariant: tasks, partitions, models, attacks, apps and runner.

Modules: ``config`` (run-config defaults and validation), ``data`` (CIFAR-10 +
Southwest, Fashion-MNIST + ARDIS, Sentiment140 + Greek-director tweets, the linear
task), ``sent140`` and ``text`` (Sentiment140 reading and tokenisation), ``partition``
(seeded IID / Dirichlet / whole-user splits, the malicious pool), ``models``, ``attacks`` (edge-case and
pixel backdoors, PGD, model replacement), ``adaptive`` (ALIE and Neurotoxin
math), ``attackers`` (the attack modes as objects with training hooks),
``training`` (loops, one client's round, the server-side ``evaluate_fn``), ``server_app`` (the ``ServerApp``),
``compare`` (FedAvg vs Invariant runner), ``download`` (edge-case files with
sha256 checks), ``safe_pickle`` (restricted unpickler).
"""

from flwr_invariant.extras import require_installed

#: What the simulation needs beyond the plain install (``pip install 'flwr-invariant[simulation]'``).
SIMULATION_MODULES = ("torch", "torchvision", "ray", "tqdm", "yaml", "matplotlib", "sklearn")

require_installed(SIMULATION_MODULES, "simulation", "flwr-invariant's simulation package")
