"""Experiment tooling: cached training, sweeps over methods and keep ratios, the demo."""

from .train_cache import register_dataset, trained_model

__all__ = ["register_dataset", "trained_model"]
