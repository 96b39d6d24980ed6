"""The exceptions sfd raises for people: each message names the bad file or value and the fix."""
from __future__ import annotations


class CheckpointError(RuntimeError):
    """A weight file is missing, unreadable or does not match the expected model."""
