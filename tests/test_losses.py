"""The SFD losses (SFD.md section 4) against hand computations on tiny tensors."""
import copy

import pytest
import torch

from sfd.losses import fake_score_loss, generator_loss

DT = torch.float64


def _t(rows):
    """(B, 1, 1, P) float64 tensor from a list of per-sample pixel lists."""
    return torch.tensor(rows, dtype=DT).reshape(len(rows), 1, 1, -1)


# Three samples of two pixels each, with the per-sample values worked out by hand:
#   sample 0: x_g = (0, 0),  y_real = (1, 2),  y_fake = (0.5, 1)
#             d = y_real - y_fake = (0.5, 1); y_real - x_g = (1, 2); y_fake - x_g = (0.5, 1)
#             omega = mean(|0-1|, |0-2|) = 1.5
#   sample 1: x_g = (1, -1), y_real = (1, -1), y_fake = (0, 0)
#             d = (1, -1); y_real - x_g = (0, 0); y_fake - x_g = (-1, 1)
#             omega = 0 -> clamped to 1e-5
#   sample 2: x_g = (2, 0),  y_real = (0, 1),  y_fake = (1, 1)
#             d = (-1, 0); y_real - x_g = (-2, 1); y_fake - x_g = (-1, 1)
#             omega = mean(2, 1) = 1.5
X_G = [[0.0, 0.0], [1.0, -1.0], [2.0, 0.0]]
Y_REAL = [[1.0, 2.0], [1.0, -1.0], [0.0, 1.0]]
Y_FAKE = [[0.5, 1.0], [0.0, 0.0], [1.0, 1.0]]
OMEGA = [1.5, 1e-5, 1.5]

EXPECTED = {
    # alpha = 0: sum d * (y_real - x_g) / omega
    0.0: [(0.5 * 1 + 1 * 2) / 1.5,                   # 2.5 / 1.5
          (1 * 0 + -1 * 0) / 1e-5,                    # 0
          (-1 * -2 + 0 * 1) / 1.5],                   # 2 / 1.5
    # alpha = 1: sum d * (y_fake - x_g) / omega
    1.0: [(0.5 * 0.5 + 1 * 1) / 1.5,                 # 1.25 / 1.5
          (1 * -1 + -1 * 1) / 1e-5,                   # -2e5 (negative: it is a surrogate)
          (-1 * -1 + 0 * 1) / 1.5],                   # 1 / 1.5
    # alpha = 1.2: sum d * ((y_real - x_g) - 1.2 d) / omega
    1.2: [(0.5 * (1 - 0.6) + 1 * (2 - 1.2)) / 1.5,   # 1.0 / 1.5
          (1 * (0 - 1.2) + -1 * (0 + 1.2)) / 1e-5,    # -2.4e5
          (-1 * (-2 + 1.2) + 0 * (1 - 0)) / 1.5],     # 0.8 / 1.5
}


@pytest.mark.parametrize("alpha", sorted(EXPECTED))
def test_generator_loss_hand_computed(alpha):
    out = generator_loss(_t(Y_REAL), _t(Y_FAKE), _t(X_G), alpha)
    assert out.shape == (3,)
    assert out.tolist() == pytest.approx(EXPECTED[alpha], rel=1e-12)


def test_generator_loss_hand_numbers_spelled_out():
    # the same, as literal numbers, so a sign or factor slip in EXPECTED cannot hide
    out = generator_loss(_t(Y_REAL), _t(Y_FAKE), _t(X_G), 1.2).tolist()
    assert out == pytest.approx([2 / 3, -2.4e5, 0.8 / 1.5], rel=1e-12)
    out = generator_loss(_t(Y_REAL), _t(Y_FAKE), _t(X_G), 1.0).tolist()
    assert out == pytest.approx([1.25 / 1.5, -2e5, 2 / 3], rel=1e-12)


