"""vlbench: a comparative benchmark suite for vision-language pre-training methods."""

__version__ = "0.1.0"
