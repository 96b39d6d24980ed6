"""One SFD iteration (SFD.md section 4), the one function the loop, `sfd bench` and the tests run.

:func:`build_state` turns a teacher and an :class:`~sfd.config.SFDConfig` into the trained
networks, optimisers and RNG of a run; :func:`sfd_iteration` advances it by one alternating
fake-score / generator update.

Data parallelism. Every rank draws the *global* batch's random numbers (labels, z, sigma,
noise, dropout seeds) from the same seeded generator and keeps its slice, so N workers see
exactly the samples one worker sees. The two trained networks are wrapped in PyTorch's
DistributedDataParallel for the passes that train them -- the fake score in its denoising
step, the generator in its forward with gradient -- while the frozen passes (the generator's
samples for the fake-score step, the fake score's y_fake in the generator step) call the
plain module, as SiD does. DDP rather than a hand-written all-reduce: it buckets gradients and
overlaps their reduction with the backward pass instead of copying every gradient into one
flat fp32 buffer after it, and it raises instead of silently skipping a parameter that got no
gradient. (Parameters the denoiser never uses -- e.g. EDM's augmentation mapping when no
augmentation labels are passed -- are found by one probe pass before wrapping, frozen and
named in a note; nothing drops out of the reduction unannounced.) DDP averages gradients
over ranks, so each rank's loss is its local sum times world_size over the global batch:
the average is the global mean, the step one worker takes.

Reference details (SFD.md section 11): the generator's samples for the fake-score step and
the fake score's y_fake are computed in eval mode; dropout in the two training passes draws
global-batch masks from the checkpointed RNG (sfd.dropout); the fake-score loss sums over
pixels; a discrete teacher's sigma_init is snapped to its grid (t = 440 -> 2.502326).

Precision: ``bf16`` / ``fp16`` autocast the network passes; weights, optimiser states and the
losses stay fp32, and fp16 adds a gradient scaler per network.

Named additions for Stable Diffusion (all off unless set): separate CFG scales for the teacher, the
fake score's training and its evaluation (``guidance_teacher`` / ``guidance_fake_train`` /
``guidance_fake_eval``, SiD-LSG); a negative-prompt branch for the teacher (``targets.teacher_null``,
nudity); and ``lora_rank`` > 0, where fake score and generator are LoRA adapters on the teacher's
own UNet (sfd.denoisers.lora) instead of two full copies.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .config import SFDConfig
from .denoisers import Denoiser, Guided
from .denoisers.lora import add_lora
from .distributed import Dist
from .dropout import install_batch_dropout, masks_for
from .evaluate.forgetting import cache_dir, teacher_fingerprint
from .io import load_tensors, save_tensors
from .losses import anchor_loss, fake_score_loss, generator_loss
from .onestep import DTYPES, one_step, resolve_precision
from .samplers import sample_heun, sample_sigma, teacher_grid
from .tasks import get_task
from .utils import ema_beta, ema_update


class SFDDivergedError(FloatingPointError):
    """A loss became NaN or infinite; earlier checkpoints are left untouched."""


@dataclass
class SFDState:
    """Everything one SFD run trains, on one rank."""
    cfg: SFDConfig
    teacher: Denoiser
    fake_score: Denoiser
    generator: Denoiser
    generator_ema: Denoiser
    opt_fake: torch.optim.Optimizer
    opt_gen: torch.optim.Optimizer
    rng: torch.Generator
    targets: object                      # the task's conditions (sfd.tasks: class ids or a prompt table)
    dist: Dist
    device: torch.device
    sigma_init: float
    judge: object = None
    fake_train: Callable = None          # the fake score's training pass (its DDP wrapper on N ranks)
    gen_train: Callable = None           # the generator's training pass
    scalers: dict = field(default_factory=dict)
    frozen_unused: list = field(default_factory=list)
    precision: str = "fp32"              # cfg.precision with 'auto' resolved for this device
    iteration: int = 0
    anchor: tuple | None = None          # (z, condition, teacher sample) of the anchor term, made on first use

    @property
    def imgs_per_iter(self) -> int:
        return self.cfg.batch_remain + self.cfg.batch_forget

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def full(self, t: torch.Tensor) -> torch.Tensor:
        """A network output back in fp32 for the losses (autocast returns bf16/fp16)."""
        return t if self.precision == "fp32" else t.float()

    def modules(self) -> dict:
        return {"generator": self.generator, "generator_ema": self.generator_ema, "fake_score": self.fake_score}

    def optimizers(self) -> dict:
        return {"generator": self.opt_gen, "fake_score": self.opt_fake}


def _freeze_unused(net: Denoiser, cond: torch.Tensor, sigma: float, guidance: float) -> list[str]:
    """Freeze parameters that get no gradient from D(x, sigma, c); return their names."""
    was_training = net.training
    net.eval()
    x = torch.randn((len(cond), *net.img_shape), device=cond.device)
    Guided(net, guidance)(x, sigma, cond).float().square().sum().backward()
    unused = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    params = dict(net.named_parameters())
    for n in unused:
        params[n].requires_grad_(False)
    net.zero_grad(set_to_none=True)
    net.train(was_training)
    return unused


def build_state(cfg: SFDConfig, teacher: Denoiser, device, dist: Dist | None = None, judge=None,
                init: Callable[[Denoiser, Denoiser], None] | None = None) -> SFDState:
    """Fake score and generator as copies of the frozen teacher, optimisers, RNG, DDP wrappers.

    ``init(generator, fake_score)`` may load other starting weights (two-stage runs) before
    anything is wrapped.
    """
    dist = dist or Dist.current()
    device = torch.device(device)
    teacher = teacher.to(device).eval().requires_grad_(False)
    # class ids, or ids into the run's prompt table (text presets: installed in the teacher before cloning)
    targets = get_task(cfg.preset).targets(cfg, teacher)
    if cfg.lora_rank:                      # two adapters on the one frozen teacher UNet
        fake_score, generator = (v.train() for v in add_lora(teacher, ("fake_score", "generator"), cfg.lora_rank,
                                                                cfg.seed))
    else:
        fake_score = teacher.clone().train()
        generator = teacher.clone().train()
    if init is not None:
        init(generator, fake_score)
    for net in (fake_score, generator):
        install_batch_dropout(net)
        if cfg.grad_checkpointing:
            if not hasattr(net, "set_gradient_checkpointing"):
                raise ValueError(f"grad_checkpointing: the {type(net).__name__} backbone has no gradient "
                                 f"checkpointing; drop --grad-checkpointing (DDPM, EDM and diffusers have it)")
            net.set_gradient_checkpointing(True)
    generator_ema = copy.deepcopy(generator).eval().requires_grad_(False)
    # t_init = 440 on the DDPM grid is sigma 2.502326, not 2.5 (continuous teachers: unchanged)
    sigma_init = float(teacher.round_sigma(torch.tensor(float(cfg.sigma_init))))
    probe = torch.arange(2, device=device) % max(teacher.num_classes, 1)
    frozen = []
    for name, net in (("fake_score", fake_score), ("generator", generator)):
        frozen += [f"{name}.{n}" for n in _freeze_unused(net, probe, sigma_init, cfg.guidance)]
    if frozen and dist.lead:
        print(f"note: {len(frozen)} parameter tensor(s) receive no gradient from D(x, sigma, c) and stay frozen: "
              f"{', '.join(frozen[:6])}{' ...' if len(frozen) > 6 else ''}", flush=True)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    opt_fake = torch.optim.Adam([p for p in fake_score.parameters() if p.requires_grad], lr=cfg.lr_fake,
                                betas=betas, eps=cfg.adam_eps)
    opt_gen = torch.optim.Adam([p for p in generator.parameters() if p.requires_grad], lr=cfg.lr_gen,
                               betas=betas, eps=cfg.adam_eps)
    fake_train, gen_train = fake_score, generator
    if dist.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        fake_train = DDP(fake_score, device_ids=ids, forward_sync_buffers=False)
        gen_train = DDP(generator, device_ids=ids, forward_sync_buffers=False)
    scalers = {}
    precision = resolve_precision(cfg.precision, device)
    if precision == "fp16":
        scalers = {"fake_score": torch.amp.GradScaler(device.type), "generator": torch.amp.GradScaler(device.type)}
    return SFDState(cfg=cfg, teacher=teacher, fake_score=fake_score, generator=generator,
                    generator_ema=generator_ema, opt_fake=opt_fake, opt_gen=opt_gen,
                    rng=torch.Generator().manual_seed(cfg.seed), targets=targets,
                    dist=dist, device=device, sigma_init=sigma_init, judge=judge, fake_train=fake_train,
                    gen_train=gen_train, scalers=scalers, frozen_unused=frozen, precision=precision)


@dataclass
class Batch:
    """This rank's share of one global batch: [remain | forget] rows."""
    c_r: torch.Tensor
    c_f: torch.Tensor
    c_o: torch.Tensor | None
    z: torch.Tensor
    sigma: torch.Tensor
    noise: torch.Tensor
    pick: torch.Tensor          # global row index of each local row
    n_global: int
    dropout_seed: int
    n_remain: int               # local remain rows