def test_generator_loss_alpha_one_reduces_to_fake_minus_xg():
    g = torch.Generator().manual_seed(0)
    y_real, y_fake, x_g = (torch.randn(5, 3, 4, 4, generator=g, dtype=DT) for _ in range(3))
    omega = (x_g - y_real).abs().mean(dim=(1, 2, 3))
    expected = ((y_real - y_fake) * (y_fake - x_g)).sum(dim=(1, 2, 3)) / omega
    torch.testing.assert_close(generator_loss(y_real, y_fake, x_g, 1.0), expected, rtol=1e-12, atol=1e-12)


def test_generator_loss_omega_is_per_sample():
    # Scaling one sample's residual must not change another sample's value (a batch-wide
    # omega would couple them).
    y_real, y_fake, x_g = _t(Y_REAL), _t(Y_FAKE), _t(X_G)
    base = generator_loss(y_real, y_fake, x_g, 1.2)
    x_g2 = x_g.clone()
    x_g2[2] = x_g2[2] * 10.0
    moved = generator_loss(y_real, y_fake, x_g2, 1.2)
    assert moved[:2].tolist() == base[:2].tolist()
    assert moved[2].item() != base[2].item()


def test_generator_loss_omega_clamped_not_zero_division():
    y = _t([[0.3, -0.2]])
    out = generator_loss(y, y - 1.0, y.clone(), 1.0)      # x_g == y_real: omega 0 -> 1e-5
    # d = (1, 1), y_fake - x_g = (-1, -1): sum -2, / 1e-5
    assert torch.isfinite(out).all()
    assert out.item() == pytest.approx(-2e5, rel=1e-12)


def test_generator_loss_gradient_treats_omega_as_constant():
    alpha = 1.2
    x_g = _t(X_G).requires_grad_(True)
    y_real = _t(Y_REAL).requires_grad_(True)
    y_fake = _t(Y_FAKE).requires_grad_(True)
    generator_loss(y_real, y_fake, x_g, alpha).sum().backward()
    d = _t(Y_REAL) - _t(Y_FAKE)
    om = torch.tensor(OMEGA, dtype=DT).reshape(-1, 1, 1, 1)
    r = _t(Y_REAL) - _t(X_G)
    # L = sum d * (r - alpha d) / omega with omega a constant:
    #   dL/dx_g    = -d / omega
    #   dL/dy_real = ((r - alpha d) + d (1 - alpha)) / omega
    #   dL/dy_fake = (-(r - alpha d) + alpha d) / omega
    torch.testing.assert_close(x_g.grad, -d / om, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_real.grad, ((r - alpha * d) + d * (1 - alpha)) / om, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_fake.grad, (-(r - alpha * d) + alpha * d) / om, rtol=1e-12, atol=1e-12)
    # spelled out for sample 0: -d / 1.5 = (-1/3, -2/3)
    assert x_g.grad[0].flatten().tolist() == pytest.approx([-1 / 3, -2 / 3], rel=1e-12)


def test_generator_loss_gradient_differs_from_differentiable_omega():
    # Sanity check of the test above: had omega carried a gradient, sample 0's x_g gradient
    # would pick up -L/omega^2 * d omega/d x_g = -(1.0/1.5^2) * sign(x_g - y_real) / 2 != 0.
    x_g = _t(X_G).requires_grad_(True)
    y_real, y_fake = _t(Y_REAL), _t(Y_FAKE)
    omega = (x_g - y_real).abs().flatten(1).mean(1).clamp_min(1e-5)
    d = y_real - y_fake
    ((d * ((y_real - x_g) - 1.2 * d)).flatten(1).sum(1) / omega).sum().backward()
    x_ref = _t(X_G).requires_grad_(True)
    generator_loss(y_real, y_fake, x_ref, 1.2).sum().backward()
    assert not torch.allclose(x_g.grad[0], x_ref.grad[0])


