"""MeanFlow (Geng et al., arXiv 2505.13447): one-step generative modeling with a one-pass dual JVP engine."""

__version__ = "0.1.0"