def draw_batch(st: SFDState, stage1: bool, sigma_dist: str) -> Batch:
    """Global-batch random draws (identical on every rank), then this rank's slice."""
    cfg, rng, dist, dev = st.cfg, st.rng, st.dist, st.device
    B_r, B_f = cfg.batch_remain, cfg.batch_forget
    c_r = st.targets.sample_remain(B_r, rng, all_classes=stage1)
    c_f, c_o = st.targets.sample_forget(B_f, rng)
    n = B_r + B_f
    shape = tuple(st.teacher.img_shape)
    z = torch.randn((n, *shape), generator=rng)
    sigma = sample_sigma(sigma_dist, n, cfg.sigma_min, cfg.sigma_max, generator=rng)
    noise = torch.randn((n, *shape), generator=rng)
    seed = int(torch.randint(0, 2**62, (1,), generator=rng))
    if st.targets.latent_draw:     # 'random' tied to each forget sample's latent (class targets)
        c_o = st.targets.latent_override(z[B_r:])
    sr, sf = dist.local(B_r), dist.local(B_f)
    pick = torch.cat([torch.arange(B_r)[sr], B_r + torch.arange(B_f)[sf]])
    return Batch(c_r[sr].to(dev), c_f[sf].to(dev), c_o[sf].to(dev) if c_o is not None else None,
                 z[pick].to(dev), sigma[pick].to(dev).reshape(-1, 1, 1, 1), noise[pick].to(dev), pick, n, seed,
                 len(range(*sr.indices(B_r))))


