"""Hydra plugins of this project (found by Hydra in the hydra_plugins namespace package)."""
