"""The baselines' losses (sfd/methods) against hand computations, each with a negative control, and the
shared fine-tuning loop on the digits preset. Parity with the authors' own code: tests/parity_baselines.py
(run by test_parity_with_reference_code when $SFD_BASELINE_REFS names the three checkouts)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sfd.config import SFDConfig, config_for_preset
from sfd.denoisers.base import Denoiser
from sfd.methods import esd, sa, salun
from sfd.methods.common import denoise_loss, draw_sigma, sampler_nfe

DT = torch.float64


class Affine(Denoiser):
    """D(x, sigma, c) = a[c] x + b[c]: every gradient is a line of algebra. Class 3 is the null class."""
    num_classes = 3
    img_shape = (1, 1, 2)

    def __init__(self, a=(0.5, 0.8, 1.2, 0.9), b=(0.1, -0.2, 0.3, 0.0)):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=DT))
        self.b = torch.nn.Parameter(torch.tensor(b, dtype=DT))

    def forward(self, x, sigma, cond):
        return self.a[cond].view(-1, 1, 1, 1) * x + self.b[cond].view(-1, 1, 1, 1)

    def null_cond(self, cond):
        return torch.full_like(cond, 3)


def _t(rows):
    return torch.tensor(rows, dtype=DT).reshape(len(rows), 1, 1, -1)


X = _t([[1.0, -2.0], [0.5, 3.0]])
SIGMA = torch.tensor([0.5, 2.0], dtype=DT)
W = 1.0 / SIGMA**2


# -- ESD ----------------------------------------------------------------------------------------------
def esd_by_hand(eta):
    """Teacher a = (0.5, 0.8, 1.2, 0.9), b = (0.1, -0.2, 0.3, 0); student class 1: a 0.7, b 0.1; forget class 1.
    target = D*(null) - eta (D*(1) - D*(null)) = 0.9 x - eta (0.8 x - 0.2 - 0.9 x) = (0.9 + 0.1 eta) x + 0.2 eta;
    student D(1) = 0.7 x + 0.1; per-sample loss mean_pixels (D - target)^2 / sigma^2."""
    out = []
    for x, s in ((X[0].flatten().tolist(), 0.5), (X[1].flatten().tolist(), 2.0)):
        err = [(0.7 * v + 0.1) - ((0.9 + 0.1 * eta) * v + 0.2 * eta) for v in x]
        out.append(sum(e * e for e in err) / len(err) / s**2)
    return out


def _esd_error(loss_fn, eta=1.5):
    teacher, student = Affine(), Affine(a=(0.5, 0.7, 1.2, 0.9), b=(0.1, 0.1, 0.3, 0.0))
    got = loss_fn(student, teacher, X, SIGMA, torch.tensor([1, 1]), eta, W)
    return max(abs(g - e) for g, e in zip(got.tolist(), esd_by_hand(eta)))


def test_esd_loss_hand_computed():
    assert _esd_error(esd.esd_loss) < 1e-12


def test_esd_negative_control_anchor_on_the_concept():
    # the later esd_sd.py anchors on the concept's own prediction: D*(c) - eta (D*(c) - D*(null)); not the paper's
    def concept_anchor(student, teacher, x, sigma, c, eta, weight):
        with torch.no_grad():
            d_c, d_n = teacher(x, sigma, c), teacher(x, sigma, teacher.null_cond(c))
        return (weight.view(-1, 1, 1, 1) * (student(x, sigma, c) - (d_c - eta * (d_c - d_n))) ** 2).flatten(1).mean(1)
    assert _esd_error(concept_anchor) > 1e-3


def test_esd_gradient_reaches_only_the_forget_condition():
    teacher, student = Affine(), Affine(a=(0.5, 0.7, 1.2, 0.9), b=(0.1, 0.1, 0.3, 0.0))
    esd.esd_loss(student, teacher, X, SIGMA, torch.tensor([1, 1]), 1.0, W).sum().backward()
    assert teacher.a.grad is None
    assert student.a.grad[1] != 0 and student.a.grad[[0, 2, 3]].abs().sum() == 0


# -- Selective Amnesia ------------------------------------------------------------------------------------
def fisher_by_hand(a, x_rows, cond, sigmas, noise):
    """D = a[c] x + b[c] at x = x0 + sigma n: d/da[c] of w sum_pixels (D - x0)^2 is w sum 2 (D - x0) x;
    summed over the levels, then squared, then averaged over samples (never averaged before squaring)."""
    fa = [0.0] * 4
    for i, (x0, c) in enumerate(zip(x_rows, cond)):
        g = 0.0
        for k, s in enumerate(sigmas):
            xs = [v + s * n for v, n in zip(x0, noise[i][k])]
            b = (0.1, -0.2, 0.3, 0.0)[c]
            g += sum(2 * (a[c] * v + b - v0) * v for v, v0 in zip(xs, x0)) / s**2
        fa[c] += g * g / len(x_rows)
    return fa


def _fisher_error(fisher_fn):
    net = Affine()
    x = _t([[1.0, -2.0], [0.5, 3.0], [0.0, 1.0]])
    cond = torch.tensor([0, 2, 0])
    sigmas = torch.tensor([0.5, 2.0], dtype=DT)
    noise = torch.tensor([[[0.3, -0.1], [1.0, 0.2]], [[-0.5, 0.4], [0.0, 1.0]], [[0.2, 0.2], [-1.0, 0.5]]],
                         dtype=DT).reshape(3, 2, 1, 1, 2)
    got = fisher_fn(net, x, cond, sigmas, lambda s: 1.0 / s**2, torch.Generator(), noise=noise)["a"].tolist()
    want = fisher_by_hand((0.5, 0.8, 1.2, 0.9), x.flatten(1).tolist(), cond.tolist(), [0.5, 2.0],
                          noise.flatten(2).tolist())
    return max(abs(g - w) / max(abs(w), 1e-12) for g, w in zip(got, want))


def test_sa_fisher_hand_computed():
    assert _fisher_error(sa.fisher_diagonal) < 1e-12


def test_sa_fisher_negative_control_batch_gradient_squared():
    # squaring the batch's mean gradient instead of each sample's (the classic empirical-Fisher slip)
    def batch_fisher(net, x, cond, sigmas, weight_fn, gen, noise=None):
        loss = sum(denoise_loss(net, x[i:i + 1].expand(len(sigmas), 1, 1, 2), sigmas, noise[i], cond[i:i + 1].expand(
            len(sigmas)), weight_fn(sigmas)).sum() for i in range(len(x))) / len(x)
        g = torch.autograd.grad(loss, [net.a])[0]
        return {"a": g**2}
    assert _fisher_error(batch_fisher) > 1e-3


def test_sa_loss_hand_computed_and_ewc():
    net = Affine(a=(0.6, 0.8, 1.2, 0.9))
    fisher = {"a": torch.tensor([2.0, 0.0, 1.0, 0.0], dtype=DT), "b": torch.zeros(4, dtype=DT)}
    anchor = {"a": torch.tensor([0.5, 0.8, 1.0, 0.9], dtype=DT), "b": net.b.detach().clone()}
    # EWC by hand: 2 (0.6 - 0.5)^2 + 1 (1.2 - 1.0)^2 = 0.02 + 0.04
    assert float(sa.ewc_penalty(net, fisher, anchor).detach()) == pytest.approx(0.06, rel=1e-12)
    zero = torch.zeros_like(X)
    # forget: class 0 at x0 = X with no noise: D - x0 = -0.4 x0 + 0.1; replay: class 2: 0.2 x0 + 0.3
    f = [sum((-0.4 * v + 0.1) ** 2 for v in r) / s**2 for r, s in zip(X.flatten(1).tolist(), (0.5, 2.0))]
    r = [sum((0.2 * v + 0.3) ** 2 for v in r) / s**2 for r, s in zip(X.flatten(1).tolist(), (0.5, 2.0))]
    got = sa.sa_loss(net, X, torch.tensor([0, 0]), X, torch.tensor([2, 2]), SIGMA, zero, zero, W, fisher, anchor,
                     gamma=0.7, lam=3.0)
    assert float(got) == pytest.approx(sum(f) / 2 + 0.7 * sum(r) / 2 + 3.0 * 0.06, rel=1e-12)


# -- SalUn -----------------------------------------------------------------------------------------------
def test_salun_mask_is_one_ranking_over_all_tensors():
    scores = {"w1": torch.tensor([5.0, 0.1, 3.0]), "w2": torch.tensor([[4.0, 0.2], [0.3, 2.0]])}
    mask = salun.saliency_mask(scores, 0.5)       # 7 weights -> the 3 largest: 5, 4, 3
    assert mask["w1"].tolist() == [1.0, 0.0, 1.0] and mask["w2"].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    # negative control: a per-tensor top half would also keep 2.0 -- not the reference's one threshold
    per_tensor = {k: (v >= v.flatten().kthvalue(v.numel() - v.numel() // 2).values).float() for k, v in scores.items()}
    assert per_tensor["w2"].tolist() != mask["w2"].tolist()


def _relabel_error(loss_fn):
    net = Affine()
    # D(x, 0) = 0.5 x + 0.1, pseudo D(x, 1) = 0.8 x - 0.2 (detached): mean over pixels and batch of (diff)^2 / sigma^2
    want = sum((-0.3 * v + 0.3) ** 2 / s**2 for row, s in zip(X.flatten(1).tolist(), (0.5, 2.0)) for v in row) / 4
    got = loss_fn(net, X, SIGMA, torch.tensor([0, 0]), torch.tensor([1, 1]), W)
    got.backward()
    err = abs(float(got) - want)
    # the pseudo target is detached: only the forget condition's parameters move
    return err + float(net.a.grad[1].abs() + net.b.grad[1].abs())


def test_salun_relabel_loss_hand_computed():
    assert _relabel_error(salun.relabel_loss) < 1e-12


def test_salun_negative_control_target_not_detached():
    def attached(net, x, sigma, c, c_pseudo, weight):
        return (weight.view(-1, 1, 1, 1) * (net(x, sigma, c) - net(x, sigma, c_pseudo)) ** 2).mean()
    assert _relabel_error(attached) > 1e-3


def test_saliency_scores_clip_then_accumulate():
    # one batch: the gradient's norm is clipped to 1 before accumulation, then |.|
    net = Affine()
    x0, c, s, n = X, torch.tensor([0, 2]), SIGMA, torch.zeros_like(X)
    scores = salun.saliency_scores(net, [(x0, c, s, n)], lambda v: 1.0 / v**2, torch.Generator(), guidance=0.0)
    net.zero_grad()
    denoise_loss(net, x0, s, n, c, 1.0 / s**2).mean().backward()
    g = torch.cat([net.a.grad, net.b.grad])
    g = g * min(1.0, 1.0 / (float(g.norm()) + 1e-6))
    assert torch.cat([scores["a"], scores["b"]]).tolist() == pytest.approx(g.abs().tolist(), rel=1e-12)


# -- shared pieces ----------------------------------------------------------------------------------------
def test_draw_sigma_is_antithetic():
    g = torch.Generator().manual_seed(0)
    s = draw_sigma(Affine(), 6, g)            # 4 draws and the mirrors of the first 2 (the references' n // 2 + 1)
    assert (s[:2].log() + 1.2).tolist() == pytest.approx((-(s[4:6].log() + 1.2)).tolist(), abs=1e-6)
    assert sampler_nfe() == 35


def test_method_setting_is_checked():
    with pytest.raises(ValueError, match="method 'foo' must be one of"):
        SFDConfig(method="foo").validate()
    cfg = config_for_preset("digits", method="salun")
    assert (cfg.salun_alpha, cfg.salun_mask_ratio, cfg.lr_finetune) == (0.05, 0.5, 1e-4)


# -- the loop ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def salun_run(tmp_path_factory):
    from sfd.loop import train_sfd
    out = tmp_path_factory.mktemp("salun")
    cfg = config_for_preset("digits", method="salun", forget=[3], override="4", budget_kimg=0.256,
                            batch_remain=32, batch_forget=32, pool_per_condition=8, salun_mask_ratio=0.2,
                            lr_finetune=1e-3, eval_forget_samples=50, eval_remain_per_class=10, device="cpu")
    final = train_sfd(cfg, out, progress=False, measure_speed=False)
    return cfg, out, final


def test_salun_run_trains_only_the_masked_weights(salun_run):
    from sfd.denoisers import load_denoiser
    from sfd.tasks import get_task
    cfg, out, final = salun_run
    assert final["nfe"] == 35 and final["method"] == "salun" and final["iteration"] == 4
    teacher = get_task("digits").load_teacher()
    model = load_denoiser(out / "model.safetensors")
    moved = total = 0
    for (k, p), (_, q) in zip(model.named_parameters(), teacher.named_parameters()):
        moved += int((p != q).sum())
        total += p.numel()
    # a 20 % mask: at most 20 % of the weights (plus ties at the threshold) moved, and some did
    assert 0 < moved <= 0.2 * total + 1


def test_baseline_run_re_evaluates_to_its_own_figures(salun_run):
    from sfd.runs import evaluate_run
    cfg, out, final = salun_run
    m = evaluate_run(out, seed=777, device="cpu")
    assert m["nfe"] == 35
    for k in ("ua", "fd_remaining", "remaining_accuracy"):
        assert m[k] == pytest.approx(final[k], rel=1e-5, abs=1e-6)


def test_sfd_attack_measures_a_baseline_run_through_its_own_model(salun_run, tmp_path):
    """`sfd attack` on a baseline run attacks its fine-tuned teacher through the teacher's sampler at the teacher's
    budget. Controls both ways: a copy of the run whose model *is* the teacher gets exactly the teacher's figures
    (same sampler, noise and budget: a one-step sampler would differ), and the run's own model does not (an attack
    aimed at the teacher would not)."""
    import shutil
    from sfd.denoisers import save_denoiser
    from sfd.io import read_json
    from sfd.robustness import Budget
    from sfd.runs import attack_run
    from sfd.tasks import get_task
    cfg, out, final = salun_run
    budget = Budget(steps=2, seeds=2, starts=2, teacher_steps=3, per_prompt=1, min_cell=2)
    twin = tmp_path / "teacher_as_model"
    shutil.copytree(out, twin)
    save_denoiser(twin / "model.safetensors", get_task("digits").load_teacher(),
                  {"baseline": {"method": "salun", "preset": "digits", "forget": [3], "override": "4", "steps": 18}})
    same = attack_run(twin, budget=budget, device="cpu")
    c = same["attacks"]["continuous"]
    assert same["method"] == "salun" and "3-step Heun" in same["generator_sampler"] and c["nfe_per_step"] == 5
    assert (c["asr"], c["confidence"]) == (c["asr_teacher"], c["confidence_teacher"])
    assert same["residue_worst_family"] == same["residue_worst_family_teacher"]
    assert same["side_effect_worst_cell"] == 0.0
    own = attack_run(out, budget=budget, device="cpu")
    o = own["attacks"]["continuous"]
    assert o["confidence_teacher"] == c["confidence_teacher"]                   # the same teacher figures
    assert o["confidence"] != o["confidence_teacher"] or own["residue_worst_family"] != own["residue_worst_family_teacher"]
    assert read_json(out / "metrics.json")["attack"]["asr_continuous"] == o["asr"]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SFD_BASELINE_REFS"), reason="set SFD_BASELINE_REFS to a folder holding the "
                    "checkouts erasing/, selective-amnesia/, Unlearn-Saliency/ (and einops importable)")
@pytest.mark.parametrize("broken", [None, "esd", "salun"])
def test_parity_with_reference_code(broken):
    root = Path(os.environ["SFD_BASELINE_REFS"])
    cmd = [sys.executable, str(Path(__file__).parent / "parity_baselines.py"), "--esd", str(root / "erasing"),
           "--sa", str(root / "selective-amnesia"), "--salun", str(root / "Unlearn-Saliency")]
    if broken:                      # the negative control: a 1 % error in one loss must fail the check
        cmd += ["--only", broken, "--break", broken]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert (r.returncode == 0) == (broken is None), r.stdout + r.stderr


def test_noise_levels_of_a_text_unet_with_an_edm_scheduler():
    """colordigits' teacher is a DiscreteVP adapter whose scheduler is EDM's: it has no sigma(t) grid, so SA's
    Fisher levels and SA / SalUn's training levels come from EDM's log-normal (which used to fail with
    AttributeError 'sigmas'); a DDPM-style teacher keeps its own grid (the negative control)."""
    from sfd.denoisers.ddpm import DiscreteVP
    from sfd.methods.common import discrete_sigmas
    from sfd.methods.finetune import FISHER_LEVELS, fisher_sigmas
    from sfd.tasks import get_task
    text = get_task("colordigits").load_teacher()
    assert isinstance(text, DiscreteVP) and discrete_sigmas(text) is None
    levels = fisher_sigmas(text)
    q = (torch.arange(FISHER_LEVELS, dtype=torch.float64) + 0.5) / FISHER_LEVELS
    assert torch.allclose(levels, (torch.distributions.Normal(0.0, 1.0).icdf(q) * 1.2 - 1.2).exp().float())
    s = draw_sigma(text, 6, torch.Generator().manual_seed(0))      # u_0..u_3, then the mirrors of u_0, u_1
    assert s.shape == (6,) and torch.allclose(s[:2].log() + 1.2, -(s[4:].log() + 1.2), atol=1e-5)

    class Grid(DiscreteVP):
        def __init__(self):
            super().__init__()
            self._init_schedule(torch.linspace(0.999, 0.01, 1000, dtype=torch.float64))

        forward = null_cond = None
    vp = Grid()
    assert torch.equal(discrete_sigmas(vp), vp.sigmas)
    assert set(draw_sigma(vp, 8, torch.Generator().manual_seed(0)).tolist()) <= set(vp.sigmas.tolist())
    assert fisher_sigmas(vp)[0] == vp.sigmas[0] and fisher_sigmas(vp)[-1] == vp.sigmas[-1]
