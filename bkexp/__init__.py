"""bkexp: train and compare ResNet-BK, Mamba and Transformer language models on identical pipelines."""

__version__ = "0.1.0"
