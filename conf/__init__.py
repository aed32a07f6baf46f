"""Hydra config groups, shipped as package data (gorilla_dist.conf; see pyproject.toml)."""