def _branch_loss(st: SFDState, per_sample: torch.Tensor, n_remain: int, lam_r: float, lam_f: float) -> torch.Tensor:
    """This rank's share of the global weighted mean, scaled so DDP's average over ranks is that mean."""
    cfg = st.cfg
    local = lam_r * per_sample[:n_remain].sum() / cfg.batch_remain + lam_f * per_sample[n_remain:].sum() / cfg.batch_forget
    return local * st.dist.world_size


def _backward(st: SFDState, name: str, opt, loss: torch.Tensor) -> None:
    scaler = st.scalers.get(name)
    opt.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler else loss).backward()


def _step(st: SFDState, name: str, net: Denoiser, opt, grads_hook) -> None:
    scaler = st.scalers.get(name)
    if scaler:
        scaler.unscale_(opt)
    if grads_hook is not None:
        grads_hook(name, net)
    if st.cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_value_([p for p in net.parameters() if p.grad is not None], st.cfg.grad_clip)
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


def _global_loss(st: SFDState, loss: torch.Tensor, what: str) -> float:
    """The loss of the whole global batch, identical on every rank; raises if not finite."""
    v = st.dist.sum([float(loss.detach())], st.device)[0] / st.dist.world_size
    if not math.isfinite(v):
        raise SFDDivergedError(
            f"{what} loss is {v} in iteration {st.iteration + 1}: the run diverged. Lower the learning rates "
            f"(lr_fake, lr_gen) or the forget weights; earlier checkpoints are intact and --resume restarts "
            f"from the last one.")
    return v


ANCHOR_SEED = 4_041_977          # the anchor bank's noise: fixed, so a resumed run and every rank draw the same


