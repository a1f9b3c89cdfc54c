"""bkexp: train and compare ResNet-BK, Mamba and Transformer language models on identical pipelines."""

import os
import warnings

# PyTorch's OpenMP workers (which also run the numba kernels: both use torch's libgomp pool) spin for ~3 ms
# after every parallel region by default. When other processes share the CPU, the spinning takes the cores
# they need: with one of two cores busy, training steps took 1.2-1.7x as long as under PASSIVE (docs/kernels.md,
# "CPU runtime"). Sleeping costs each parallel region a wake-up instead (~30-80 us on the 2-core VMs measured):
# on an idle machine a short spin (GOMP_SPINCOUNT=10000) made steps 3-4% faster. The OpenMP runtime reads this once
# when torch loads, so it only takes effect when bkexp is imported before torch (train.py and the bkexp command
# do that); a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT always wins (libgomp prefers GOMP_SPINCOUNT).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Two deprecations that dependencies raise against torch 2.13 on every run, inside their own code: torchdata's
# StatefulDataLoader calls torch.set_vital, Lightning's pytree helper tests for LeafSpec. A bkexp user can do
# nothing about them, and in a run's log they read like a problem with the run. Only these messages are hidden.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

__version__ = "0.1.0"
