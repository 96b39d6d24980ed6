"""Orchestration: Ray Tune + Optuna sweeps of SFD, Ray Train trials, MLflow tracking.

Thin over the `sfd` library: it never re-implements SFD, it only adapts `sfd.loop.train_sfd`.
"""
