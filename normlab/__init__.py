"""normlab: normalization experiments on small CNNs, tracked in MLflow."""

__version__ = "0.1.0"
