"""Foundation: presets, EDM preconditioning, guidance, samplers, metrics, shipped weights."""
import math
import shutil

import numpy as np
import pytest
import torch

from sfd.denoisers import EDMPrecond, Guided, edm_coefficients, load_denoiser, load_teacher
from sfd.evaluate import load_judge
from sfd.evaluate.metrics import frechet_distance, unlearning_accuracy
from sfd.io import CheckpointError
from sfd.samplers import karras_sigmas, sample_sigma, vp_sigma_of_t


def test_digits_preset_split_and_range(digits):
    x_tr, y_tr = digits.real_data("train")
    x_te, y_te = digits.real_data("test")
    assert len(y_tr) + len(y_te) == 1797
    assert x_tr.shape[1:] == (1, 8, 8)
    assert x_tr.min() == -1.0 and x_tr.max() == 1.0
    # stratified: every class in the held-out split, in proportion
    counts = torch.bincount(y_te, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    # fixed: the same split twice
    assert torch.equal(digits.real_data("test")[1], y_te)


def test_edm_coefficients_hand_computed():
    sigma = torch.tensor([0.5, 2.0])
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, 0.5)
    # sigma = 0.5 = sigma_data: c_skip 1/2, c_out 0.5*0.5/sqrt(0.5) = 0.35355, c_in 1/sqrt(0.5)
    assert c_skip[0].item() == pytest.approx(0.5)
    assert c_out[0].item() == pytest.approx(0.25 / math.sqrt(0.5))
    assert c_in[0].item() == pytest.approx(1 / math.sqrt(0.5))
    assert c_noise[0].item() == pytest.approx(math.log(0.5) / 4)
    # sigma = 2: c_skip 0.25/4.25, c_out 1/sqrt(4.25), c_in 1/sqrt(4.25), c_noise ln 2 / 4
    assert c_skip[1].item() == pytest.approx(0.25 / 4.25)
    assert c_out[1].item() == pytest.approx(1.0 / math.sqrt(4.25))
    assert c_in[1].item() == pytest.approx(1.0 / math.sqrt(4.25))
    assert c_noise[1].item() == pytest.approx(math.log(2.0) / 4)


class _Probe(torch.nn.Module):
    """A raw network that returns its input times 3 and records c_noise: checks the wiring."""
    def forward(self, x, c_noise, labels):
        self.c_noise = c_noise
        return 3.0 * x


def test_edm_precond_wiring_hand_computed():
    d = EDMPrecond(_Probe(), num_classes=10, img_shape=(1, 2, 2))
    x = torch.full((1, 1, 2, 2), 2.0)
    out = d(x, 2.0, torch.tensor([3]))
    # D = c_skip x + c_out * 3 * c_in x = x (0.25/4.25 + 3/4.25)
    assert out.flatten()[0].item() == pytest.approx(2.0 * (0.25 + 3.0) / 4.25)
    assert d.model.c_noise.item() == pytest.approx(math.log(2.0) / 4)


def test_sigma_x_conversion_vp():
    # sigma(t) = sqrt((1 - abar)/abar) with linear beta 1e-4..0.02 over 1000 steps
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    for t in (0, 38, 440, 712, 999):
        assert vp_sigma_of_t(torch.tensor([t])).item() == pytest.approx(math.sqrt((1 - abar[t]) / abar[t]), rel=1e-5)
    # the reference's t_init = 440 is sigma ~ 2.5 and its t range [38, 712) is sigma ~ 0.137 .. 13.1
    assert vp_sigma_of_t(torch.tensor([440])).item() == pytest.approx(2.5, abs=0.05)
    assert vp_sigma_of_t(torch.tensor([38])).item() == pytest.approx(0.137, abs=0.01)
    s = sample_sigma("vp-t", 2000, 0.137, 13.1, generator=torch.Generator().manual_seed(0))
    assert s.min() >= 0.13 and s.max() <= 13.2


def test_karras_grid_endpoints():
    s = karras_sigmas(18, 0.002, 80.0)
    assert len(s) == 19 and s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002)
    assert s[-1].item() == 0.0 and bool((s[:-1] > s[1:]).all())


def test_guidance_scale_zero_equals_conditional(teacher):
    x = torch.randn(6, 1, 8, 8)
    cond = torch.arange(6)
    with torch.no_grad():
        plain = teacher(x, 1.3, cond)
        g0 = Guided(teacher, 0.0)(x, 1.3, cond)
        g2 = Guided(teacher, 2.0)(x, 1.3, cond)
        null = teacher(x, 1.3, teacher.null_cond(cond))
    assert torch.equal(plain, g0)
    torch.testing.assert_close(g2, 3.0 * plain - 2.0 * null, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, null)   # the null condition was learned, not ignored


def test_shipped_weights_load_offline(digits, teacher, judge):
    assert teacher.num_classes == 10 and teacher.img_shape == (1, 8, 8)
    assert not any(p.requires_grad for p in teacher.parameters())
    x, y = digits.real_data("test")
    with torch.no_grad():
        _, logits = judge.features_and_logits(x)
    assert (logits.argmax(1) == y).float().mean().item() >= 0.97
    # the teacher denoises: at sigma 0.5 its x0 estimate is much closer to x0 than the noisy input
    torch.manual_seed(0)
    noisy = x + 0.5 * torch.randn_like(x)
    with torch.no_grad():
        d = teacher(noisy, 0.5, y)
    assert (d - x).pow(2).mean() < 0.5 * (noisy - x).pow(2).mean()


def test_missing_weight_file_names_it(tmp_path, digits):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        load_teacher(digits, missing)
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        load_judge(digits, missing)


def test_corrupted_weight_file_names_it(tmp_path, digits):
    bad = tmp_path / "teacher.safetensors"
    shutil.copy(digits.weights_dir / "teacher.safetensors", bad)
    data = bytearray(bad.read_bytes())
    bad.write_bytes(bytes(data[: len(data) // 2]))       # truncated download
    with pytest.raises(CheckpointError, match="teacher.safetensors"):
        load_denoiser(bad)
    bad.write_bytes(b"\x00" * 64)                         # garbage
    with pytest.raises(CheckpointError, match="corrupted"):
        load_teacher(digits, bad)


def test_frechet_distance_matches_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    b = rng.normal(size=(4000, 3)) * 2.0 + 1.0
    # N(0, I) vs N(1, 4I): |mu|^2 = 3, trace term 3 * (1 + 4 - 2 * 2) = 3
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.08)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_unlearning_accuracy_divides_by_forget_samples():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 1, 1, 2, 2])
    # 1 of 4 class-0 samples still classified as 0: UA = 0.75 (not 1 - 1/8)
    assert unlearning_accuracy(pred, labels, [0]) == pytest.approx(0.75)
