"""mmengine.runner.set_random_seed: seed Python's, NumPy's and torch's generators (what Open-Sora calls)."""

import random

import numpy as np
import torch


def set_random_seed(seed=None, deterministic=False, diff_rank_seed=False):
    if seed is None:
        seed = random.randint(0, 2**31 - 1)
    if diff_rank_seed and torch.distributed.is_initialized():
        seed += torch.distributed.get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
    return seed
