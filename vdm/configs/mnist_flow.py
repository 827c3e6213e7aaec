"""configs/mnist.py trained by flow matching (Lipman et al. 2023) with the optimal-transport path, as a
member of the weighted-ELBO family (Kingma & Gao 2023, App. D.3).

    python -m vdm.main --config configs/mnist_flow.py --workdir workdirs/mnist_flow

What differs from configs/mnist.py:
- ``model.schedule = "optimal_transport"``: the path z' = (1 - s) x + s eps, gamma = 2 log(s / (1 - s)),
  pinned to [-13.3, 5] (``vdm/schedules/optimal_transport.py``);
- ``model.prediction = "o"``: the network outputs the path's velocity o = eps - x (``vdm/predictions.py``);
- ``loss.weighting = "flow_matching"``: w(lambda) = exp(-lambda / 2), under which the weighted loss is
  flow matching's integral of ||o - o_hat||^2 over s (tests/test_predictions.py checks the identity).
  The weighting is monotonic, so this is still an ELBO of noise-augmented data, and evaluation reports
  the true VLB and the probability-flow ODE's bound.
"""
import os

from vdm import configlib


def get_config():
    c = configlib.load_file(os.path.join(os.path.dirname(__file__), "mnist.py"))
    c.model.schedule = "optimal_transport"
    c.model.schedule_kwargs = {}
    c.model.prediction = "o"
    c.loss.weighting = "flow_matching"
    c.loss.weighting_kwargs = {}
    c.eval.method = "both"
    c.eval.num_examples = 100  # the ODE bound: about 650 network evaluations per batch
    return c
