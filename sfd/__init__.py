"""sfd: Score Forgetting Distillation (ICLR 2025) for every diffusion backbone."""
__version__ = "0.1.0"
