"""Stand-in generators shared by the robustness tests (their answers are known without training)."""
from __future__ import annotations

from torch import nn


class FixedPrompt(nn.Module):
    """A text generator that draws 'a red one' whatever it is asked (its prompt embedding is swapped)."""

    def __init__(self, net, emb):
        super().__init__()
        self.net, self.emb = net, emb
        self.sigma_min, self.sigma_max = net.sigma_min, net.sigma_max

    def forward_embeds(self, x, sigma, emb):
        return self.net.forward_embeds(x, sigma, self.emb.expand(len(x), -1, -1))
