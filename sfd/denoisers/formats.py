"""Loaders for foreign teacher formats, registered into ``TEACHER_LOADERS``."""
