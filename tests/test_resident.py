"""ResidentSteps: the graph path's bookkeeping (blocks of k steps, the device learning rate, the eager rest) equals eager steps.

The CUDA graph itself needs a GPU (tests/test_training.py::test_whole_step_graphs_match_eager_steps); here its replay is
played by running the same k recorded steps eagerly from the static buffers, which checks everything around it on CPU:
which rows and learning rates each step gets, where losses and scales land, and what the optimiser holds afterwards.
"""
import torch
from hypothesis import given, settings, strategies as st

from fashion_json_encoder.models.contrastive_learner import ContrastiveLearner
from fashion_json_encoder.models.json_encoder import JSONEncoder
from fashion_json_encoder.resident import ResidentSteps, RowsLoss
from fashion_json_encoder.training import make_adam


class EagerReplay:
    "Stands in for a captured CUDA graph on CPU: runs the k steps `_capture` records (`_block`), on the same static buffers."
    def __init__(self, rs): self.rs, self.replays = rs, 0

    def replay(self): self.replays += 1; self.rs._block()


def _train(graph: bool, n: int, B: int, k: int, last: int, stage: str):
    torch.manual_seed(0)
    enc = JSONEncoder({"category": 6, "material": 8}, 8, 16, 32, dropout_rate=0.1)
    lrn = ContrastiveLearner(enc, learn_temperature=True)
    js = {"category": torch.randint(0, 6, (n, 1)), "material": torch.randint(0, 8, (n, 3))}
    data = {"features": torch.randn(n, 32).half()} if stage == "contrastive" else {"targets": torch.nn.functional.normalize(torch.randn(n, 32), dim=1)}
    opt = make_adam([p for p in lrn.parameters() if p.requires_grad], 1e-3, 1e-5)
    rs = ResidentSteps(RowsLoss(enc, lrn, enc.pack(js), **data), opt, lrn.clamp_logit_scale_, batch_size=B, k=k)
    if graph: rs._static(torch.device("cpu")); rs.graph = EagerReplay(rs)
    sizes = [B] * (n // B) + ([last] if last else [])
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:sum(sizes)]
    lrs = [1e-3 * 0.8 ** i for i in range(len(sizes))]
    losses, scales = torch.empty(len(sizes)), torch.full((len(sizes),), float("nan"))
    done = list(rs.run(rows, sizes, lrs, losses, scales))
    return {"done": done, "losses": losses, "scales": scales, "weights": [p.detach().clone() for p in lrn.parameters()],
            "group": {k: v for k, v in opt.param_groups[0].items() if k != "params"},
            "replays": rs.graph.replays if graph else 0}


@settings(max_examples=25, deadline=None)
@given(n=st.integers(4, 40), B=st.integers(2, 4), k=st.integers(1, 5), last=st.integers(0, 1),
       stage=st.sampled_from(["contrastive", "standalone"]))
def test_graph_blocks_equal_eager_steps(n, B, k, last, stage):
    last = last * (2 if n % B >= 2 else 0)   # a smaller last batch of 2 when the data have one
    n = n - n % B + last
    g, e = _train(True, n, B, k, last, stage), _train(False, n, B, k, last, stage)
    steps = n // B + (1 if last else 0)
    full = n // B
    assert sum(g["done"]) == sum(e["done"]) == steps and e["done"] == [1] * steps
    assert g["replays"] == (full // k if full >= k else 0) and g["done"][:g["replays"]] == [k] * g["replays"]
    assert torch.allclose(g["losses"], e["losses"], atol=1e-6) and torch.allclose(g["scales"], e["scales"], atol=1e-6)
    for a, b in zip(g["weights"], e["weights"]): assert torch.allclose(a, b, atol=1e-6)
    assert g["group"] == e["group"] and isinstance(g["group"]["lr"], float) and g["group"]["capturable"] is False
