"""--precision and --grad-checkpointing run the loop's own iteration as claimed."""
import copy
import math

import pytest
import torch

from sfd.config import SFDConfig
from sfd.iteration import build_state, sfd_iteration


def conv_dtypes(net) -> list:
    seen = []
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    return seen


def test_bf16_autocast_runs_networks_in_bf16_with_fp32_weights(teacher):
    cfg = SFDConfig(batch_remain=8, batch_forget=8, precision="bf16", device="cpu")
    st = build_state(cfg, copy.deepcopy(teacher), "cpu")
    seen = conv_dtypes(st.generator)
    losses = [sfd_iteration(st) for _ in range(50)]
    assert all(math.isfinite(v) for pair in losses for v in pair)
    assert seen and set(seen) == {torch.bfloat16}                 # the passes ran in bf16 ...
    assert all(p.dtype == torch.float32 for p in st.generator.parameters())   # ... on fp32 master weights
    assert all(s["exp_avg"].dtype == torch.float32 for s in st.opt_gen.state.values())


def test_fp32_is_not_autocast(teacher):
    st = build_state(SFDConfig(batch_remain=4, batch_forget=4, device="cpu"), copy.deepcopy(teacher), "cpu")
    seen = conv_dtypes(st.generator)
    sfd_iteration(st)
    assert set(seen) == {torch.float32}


def test_auto_precision_follows_the_devices_native_bf16(teacher, monkeypatch):
    import sfd.onestep as it                         # resolve_precision reads native_bf16 here
    for native, expect in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(it, "native_bf16", lambda device, native=native: native)
        st = build_state(SFDConfig(batch_remain=4, batch_forget=4, device="cpu", precision="auto"),
                         copy.deepcopy(teacher), "cpu")
        seen = conv_dtypes(st.generator)
        sfd_iteration(st)
        assert st.precision == ("bf16" if native else "fp32") and set(seen) == {expect}
    # this machine's own answer matches what oneDNN reports (no patch)
    monkeypatch.undo()
    assert it.resolve_precision("auto", "cpu") == ("bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32")
    assert it.resolve_precision("fp16", "cpu") == "fp16"


def test_grad_checkpointing_same_step_and_clear_error_without_support(teacher):
    from sfd.denoisers.ddpm import ConditionalDDPMUNet, VPDenoiser

    def ddpm():
        torch.manual_seed(0)
        return VPDenoiser(ConditionalDDPMUNet(resolution=8, in_channels=1, out_channels=1, ch=32, ch_mult=[1, 2],
                                              num_res_blocks=1, attn_resolutions=[4], dropout=0.1, num_classes=10))
    runs = {}
    for gc in (False, True):
        cfg = SFDConfig(batch_remain=4, batch_forget=4, grad_checkpointing=gc, device="cpu", sigma_dist="vp-t")
        st = build_state(cfg, ddpm(), "cpu")
        assert st.generator.model.gradient_checkpointing is gc
        runs[gc] = [sfd_iteration(st) for _ in range(2)], [p.detach().clone() for p in st.generator.parameters()]
    # recomputation (with dropout on: the global-batch masks are redrawn identically) changes nothing
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for a, b in zip(runs[True][1], runs[False][1]):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="no gradient checkpointing"):
        build_state(SFDConfig(grad_checkpointing=True, device="cpu"), copy.deepcopy(teacher), "cpu")
