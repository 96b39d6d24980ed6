"""The baselines' losses against their authors' public code, on one small DDPM (docs/baselines.md).

Usage (the three repositories checked out anywhere; nothing of theirs is copied into sfd):

    python tests/parity_baselines.py --esd ERASING_CHECKOUT --sa SELECTIVE_AMNESIA_CHECKOUT \\
        --salun UNLEARN_SALIENCY_CHECKOUT [--only esd|sa|salun] [--break esd|sa|salun]

The reference side *runs the authors' code*: Selective Amnesia's ``Conditional_Model`` (the network,
needs ``einops``) and ``noise_estimation_loss_conditional`` are imported from the checkouts, and the
statements of their training loops that compute a loss, a Fisher diagonal or a saliency mask are read
from their files at run time (located by the text they start and end with) and executed on our
tensors. The sfd side is sfd.methods on :class:`sfd.denoisers.ddpm.VPDenoiser` holding the same
weights. Both see the same images, labels, timesteps and noise; the script prints the largest
absolute and relative error of every value and gradient, and exits 1 when one exceeds float32
rounding (relative 1e-4). ``--break M`` perturbs sfd's loss of method M on purpose (a negative
control: the script must then fail).

ESD's loss statement is read from ``train-scripts/train-esd.py`` of commit b8aeab6 (the paper's
code: target e_0 - eta (e_p - e_0) with e_0 the null prediction); the repository's later
``esd_sd.py`` anchors on the concept's own prediction instead (a difference sfd names, not follows).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sfd.denoisers.ddpm import ConditionalDDPMUNet, VPDenoiser, linear_beta_sigmas  # noqa: E402
from sfd.io import load_state_strict  # noqa: E402
from sfd.methods.esd import esd_loss  # noqa: E402
from sfd.methods.sa import ewc_penalty, fisher_diagonal, sa_loss  # noqa: E402
from sfd.methods.salun import MASK_GUIDANCE, saliency_mask, saliency_scores, salun_loss  # noqa: E402

TOL = 1e-4                        # relative, float32 rounding of sums over a few thousand terms
T = 1000
# ch must be 128: the reference's ResnetBlock leaves cemb_channels at its default 512 (= 4 x 128)
CFG = dict(resolution=8, in_channels=1, out_channels=1, ch=128, ch_mult=[1, 1], num_res_blocks=1,
           attn_resolutions=[4], dropout=0.0, num_classes=10, resamp_with_conv=True)


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def statements(source: str, first: str, last: str, after: str = "") -> str:
    """The lines of ``source`` from the one containing ``first`` (after the line containing ``after``)
    through the next containing ``last``, dedented: the authors' statements, executed as they are."""
    lines = source.splitlines()
    start = next(i for i, s in enumerate(lines) if after in s)
    a = next(i for i in range(start, len(lines)) if first in lines[i])
    b = next(i for i in range(a, len(lines)) if last in lines[i])
    return textwrap.dedent("\n".join(lines[a:b + 1]))


class Queue:
    """Stands in for ``torch`` in an executed snippet: randn_like / randint return given tensors in turn."""

    def __init__(self, randn=(), randint=()):
        self._randn, self._randint = list(randn), list(randint)

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn_like(self, x):
        return self._randn.pop(0).clone()

    def randint(self, *a, **k):
        return self._randint.pop(0).clone()


def keep_conditions(shape, prob, device):
    """The references' ``prob_mask_like`` with their random condition dropout off: the Fisher's loss
    (``save_fim``) and SalUn's retain loss drop 10 % of the labels at random; sfd's fine-tuning drops
    none (a named difference). ``prob`` 0 (the null branch of guidance) still drops every label."""
    return torch.full(shape, prob > 0, dtype=torch.bool, device=device)


def errors(name: str, ours, ref, report: list) -> None:
    ours, ref = torch.as_tensor(ours).double(), torch.as_tensor(ref).double()
    abs_err = float((ours - ref).abs().max())
    rel = abs_err / max(float(ref.abs().max()), 1e-30)
    report.append((name, abs_err, rel))


def grads(loss, params):
    """d loss / d params, flattened (zeros for a parameter the loss does not use, e.g. the null embedding)."""
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(gs, params)])


