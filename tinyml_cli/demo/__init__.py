"""The demo: the whole pipeline on the tiny default model it builds, and the synthetic data it trains on."""

