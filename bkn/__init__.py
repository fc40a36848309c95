"""bkn: Batch Kalman Normalization (Wang et al., 2018) — layers, models, training and the paper's experiments."""

__version__ = "0.1.0"