def anchor_bank(st: SFDState, batch: int = 500) -> tuple:
    """The anchor term's pairs, drawn once per run (the same on every rank and after a resume): per anchor
    prompt, ``anchor_per_prompt`` standard normal z and the teacher's 18-step Heun sample from sigma_max * z
    for the prompt's teacher prompt (itself, or a forgotten concept's override), less the samples the run's
    judge reads as a forgotten concept."""
    if st.anchor is None:
        if st.judge is None:
            raise ValueError("lambda_anchor: the anchor term leaves out the teacher's samples that show a forgotten "
                             "concept, which takes the run's judge — pass judge= to build_state")
        per = st.cfg.anchor_per_prompt
        ids = torch.as_tensor(st.targets.anchor_ids, dtype=torch.long).repeat_interleave(per)
        asked = torch.as_tensor(st.targets.anchor_teacher_ids, dtype=torch.long).repeat_interleave(per)
        g = torch.Generator().manual_seed(ANCHOR_SEED + st.cfg.seed)
        z = torch.randn((len(ids), *st.teacher.img_shape), generator=g)
        # the teacher's samples are cached: keyed by its fingerprint (with the run's prompt table) and the draw
        key = hashlib.sha256(json.dumps([asked.tolist(), ANCHOR_SEED + st.cfg.seed]).encode()).hexdigest()[:16]
        path = cache_dir() / f"anchor-{teacher_fingerprint(st.teacher)}-{key}.safetensors"
        if path.is_file():
            x = load_tensors(path)[0]["x"]
        else:
            sig = teacher_grid(st.teacher, 18, st.device)
            x = torch.cat([sample_heun(st.teacher, z[i:i + batch].to(st.device) * float(sig[0]), sig,
                                       asked[i:i + batch].to(st.device)).cpu() for i in range(0, len(ids), batch)])
            save_tensors(path, {"x": x})
        keep = st.targets.anchor_keep(st.judge, x)
        st.anchor = (z[keep], ids[keep], x[keep])
    return st.anchor


def _anchor_step(st: SFDState, loss_hook=None) -> float:
    """The anchor term's backward pass, its gradients added to the generator step's; returns its global loss."""
    z, ids, x_t = anchor_bank(st)
    n = st.cfg.anchor_batch
    rows = torch.randint(0, len(ids), (n,), generator=st.rng)
    seed = int(torch.randint(0, 2**62, (1,), generator=st.rng))
    part = st.dist.local(n)
    pick = torch.arange(n)[part]
    with masks_for(pick, n, seed):
        with st.autocast():
            x_g = one_step(st.gen_train, z[rows[part]].to(st.device), ids[rows[part]].to(st.device), st.sigma_init)
        per = anchor_loss(st.full(x_g), x_t[rows[part]].to(st.device))
        loss = st.cfg.lambda_anchor * per.sum() / n * st.dist.world_size
        if loss_hook is not None:
            loss = loss_hook("anchor", loss)
        scaler = st.scalers.get("generator")
        (scaler.scale(loss) if scaler else loss).backward()
    return _global_loss(st, loss, "anchor")