def build(args):
    sa_root = Path(args.sa) / "ddpm"
    sys.path.insert(0, str(sa_root))
    ref_models = load_module(sa_root / "models" / "diffusion.py", "ref_sa_models")
    ref_models.prob_mask_like = keep_conditions
    ref_losses = load_module(sa_root / "functions" / "losses.py", "ref_sa_losses")
    config = types.SimpleNamespace(
        model=types.SimpleNamespace(ch=CFG["ch"], out_ch=1, ch_mult=CFG["ch_mult"], num_res_blocks=1,
                                    attn_resolutions=CFG["attn_resolutions"], dropout=0.0, in_channels=1,
                                    resamp_with_conv=True, cond_drop_prob=0.0, type="simple"),
        data=types.SimpleNamespace(image_size=8, n_classes=10),
        diffusion=types.SimpleNamespace(num_diffusion_timesteps=T),
        training=types.SimpleNamespace(gamma=0.7, lmbda=3.0))
    torch.manual_seed(0)
    ref_teacher = ref_models.Conditional_Model(config).eval()
    ref_student = ref_models.Conditional_Model(config).eval()
    ref_student.load_state_dict(ref_teacher.state_dict())
    with torch.no_grad():                 # a fine-tuned model differs from its teacher
        for p in ref_student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = {}
    for name, ref in (("teacher", ref_teacher), ("student", ref_student)):
        d = VPDenoiser(ConditionalDDPMUNet(**CFG)).eval()
        load_state_strict(d.model, ref.state_dict(), name)
        ours[name] = d
    betas, _, _ = linear_beta_sigmas(1e-4, 0.02, T)
    return config, ref_models, ref_losses, ref_teacher, ref_student, ours, betas.float()


def to_sigma_space(x_t, t, betas):
    """x = x_t sqrt(1 + sigma^2) and sigma(t): the same point in sfd's sigma-space."""
    abar = (1 - betas).cumprod(0)[t].view(-1, 1, 1, 1)
    sigma = ((1 - abar) / abar).sqrt()
    return x_t / abar.sqrt(), sigma.flatten()


def check_esd(args, setup, broken: bool, report: list) -> None:
    config, _, _, ref_teacher, ref_student, ours, betas = setup
    src = subprocess.run(["git", "-C", args.esd, "show", "b8aeab6:train-scripts/train-esd.py"], check=True,
                         capture_output=True, text=True).stdout
    code = statements(src, "loss = criteria(e_n.to(devices[0])", "loss = criteria(e_n.to(devices[0])")
    g = torch.Generator().manual_seed(1)
    B, eta = 6, 1.7
    t = torch.randint(0, T, (B,), generator=g)
    c = torch.full((B,), 3)
    x, sigma = torch.randn(B, 1, 8, 8, generator=g) * 3, None
    abar = (1 - betas).cumprod(0)[t].view(-1, 1, 1, 1)
    x_t = x * abar.sqrt()                              # the reference's z (x_t), ours x = x_t / sqrt(abar)
    x, sigma = to_sigma_space(x_t, t, betas)
    with torch.no_grad():
        e_0 = ref_teacher._forward(x_t, t.float(), c, cond_drop_prob=1.0)
        e_p = ref_teacher._forward(x_t, t.float(), c, cond_drop_prob=0.0)
    e_n = ref_student._forward(x_t, t.float(), c, cond_drop_prob=0.0)
    ns = {"criteria": torch.nn.MSELoss(), "e_n": e_n, "e_0": e_0, "e_p": e_p, "negative_guidance": eta,
          "devices": ["cpu", "cpu"]}
    exec(code, ns)
    ref_loss = ns["loss"]
    student = ours["student"]
    mine = esd_loss(student, ours["teacher"], x, sigma, c, eta * (1.01 if broken else 1.0),
                    student.loss_weight(sigma)).mean()
    errors("esd loss", mine.detach(), ref_loss.detach(), report)
    errors("esd d loss / d theta", grads(mine, list(student.parameters())),
           grads(ref_loss, list(ref_student.parameters())), report)


