"""The Slurm job template and the dev cluster script, shipped as package data (gorilla_dist.slurm)."""