def test_fake_score_loss_hand_computed():
    d_fake = _t([[1.0, 2.0], [0.0, 0.0]]).requires_grad_(True)
    x_g = _t([[0.0, 0.0], [1.0, 3.0]]).requires_grad_(True)
    weight = torch.tensor([2.0, 0.5], dtype=DT)
    out = fake_score_loss(d_fake, x_g, weight)
    # the reference sums over pixels: sample 0: 2 * (1^2 + 2^2) = 10;  sample 1: 0.5 * (1^2 + 3^2) = 5
    assert out.shape == (2,)
    assert out.tolist() == pytest.approx([10.0, 5.0], rel=1e-12)
    out.sum().backward()
    # d/d d_fake = weight * 2 (d_fake - x_g); x_g is treated as data (detached)
    assert d_fake.grad.flatten().tolist() == pytest.approx([4.0, 8.0, -1.0, -3.0], rel=1e-12)
    assert x_g.grad is None
    # the 'mean' deviation divides by the pixel count (2 here)
    d_fake.grad = None
    mean = fake_score_loss(d_fake, x_g, weight, reduction="mean")
    assert mean.tolist() == pytest.approx([5.0, 2.5], rel=1e-12)
    with pytest.raises(ValueError, match="reduction"):
        fake_score_loss(d_fake, x_g, weight, reduction="max")


def test_fake_score_loss_accepts_broadcast_weight_shape(teacher):
    # The loop passes denoiser.loss_weight(sigma) with sigma shaped (B, 1, 1, 1).
    sigma = torch.tensor([0.5, 2.0]).reshape(-1, 1, 1, 1)
    w = teacher.loss_weight(sigma)
    # EDM weight (sigma^2 + 0.25) / (0.5 sigma)^2: 0.5 -> 0.5 / 0.0625 = 8; 2 -> 4.25 / 1 = 4.25
    assert w.flatten().tolist() == pytest.approx([8.0, 4.25])
    d_fake = torch.ones(2, 1, 8, 8)
    x_g = torch.zeros(2, 1, 8, 8)
    assert fake_score_loss(d_fake, x_g, w).tolist() == pytest.approx([8.0 * 64, 4.25 * 64])


@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_generator_step_grads_reach_generator_and_xg_not_teacher_or_fake(teacher, guidance, monkeypatch):
    """The loop's own iteration (sfd.iteration.sfd_iteration): in the generator step the gradient
    reaches the generator through the *inputs* of the frozen teacher and fake score, never their
    parameters."""
    import sfd.iteration as it
    from sfd.config import SFDConfig

    cfg = SFDConfig(batch_remain=4, batch_forget=4, guidance=guidance, device="cpu")
    st = it.build_state(cfg, copy.deepcopy(teacher), "cpu")
    seen, flows = {}, {}
    real_loss = it.generator_loss

    def spy(y_real, y_fake, x_g, alpha):
        # teacher and fake score are frozen: their outputs need gradients only through x
        flows["requires_grad"] = (y_real.requires_grad, y_fake.requires_grad, x_g.requires_grad)
        for name, t in (("y_real", y_real), ("y_fake", y_fake)):
            t.register_hook(lambda g, name=name: flows.__setitem__(name, float(g.abs().sum())))
        return real_loss(y_real, y_fake, x_g, alpha)

    monkeypatch.setattr(it, "generator_loss", spy)

    def grads(name, net):
        seen[name] = {
            "generator": [None if p.grad is None else p.grad.clone() for p in st.generator.parameters()],
            "fake_score": [None if p.grad is None else p.grad.clone() for p in st.fake_score.parameters()],
            "teacher": [p.grad for p in st.teacher.parameters()],
        }

    it.sfd_iteration(st, grads_hook=grads)
    assert flows["requires_grad"] == (True, True, True)
    assert flows["y_real"] > 0 and flows["y_fake"] > 0
    at_gen = seen["generator"]
    assert all(g is None for g in at_gen["teacher"])
    gen_grads = [g for g in at_gen["generator"] if g is not None]
    assert len(gen_grads) == len(list(st.opt_gen.param_groups[0]["params"]))
    assert sum(float(g.abs().sum()) for g in gen_grads) > 0
    # the generator step left the fake score's gradients (from its own step, then clipped) untouched
    for a, b in zip(seen["fake_score"]["fake_score"], at_gen["fake_score"]):
        assert (a is None and b is None) or torch.equal(a.clamp(-cfg.grad_clip, cfg.grad_clip), b)
    # and the fake score is trainable again afterwards
    assert all(p.requires_grad for p in st.opt_fake.param_groups[0]["params"])