def check_sa(args, setup, broken: bool, report: list) -> None:
    config, ref_models, ref_losses, ref_teacher, ref_student, ours, betas = setup
    src = (Path(args.sa) / "ddpm" / "runners" / "diffusion.py").read_text()
    fim_code = statements(src, "b = self.betas", "fisher_dict_temp_list[i][name] = fisher_dict_temp_list",
                          after="def save_fim")
    step_code = statements(src, "loss = loss_registry_conditional[config.model.type](model, x_forget",
                           "ewc_loss += config.training.lmbda * _loss.sum()", after="def train_forget")
    g = torch.Generator().manual_seed(2)
    # Fisher: 4 teacher "samples" in 2 batches of bs = 2 (one per GPU in the reference), all 1000 steps in 10 chunks
    N, bs, chunks = 4, 2, 10
    xs, cs = torch.rand(N, 1, 8, 8, generator=g) * 2 - 1, torch.tensor([1, 3, 5, 3])
    noise = torch.randn(N, T, 1, 8, 8, generator=g)
    fisher_ref = {k: torch.zeros_like(p) for k, p in ref_teacher.named_parameters()}
    for b0 in range(0, N, bs):
        temp = [{k: torch.zeros_like(p) for k, p in ref_teacher.named_parameters()} for _ in range(bs)]
        per_t = [noise[b0:b0 + bs, t] for t in range(T)]
        ns = {"self": types.SimpleNamespace(betas=betas, num_timesteps=T, device="cpu"),
              "args": types.SimpleNamespace(n_chunks=chunks), "torch": Queue(randn=per_t),
              "loss_registry_conditional": ref_losses.loss_registry_conditional, "config": config,
              "model": ref_teacher, "x": xs[b0:b0 + bs], "c": cs[b0:b0 + bs], "bs": bs,
              "fisher_dict": fisher_ref, "fisher_dict_temp_list": temp,
              "fim_loader": types.SimpleNamespace(dataset=range(N))}
        # the per-sample gradients summed over all chunks, squared and averaged (the reference's loop body)
        exec(fim_code, ns)
    teacher = ours["teacher"]
    mine = fisher_diagonal(teacher, xs, cs, teacher.sigmas, teacher.loss_weight, g, noise=noise)
    errors("sa Fisher diagonal", torch.cat([mine[f"model.{k}"].flatten() for k in fisher_ref]),
           torch.cat([v.flatten() for v in fisher_ref.values()]), report)

    # one step's loss: surrogate + gamma replay + lambda EWC, on the student
    n = 6
    x_forget = (torch.rand(n, 1, 8, 8, generator=g) - 0.5) * 2
    x_remember, c_remember = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.tensor([0, 1, 2, 4, 5, 6])
    c_forget = torch.full((n,), 3)
    e_f, e_r = torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, 1, 8, 8, generator=g)
    t = torch.randint(0, T, (n,), generator=g)
    anchor = {k: p.detach().clone() for k, p in ref_teacher.named_parameters()}
    ns = {"loss_registry_conditional": ref_losses.loss_registry_conditional, "config": config,
          "model": ref_student, "x_forget": x_forget, "t": t, "c_forget": c_forget, "e_forget": e_f, "b": betas,
          "x_remember": x_remember, "c_remember": c_remember, "e_remember": e_r, "fisher_dict": fisher_ref,
          "params_mle_dict": anchor, "self": types.SimpleNamespace(device="cpu")}
    exec(step_code, ns)
    ref_loss = ns["loss"]
    student = ours["student"]
    sigma = teacher.sigmas[t]
    lam = config.training.lmbda * (1.01 if broken else 1.0)
    mine_loss = sa_loss(student, x_forget, c_forget, x_remember, c_remember, sigma, e_f, e_r,
                        student.loss_weight(sigma), {f"model.{k}": v for k, v in fisher_ref.items()},
                        {f"model.{k}": v for k, v in anchor.items()}, config.training.gamma, lam)
    errors("sa step loss", mine_loss.detach(), ref_loss.detach(), report)
    errors("sa EWC term", lam * ewc_penalty(student, {f"model.{k}": v for k, v in fisher_ref.items()},
                                            {f"model.{k}": v for k, v in anchor.items()}).detach(),
           torch.as_tensor(ns["ewc_loss"]).detach(), report)
    errors("sa d loss / d theta", grads(mine_loss, list(student.parameters())),
           grads(ref_loss, list(ref_student.parameters())), report)


