"""Generator and fake score as two LoRA adapters (peft) on the *one* frozen teacher UNet.

Full fine-tuning holds three copies of the UNet (teacher, fake score, generator) plus two sets
of gradients and Adam moments: for Stable Diffusion's 860 M-parameter UNet that is ~31 GB in
fp32 before any activation. Here the teacher's UNet gets low-rank adapters -- one per trained
network, initialised to zero so both start as the teacher (SFD.md section 3) -- and every pass
picks its adapter: the teacher runs with all adapters off. One copy of the UNet serves all three.

Switching is a per-pass state of the shared UNet, so it must also hold when gradient
checkpointing recomputes a block during the backward pass -- by then another network may have
run. The checkpoint function therefore records the adapter state of each checkpointed call and
restores it for the recomputation (:func:`enable_checkpointing`).

The switch sets the active adapter on each peft layer without peft's ``set_adapter``, which also
flips ``requires_grad`` (the SFD iteration decides what is trainable, per step).
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from .base import Denoiser
from .text_unet import Shared

# attention and feed-forward projections of every transformer block (the usual SD LoRA targets)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
OFF = None          # adapter state of the teacher: every adapter disabled


def _tuner_layers(unet):
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


class AdapterHost:
    """The adapter state of one shared UNet: which adapter runs (None: the plain teacher)."""

    def __init__(self, unet):
        self.unet = unet
        self.layers = []
        self.state = OFF
        self.names: list[str] = []

    def add(self, name: str, rank: int, seed: int = 0) -> None:
        from peft import LoraConfig, inject_adapter_in_model
        if name in self.names:
            raise ValueError(f"LoRA adapter {name!r} exists already")
        cfg = LoraConfig(r=int(rank), lora_alpha=int(rank), target_modules=list(LORA_TARGETS), lora_dropout=0.0,
                         init_lora_weights=True)          # B = 0: the adapter starts as the teacher
        # peft draws lora_A from the global RNG: seed it, so a run (and its resumption) is reproducible
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")   # several adapters: the point
            torch.manual_seed(int(seed) * 1009 + len(self.names))
            inject_adapter_in_model(cfg, self.unet, adapter_name=name)
        self.layers = _tuner_layers(self.unet)
        if not self.layers:
            raise ValueError(f"LoRA: the UNet has none of the target modules {LORA_TARGETS}")
        self.names.append(name)
        self._apply(self.state)

    def _apply(self, state) -> None:
        for m in self.layers:
            m._disable_adapters = state is OFF       # peft's own flags, set without touching requires_grad
            if state is not OFF:
                m._active_adapter = [state]
        self.state = state

    @contextlib.contextmanager
    def use(self, state):
        if state == self.state:
            yield
            return
        prev = self.state
        self._apply(state)
        try:
            yield
        finally:
            self._apply(prev)

    def adapter_modules(self, name: str) -> dict[str, nn.Module]:
        """The adapter's LoRA A/B modules keyed by their path without the adapter name."""
        out = {}
        for path, m in self.unet.named_modules():
            for kind in ("lora_A", "lora_B"):
                d = getattr(m, kind, None)
                if isinstance(d, nn.ModuleDict) and name in d:
                    out[f"{path}.{kind}".replace(".", "__")] = d[name]
        return out

    def checkpoint_fn(self):
        """diffusers' gradient-checkpointing hook that recomputes each block under the adapter state of
        its forward call (the default would use whichever network ran last)."""
        def run(module, *args):
            state = self.state

            def block(*a):
                with self.use(state):
                    return module(*a)
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return run


class LoRAView(Denoiser):
    """One trained network of a LoRA run: the shared base denoiser with adapter ``name`` switched on.

    Its parameters (and state dict, so checkpoints and the optimiser) are that adapter's only; the
    base UNet stays frozen and is held once. ``copy.deepcopy`` (the generator EMA) makes a new adapter
    on the same base, starting from this one's weights.
    """

    def __init__(self, base, name: str, rank: int, seed: int = 0):
        super().__init__()
        self.base = Shared(base)
        self.name = name
        self.rank = int(rank)
        host = base.adapters
        host.add(name, rank, seed)
        self.lora = nn.ModuleDict(host.adapter_modules(name))
        for p in self.lora.parameters():
            p.requires_grad_(True)
        for attr in ("sigma_min", "sigma_max", "sigma_data", "img_shape", "num_classes"):
            setattr(self, attr, getattr(base, attr))

    # the denoiser: the base's, under this adapter
    def forward(self, x, sigma, cond):
        base = self.base.obj
        with base.adapters.use(self.name):
            return base.forward(x, sigma, cond)

    def null_cond(self, cond):
        return self.base.obj.null_cond(cond)

    def loss_weight(self, sigma):
        return self.base.obj.loss_weight(sigma)

    def round_sigma(self, sigma):
        return self.base.obj.round_sigma(sigma)

    @property
    def prompts(self):
        return self.base.obj.prompts

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.base.obj.set_gradient_checkpointing(enabled)

    def clone(self):
        return self.__deepcopy__({})

    def __deepcopy__(self, memo):
        base = self.base.obj
        name = f"{self.name}_copy{len(base.adapters.names)}"
        twin = LoRAView(base, name, self.rank)
        with torch.no_grad():
            for k, p in self.lora.state_dict().items():
                twin.lora.state_dict()[k].copy_(p)
        twin.train(self.training)
        return twin

    def merged_unet(self):
        """A plain ``UNet2DConditionModel`` with this adapter merged into the weights (for export)."""
        base = self.base.obj
        unet = type(base.unet).from_config(base.unet.config)
        host = base.adapters
        state = {}
        with torch.no_grad():
            deltas = {}
            for m_path, m in base.unet.named_modules():
                if m in host.layers and self.name in getattr(m, "lora_A", {}):
                    deltas[m_path] = m.get_delta_weight(self.name)
            for k, v in base.unet.state_dict().items():
                if ".lora_" in k:
                    continue
                clean = k.replace(".base_layer.", ".")
                mod = clean.rsplit(".", 1)[0]
                if k.endswith(".base_layer.weight") and mod in deltas:
                    v = v + deltas[mod].to(v.dtype)
                state[clean] = v
        unet.load_state_dict(state, strict=True)
        return unet


def add_lora(base, names=("fake_score", "generator"), rank: int = 8, seed: int = 0):
    """Give ``base`` (a text UNet denoiser, the frozen teacher) an adapter host and one view per name."""
    if getattr(base, "adapters", None) is None:
        base.adapters = AdapterHost(base.unet)
    return [LoRAView(base, n, rank, seed) for n in names]
