"""nanochat: train your own small ChatGPT from scratch."""

__version__ = "0.1.0"