def sfd_iteration(st: SFDState, stage1: bool = False, grads_hook=None, loss_hook=None) -> tuple[float, float]:
    """One alternating update; returns the global (fake-score, generator) losses.

    ``grads_hook(name, net)`` sees each network's synchronised gradients before clipping and
    the optimiser step; ``loss_hook(name, loss) -> loss`` may change a rank's loss ('fake_score',
    'generator', 'anchor') before its backward pass (the tests use both).
    """
    cfg = st.cfg
    f = lr_factor(cfg, st.iteration)
    for opt, lr in ((st.opt_fake, cfg.lr_fake), (st.opt_gen, cfg.lr_gen)):
        for group in opt.param_groups:
            group["lr"] = lr * f
    lam_ff = 0.0 if stage1 else cfg.lambda_fake_forget
    lam_gf = 0.0 if stage1 else cfg.lambda_gen_forget
    fake_dist = cfg.sigma_dist if cfg.sigma_dist_fake == "same" else cfg.sigma_dist_fake

    # (a) fake-score step: denoising score matching on detached generator samples (eval mode)
    b = draw_batch(st, stage1, fake_dist)
    labels = torch.cat([b.c_r, b.c_f])
    st.generator.eval()
    with torch.no_grad(), st.autocast():
        x_g = st.full(one_step(st.generator, b.z, labels, st.sigma_init))
    st.fake_score.train()
    with masks_for(b.pick, b.n_global, b.dropout_seed):
        with st.autocast():
            d_fake = Guided(st.fake_score, cfg.guidance_of("fake_train"), call=st.fake_train)(
                x_g + b.sigma * b.noise, b.sigma, labels)
        per = fake_score_loss(st.full(d_fake), x_g, st.fake_score.loss_weight(b.sigma), cfg.fake_score_reduction)
        loss_fake = _branch_loss(st, per, b.n_remain, cfg.lambda_fake_remain, lam_ff)
        if loss_hook is not None:
            loss_fake = loss_hook("fake_score", loss_fake)
        _backward(st, "fake_score", st.opt_fake, loss_fake)
    loss_fake_all = _global_loss(st, loss_fake, "fake-score")
    _step(st, "fake_score", st.fake_score, st.opt_fake, grads_hook)

    # (b) generator step: teacher and fake score frozen as parameters (plain modules, eval
    # mode); gradients reach x_g through their inputs. The forget branch asks the teacher
    # about the override.
    b = draw_batch(st, stage1, cfg.sigma_dist)
    labels = torch.cat([b.c_r, b.c_f])
    st.fake_score.eval()
    trainable = [p for p in st.opt_fake.param_groups[0]["params"]]
    for p in trainable:
        p.requires_grad_(False)
    st.generator.train()
    try:
        with masks_for(b.pick, b.n_global, b.dropout_seed):
            with st.autocast():
                x_g = one_step(st.gen_train, b.z, labels, st.sigma_init)
            x_g = st.full(x_g)
            x = x_g + b.sigma * b.noise
            with st.autocast():
                y_fake = st.full(Guided(st.fake_score, cfg.guidance_of("fake_eval"))(x, b.sigma, labels))
            c_o = b.c_o
            if c_o is None:                                   # classifier pseudo-label policy
                c_o = st.targets.classifier_override(st.judge, y_fake[b.n_remain:].detach())
            with st.autocast():
                y_real = st.full(Guided(st.teacher, cfg.guidance_of("teacher"), null=st.targets.teacher_null)(
                    x, b.sigma, torch.cat([b.c_r, c_o])))
            per = generator_loss(y_real, y_fake, x_g, cfg.alpha)
            loss_gen = _branch_loss(st, per, b.n_remain, cfg.lambda_gen_remain, lam_gf)
            if loss_hook is not None:
                loss_gen = loss_hook("generator", loss_gen)
            _backward(st, "generator", st.opt_gen, loss_gen)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    loss_gen_all = _global_loss(st, loss_gen, "generator")
    if cfg.lambda_anchor > 0 and not stage1:
        loss_gen_all += _anchor_step(st, loss_hook)
    _step(st, "generator", st.generator, st.opt_gen, grads_hook)

    st.iteration += 1
    ema_update(st.generator_ema, st.generator, current_ema_beta(cfg, st.iteration))
    return loss_fake_all, loss_gen_all


def total_iterations(cfg: SFDConfig) -> int:
    """Iterations of the whole budget (rounded first: 9 x 0.016 kimg is 9 iterations, not 10)."""
    return math.ceil(round(cfg.budget_kimg * 1000 / (cfg.batch_remain + cfg.batch_forget), 6))


def lr_factor(cfg: SFDConfig, iteration: int) -> float:
    """Multiplier of both learning rates before iteration ``iteration + 1``: 1 for ``constant``
    (the reference); for ``cosine`` a half cosine from 1 to ``lr_final_ratio`` over the budget."""
    if cfg.lr_schedule == "constant":
        return 1.0
    frac = min(1.0, iteration / max(1, total_iterations(cfg)))
    return cfg.lr_final_ratio + (1.0 - cfg.lr_final_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))


def current_ema_beta(cfg: SFDConfig, iteration: int) -> float:
    """Decay of the generator EMA after ``iteration`` iterations.

    ``ema_beta`` > 0: that constant from step 0 (the DDPM reference's 0.9999). Otherwise a
    half-life in kimg, capped during ramp-up at ``ema_rampup_ratio`` times the kimg trained so
    far (EDM/SiD use 0.05), so a short run's EMA does not stay stuck near the initial weights.
    A half-life of 0 disables the EMA (beta 0: the EMA is the generator).
    """
    if cfg.ema_beta > 0:
        return float(cfg.ema_beta)
    imgs = cfg.batch_remain + cfg.batch_forget
    halflife = cfg.ema_halflife_kimg
    if cfg.ema_rampup_ratio > 0:
        halflife = min(halflife, iteration * imgs / 1000 * cfg.ema_rampup_ratio)
    return ema_beta(imgs, halflife)
