"""bkexp: train and compare ResNet-BK, Mamba and Transformer language models on identical pipelines."""

import os

# PyTorch's OpenMP workers spin-wait between parallel regions by default; on a small CPU that steals the
# cores the numba kernels (BK-Core, selective scan) run on and slows every op several-fold. The OpenMP
# runtime reads this once when torch loads, so it only takes effect when bkexp is imported before torch
# (train.py and the bkexp command do that); a user's own setting always wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
