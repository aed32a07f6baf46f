"""gorilla_dist: distributed pretraining of decoder-only language models.

Kept import-light on purpose: the launcher imports `gorilla_dist.config` without pulling in torch.
"""

__version__ = "0.1.0"
