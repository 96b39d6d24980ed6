"""Adversarial forgetting for class presets (``adv_pool`` > 0): the generator also forgets the class
embeddings that an attacker would use to bring a forgotten class back.

Why: SFD forgets through the label. The forget branch asks the generator, conditioned on the forgotten
class's row of its class-embedding table, to match the teacher's score of the override, so that row stops
drawing the class -- but every other point of the embedding space keeps whatever the distillation left
there. `sfd attack`'s continuous attack (a free class embedding, optimised through the one-step generator
and the judge) finds such points from the rows of other classes: on digits forget 3 it reaches a 3 as
often on the forgetting generator as on a generator distilled without forgetting (docs/robustness.md).

What this adds, per rank and per iteration, after the generator's own backward pass:

1. *The attack, kept running.* A pool of ``adv_pool`` free embeddings, each started at the generator's
   own row of a remaining class with its own latent ``z`` (the start `sfd attack` uses), takes
   ``adv_steps`` Adam steps (learning rate ``adv_lr``, the attack's) up the judge's log-probability of a
   forgotten class on ``G(z, e)``. An entry restarts after ``adv_lifetime`` iterations (ages staggered,
   so a few restart each iteration): with 2 steps x 15 iterations an entry gets the attack's 30 steps.
2. *The fix, only where the attack won.* For each entry whose sample the judge now reads as the
   forgotten class, the generator at that embedding is pulled towards what the EMA generator draws for
   the override at the same ``z`` (stop-gradient): ``lambda_adv * sum_pixels (G(z, e) - EMA(z, c_o))^2``,
   averaged over the pool. An entry the attack has not (yet) turned is left alone, so an embedding at a
   remaining class's row is never pushed to the override.

The gradient is added to the generator step's (one optimiser step per iteration; under DDP the pass runs
through the DDP wrapper, so every rank's share is averaged). The attack itself touches no parameter
gradient and runs with the generator in eval mode (no dropout). The override of an entry: the fixed
override of its forgotten class; for 'random', the latent-tied class of its ``z`` (or a uniform
remaining class); for 'classifier', its start class.

This is a named deviation from the reference (SFD.md has no such term), off by default.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .onestep import one_step
from .robustness import class_table


class EmbeddingAdversary:
    """The pool of free class embeddings and its two steps (see the module's text)."""

    def __init__(self, st):
        cfg = st.cfg
        self.n = int(cfg.adv_pool)
        self.steps, self.lr, self.lifetime, self.weight = int(cfg.adv_steps), float(cfg.adv_lr), \
            int(cfg.adv_lifetime), float(cfg.lambda_adv)
        tg = st.targets
        if not hasattr(tg, "remain") or not getattr(tg, "forget", None):
            raise ValueError("adv_pool (--adv-pool) is for class presets (digits, cifar10, stl10): a text preset's "
                             "condition is a prompt — drop it")
        if st.judge is None:
            raise ValueError("adv_pool (--adv-pool) needs the run's judge (the classifier) to find the embeddings "
                             "that draw a forgotten class — give --classifier, or drop --adv-pool")
        self.table = class_table(st.generator)
        self.device = st.device
        self.shape = tuple(st.teacher.img_shape)
        self.rng = torch.Generator().manual_seed(int(cfg.seed) * 1009 + 7919 * (st.dist.rank + 1))
        dim = self.table.embedding_dim
        self.emb = torch.zeros(self.n, dim, device=self.device)
        self.z = torch.zeros(self.n, *self.shape, device=self.device)
        self.forget = torch.zeros(self.n, dtype=torch.long, device=self.device)
        self.override = torch.zeros(self.n, dtype=torch.long, device=self.device)
        self.m = torch.zeros_like(self.emb)
        self.v = torch.zeros_like(self.emb)
        self.t = torch.zeros(self.n, device=self.device)
        self.age = torch.arange(self.n) % self.lifetime          # staggered: a few restart per iteration
        self.won = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        self._restart(torch.ones(self.n, dtype=torch.bool), st)
        self._sums, self._count = {"adv_won": 0.0, "adv_loss": 0.0}, 0

    # -- state (checkpoints: an exact resume continues the same pool) ------------------------------------------
    def state_dict(self) -> dict:
        return {"emb": self.emb.cpu(), "z": self.z.cpu(), "forget": self.forget.cpu(), "override": self.override.cpu(),
                "m": self.m.cpu(), "v": self.v.cpu(), "t": self.t.cpu(), "age": self.age.clone(),
                "won": self.won.cpu(), "rng": self.rng.get_state()}

    def load_state_dict(self, sd: dict) -> None:
        if sd["emb"].shape != self.emb.shape:
            raise ValueError(f"the checkpoint's adversarial pool holds {sd['emb'].shape[0]} embeddings, this run "
                             f"asks for {self.n} (adv_pool) — resume with the run's own --adv-pool")
        for k in ("emb", "z", "forget", "override", "m", "v", "t", "won"):
            getattr(self, k).copy_(sd[k].to(self.device))
        self.age = sd["age"].clone()
        self.rng.set_state(sd["rng"])

    def take_stats(self) -> dict:
        """This rank's means since the last call: the share of the pool the attack had turned (``adv_won``)
        and the fix's loss (``adv_loss``)."""
        out = {k: v / max(self._count, 1) for k, v in self._sums.items()} if self._count else {}
        self._sums, self._count = {k: 0.0 for k in self._sums}, 0
        return out

    # -- the attack ---------------------------------------------------------------------------------------------
    def _restart(self, which: torch.Tensor, st) -> None:
        idx = which.nonzero().flatten()
        if len(idx) == 0:
            return
        tg, k = st.targets, len(idx)
        remain = torch.tensor(tg.remain)
        start = remain[torch.randint(0, len(remain), (k,), generator=self.rng)]
        fpick = torch.randint(0, len(tg.forget), (k,), generator=self.rng)
        z = torch.randn((k, *self.shape), generator=self.rng)
        if tg.policy == "fixed":
            over = torch.tensor(tg.override)[fpick]
        elif tg.policy == "random":
            over = tg.latent_override(z) if tg.latent_draw else \
                remain[torch.randint(0, len(remain), (k,), generator=self.rng)]
        else:                                                     # classifier: the class it started from
            over = start
        dev = self.device
        self.emb[idx.to(dev)] = self.table.weight.detach()[start.to(dev)].float()
        self.z[idx.to(dev)] = z.to(dev)
        self.forget[idx.to(dev)] = torch.tensor(tg.forget)[fpick].to(dev)
        self.override[idx.to(dev)] = over.to(dev)
        for buf in (self.m, self.v):
            buf[idx.to(dev)] = 0.0
        self.t[idx.to(dev)] = 0.0
        self.age[idx] = 0
        self.won[idx.to(dev)] = False

    @contextlib.contextmanager
    def _rows(self, emb: torch.Tensor, last: int):
        """The class table's output for the last ``last`` rows of a batch replaced by ``emb`` (the table's
        weight stays in the graph with a zero factor, so a DDP pass sees every parameter used)."""

        def hook(_m, _i, out):
            head, tail = out[:-last], out[-last:]
            return torch.cat([head, emb.to(out.dtype) + 0.0 * tail])

        h = self.table.register_forward_hook(hook)
        try:
            yield
        finally:
            h.remove()

    def _sample(self, net, emb, st, labels=None):
        labels = self.override if labels is None else labels
        with self._rows(emb, self.n), st.autocast():
            return st.full(one_step(net, self.z, labels, st.sigma_init))

    def attack(self, st) -> None:
        """``adv_steps`` Adam steps of every entry up log p(forgotten class | G(z, e)); who won is kept."""
        gen = st.generator
        was = gen.training
        gen.eval()
        b1, b2, eps = 0.9, 0.999, 1e-8
        try:
            for _ in range(self.steps):
                e = self.emb.clone().requires_grad_(True)
                x = self._sample(gen, e, st)
                logp = F.log_softmax(st.judge(x.clamp(-1, 1)).float(), dim=1)
                self.won = logp.argmax(1) == self.forget
                obj = logp.gather(1, self.forget[:, None]).sum()
                (g,) = torch.autograd.grad(obj, e)
                with torch.no_grad():
                    self.t += 1
                    self.m.mul_(b1).add_((1 - b1) * g)
                    self.v.mul_(b2).add_((1 - b2) * g * g)
                    mh = self.m / (1 - b1 ** self.t)[:, None]
                    vh = self.v / (1 - b2 ** self.t)[:, None]
                    self.emb += self.lr * mh / (vh.sqrt() + eps)      # ascent
        finally:
            gen.train(was)

    # -- the fix ------------------------------------------------------------------------------------------------
    def backward(self, st) -> None:
        """Add the pull of the won entries towards the override to the generator's gradients (accumulated
        on top of its SFD backward pass), then age the pool."""
        with torch.no_grad(), st.autocast():
            target = st.full(one_step(st.generator_ema, self.z, self.override, st.sigma_init))
        gen = st.generator
        was = gen.training
        gen.eval()
        try:
            x = self._sample(st.gen_train, self.emb.detach(), st, labels=self.forget)
        finally:
            gen.train(was)
        w = self.won.float()
        per = (x - target).square().flatten(1).sum(dim=1)
        loss = self.weight * (w * per).sum() / self.n * st.dist.world_size
        scaler = st.scalers.get("generator")
        (scaler.scale(loss) if scaler else loss).backward()
        self._sums["adv_won"] += float(w.mean())
        self._sums["adv_loss"] += float(loss.detach()) / st.dist.world_size
        self._count += 1
        self.age += 1
        self._restart(self.age >= self.lifetime, st)
