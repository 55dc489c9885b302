"""opt: pretraining OPT-style decoder-only language models, with a divergence supervisor."""

__version__ = "0.1.0"
