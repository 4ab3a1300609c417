import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from hypothesis import settings, HealthCheck

settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def train_tiny_run(d):
    "A tiny trained run for the search and app tests: (system, best_model.pt, dataset, tower), in seconds on a CPU."
    from fashion_json_encoder.synthetic import make_synthetic_kfashion
    from fashion_json_encoder.models.image_encoder import CLIPImageEncoder, tiny_clip_config
    from fashion_json_encoder.system import FashionEncoderSystem
    ds = make_synthetic_kfashion(d / "kfashion", n_photos=40, seed=3)
    tower = CLIPImageEncoder(pretrained="none", model_cfg=tiny_clip_config(), seed=0)
    system = FashionEncoderSystem(output_dir=d / "run", batch_size=16, progress=False, clip_pretrained="none", num_workers=0)
    system.setup_data(ds, tower=tower).setup_trainer().train(standalone_epochs=1, contrastive_epochs=2)
    return system, d / "run/checkpoints/best_model.pt", ds, tower


@pytest.fixture(scope="module")
def one_thread():
    "Tiny galleries: on shared cores OpenMP hand-offs cost more than the work (5x here); restored after the module."
    import torch
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