def check_salun(args, setup, broken: bool, report: list) -> None:
    config, ref_models, ref_losses, ref_teacher, ref_student, ours, betas = setup
    src = (Path(args.salun) / "DDPM" / "runners" / "diffusion.py").read_text()
    mask_batch = statements(src, "n = x.size(0)", "gradients[name] += gradient", after="def generate_mask")
    mask_rank = statements(src, "for name in gradients:", "start_index += num_elements", after="def generate_mask")
    forget_code = statements(src, "a = (1 - b).cumprod(dim=0).index_select(0, t).view(-1, 1, 1, 1)",
                             "forget_loss = criteria(pseudo, output)", after="def saliency_unlearn")
    sal = load_module(Path(args.salun) / "DDPM" / "models" / "diffusion.py", "ref_salun_models")
    sal.prob_mask_like = keep_conditions
    sal_losses = load_module(Path(args.salun) / "DDPM" / "functions" / "losses.py", "ref_salun_losses")
    ref = sal.Conditional_Model(config)
    ref.load_state_dict(ref_student.state_dict())
    ref.eval()
    g = torch.Generator().manual_seed(3)
    # saliency: 3 batches of forget images (class 3), the guided loss at --cond_scale 2, each batch's gradient clipped
    batches = [(torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.full((4,), 3), torch.randint(0, T, (3,), generator=g),
                torch.randn(4, 1, 8, 8, generator=g)) for _ in range(3)]
    gradients = {name: 0 for name, _ in ref.named_parameters()}
    for x, c, t_half, e in batches:
        ns = {"x": x, "forget_c": c, "self": types.SimpleNamespace(betas=betas, num_timesteps=T, device="cpu",
                                                                   config=types.SimpleNamespace()),
              "data_transform": lambda cfg, v: v, "torch": Queue(randn=[e], randint=[t_half]), "model": ref,
              "args": types.SimpleNamespace(cond_scale=MASK_GUIDANCE), "config": types.SimpleNamespace(
                  optim=types.SimpleNamespace(grad_clip=1.0)),
              "optimizer": torch.optim.SGD(ref.parameters(), lr=0.0), "gradients": gradients}
        exec(mask_batch, ns)
    ns = {"gradients": gradients, "torch": torch, "args": types.SimpleNamespace(label_to_forget=3),
          "os": types.SimpleNamespace(path=os.path, makedirs=lambda *a, **k: None)}
    exec(mask_rank, ns)
    ref_mask = ns["hard_dict"]
    student = ours["student"]
    mine_batches = []
    for x, c, t_half, e in batches:
        t = torch.cat([t_half, T - t_half - 1])[:len(x)]
        _, sigma = to_sigma_space(x, t, betas)
        mine_batches.append((x, c, sigma, e))
    scores = saliency_scores(student, mine_batches, student.loss_weight, g)
    errors("salun saliency |grad|", torch.cat([scores[f"model.{k}"].flatten() for k in gradients]),
           torch.cat([gradients[k].flatten() for k in gradients]), report)
    mask = saliency_mask(scores, 0.5)
    mism = sum(int((mask[f"model.{k}"] != ref_mask[k].to(mask[f"model.{k}"].dtype)).sum()) for k in ref_mask)
    report.append(("salun mask entries that differ", float(mism), float(mism) / sum(v.numel() for v in ref_mask.values())))

    # the 'rl' step: relabel to class 4 (label_to_forget + 1) at noisy forget images + alpha retain
    n, alpha = 6, 0.3
    forget_x, forget_c = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.full((n,), 3)
    remain_x, remain_c = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.tensor([0, 1, 2, 5, 6, 7])
    e_f, e_r = torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, 1, 8, 8, generator=g)
    t = torch.randint(0, T, (n,), generator=g)
    ref.train()
    ns = {"b": betas, "t": t, "forget_x": forget_x, "e": e_f, "model": ref, "forget_c": forget_c,
          "args": types.SimpleNamespace(method="rl", label_to_forget=3), "torch": torch,
          "criteria": torch.nn.MSELoss()}
    exec(forget_code, ns)
    # the retain term through the reference's own loss function (its condition dropout off: keep_conditions)
    remain_loss = sal_losses.loss_registry_conditional["simple"](ref, remain_x, t, remain_c, e_r, betas)
    ref_loss = ns["forget_loss"] + alpha * remain_loss
    sigma = ours["teacher"].sigmas[t]
    a = alpha * (1.01 if broken else 1.0)
    mine = salun_loss(student, forget_x, forget_c, torch.full((n,), 4), remain_x, remain_c, sigma, sigma, e_f, e_r,
                      student.loss_weight, a)
    errors("salun step loss", mine.detach(), ref_loss.detach(), report)
    errors("salun d loss / d theta", grads(mine, list(student.parameters())), grads(ref_loss, list(ref.parameters())),
           report)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--esd", required=True, help="a git checkout of rohitgandikota/erasing (with its history)")
    p.add_argument("--sa", required=True, help="a checkout of clear-nus/selective-amnesia")
    p.add_argument("--salun", required=True, help="a checkout of OPTML-Group/Unlearn-Saliency")
    p.add_argument("--break", dest="broken", choices=("esd", "sa", "salun"), default=None,
                   help="perturb sfd's loss of this method by 1 %% on purpose (the check must then fail)")
    p.add_argument("--only", choices=("esd", "sa", "salun"), action="append", default=None,
                   help="check only these methods (repeatable; default: all three)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    setup = build(args)
    report: list = []
    for name, check in (("esd", check_esd), ("sa", check_sa), ("salun", check_salun)):
        if args.only is None or name in args.only:
            check(args, setup, args.broken == name, report)
    bad = [r for r in report if r[2] > TOL]
    print(f"{'value':36s} {'max abs error':>14s} {'max rel error':>14s}")
    for name, a, r in report:
        print(f"{name:36s} {a:14.3e} {r:14.3e}{'   <-- above ' + str(TOL) if r > TOL else ''}", flush=True)
    print("parity: FAIL" if bad else "parity: OK (every value and gradient equal to float32 rounding)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
