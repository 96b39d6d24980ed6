"""Real-teacher formats at their published sizes, written by the tests in the original containers.

No checkpoint and no network are available here, so every path is exercised with randomly
initialised networks of the exact published architectures: random init -> save in the
original container (torch.save lists, an NVIDIA-style persistent pickle, a diffusers folder)
-> load strictly through the project -> identical outputs on a fixed input. Full-size
networks run single forward passes at batch 1-3 under no_grad; logic tests use tiny configs.
"""
from __future__ import annotations

import builtins
import collections
import copy
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from sfd.denoisers import Guided, load_denoiser, load_teacher, save_denoiser
from sfd.denoisers.ddpm import (DDPM_CONFIGS, ConditionalDDPMUNet, VPDenoiser, linear_beta_sigmas,
                                load_ddpm_denoiser, sfd_checkpoint_states)
from sfd.denoisers.edm_networks import EDM_CONFIGS, build_edm_denoiser
from sfd.io import CheckpointError
from sfd.presets import get_preset

CIFAR = get_preset("cifar10")
STL = get_preset("stl10")
TINY_DDPM = dict(resolution=32, in_channels=3, out_channels=3, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                 attn_resolutions=[16], dropout=0.1, num_classes=10, resamp_with_conv=True)
TINY_SONG = ("EDMPrecond", dict(img_resolution=32, img_channels=3, label_dim=10, use_fp16=False, sigma_min=0,
                                sigma_max=float("inf"), sigma_data=0.5, model_type="SongUNet", augment_dim=9,
                                dropout=0.13, model_channels=32, channel_mult=[1, 2], num_blocks=1,
                                attn_resolutions=[16], embedding_type="positional", channel_mult_noise=1,
                                encoder_type="standard", decoder_type="standard", resample_filter=[1, 1]))


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.02, only_small: bool = False) -> torch.nn.Module:
    """Add noise to the parameters, so zero-initialised layers (EDM's output convolutions,
    ADM's zero init) do not make outputs trivially equal. ``only_small`` touches only the
    (near-)zero-initialised tensors, which is all that needs changing and much cheaper."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not only_small or p.abs().max() < 1e-3:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def fixed_input(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


# =========================================================================== DDPM

@pytest.fixture(scope="module")
def ddpm_cifar(tmp_path_factory):
    """Full CIFAR-10 DDPM: raw weights and a distinct EMA, saved as [model, opt, step, ema]."""
    torch.manual_seed(0)
    raw = ConditionalDDPMUNet(**DDPM_CONFIGS["cifar10"]).eval()
    ema = perturb(copy.deepcopy(raw), seed=1)
    path = tmp_path_factory.mktemp("ddpm") / "ckpt.pth"
    torch.save([raw.state_dict(), None, 12345, dict(ema.named_parameters())], path)
    return raw, ema, path


def test_ddpm_cifar_full_size_roundtrip_and_posterior_mean(ddpm_cifar):
    raw, ema, path = ddpm_cifar
    assert abs(n_params(raw) - 38.6e6) < 0.05e6, n_params(raw)       # 38,632,323
    teacher = load_teacher(CIFAR, path)                                # EMA by default
    assert isinstance(teacher, VPDenoiser) and teacher.num_classes == 10 and teacher.img_shape == (3, 32, 32)
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(v, ema.state_dict()[k]), k

    betas, abar, sig = linear_beta_sigmas()
    t = torch.tensor([0, 440, 999])
    labels = torch.tensor([3, 0, 10])                                  # 10 = the null embedding
    sigma = sig[t].float()
    s = sigma.reshape(-1, 1, 1, 1)
    x = fixed_input((3, 3, 32, 32)) * (1 + s**2).sqrt()               # sigma-space input
    x_t = x / (1 + s**2).sqrt()                                        # what the DDPM network sees
    with torch.no_grad():
        d_loaded = teacher(x, sigma, labels)
        eps = ema(x_t, t, labels)                                       # the original raw network
    # Identical outputs: the loaded adapter equals x - sigma * eps of the original network.
    assert torch.equal(d_loaded, x - s * eps)

    # The DDPM posterior mean mu(x_t, t) computed two ways: from eps (the DDPM sampler's
    # formula) and from our x0-denoiser D at the model's own discrete step.
    b, a_bar = betas[t].reshape(-1, 1, 1, 1), abar[t].reshape(-1, 1, 1, 1)
    a_prev = torch.where(t > 0, abar[(t - 1).clamp_min(0)], torch.ones(3, dtype=torch.float64)).reshape(-1, 1, 1, 1)
    mu_eps = (x_t.double() - b / (1 - a_bar).sqrt() * eps.double()) / (1 - b).sqrt()
    mu_d = (a_prev.sqrt() * b / (1 - a_bar)) * d_loaded.double() + ((1 - b).sqrt() * (1 - a_prev) / (1 - a_bar)) * x_t.double()
    err = (mu_eps - mu_d).abs().max().item()
    assert err < 1e-4, err
    # The adapter maps each grid sigma back to its own step.
    assert torch.equal(teacher.timestep(sigma), t)
    assert torch.equal(teacher.round_sigma(sigma), sigma)


def test_ddpm_raw_weights_option(ddpm_cifar):
    raw, _, path = ddpm_cifar
    d = load_ddpm_denoiser(path, CIFAR, ema=False)
    for k, v in d.model.state_dict().items():
        assert torch.equal(v, raw.state_dict()[k]), k


def test_ddpm_stl10_full_size_roundtrip(tmp_path):
    torch.manual_seed(2)
    net = ConditionalDDPMUNet(**DDPM_CONFIGS["stl10"]).eval()
    assert abs(n_params(net) - 83.2e6) < 0.05e6, n_params(net)        # 83,159,683
    path = tmp_path / "stl.pt"
    # DataParallel-style prefixes on the EMA; no optimiser state.
    torch.save([net.state_dict(), None, 1, {f"module.{k}": v for k, v in net.named_parameters()}], path)
    teacher = load_teacher(STL, path)
    x, s, c = fixed_input((1, 3, 64, 64)), torch.tensor([2.5]), torch.tensor([7])
    with torch.no_grad():
        assert torch.equal(teacher(x, s, c), VPDenoiser(net).eval()(x, s, c))


def test_ddpm_guidance_uses_learned_null_embedding():
    torch.manual_seed(3)
    net = ConditionalDDPMUNet(**TINY_DDPM).eval()
    d = VPDenoiser(net).eval()
    _, _, sig = linear_beta_sigmas()
    t = torch.tensor([100, 600])
    sigma = sig[t].float()
    x = fixed_input((2, 3, 32, 32)) * (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1)
    c = torch.tensor([1, 4])
    w = 2.0
    with torch.no_grad():
        x_t = x / (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1)
        eps_c, eps_null = net(x_t, t, c), net(x_t, t, torch.full_like(c, 10))
        want = x - sigma.reshape(-1, 1, 1, 1) * ((1 + w) * eps_c - w * eps_null)
        got = Guided(d, w)(x, sigma, c)
        assert (got - want).abs().max() < 1e-4
        # The null output depends on null_classes_emb, the conditional one does not.
        net.null_classes_emb.add_(1.0)
        assert not torch.allclose(net(x_t, t, torch.full_like(c, 10)), eps_null)
        assert torch.equal(net(x_t, t, c), eps_c)


def test_sfd_container_two_stage_states(tmp_path):
    torch.manual_seed(4)
    fake, gen = ConditionalDDPMUNet(**TINY_DDPM), ConditionalDDPMUNet(**TINY_DDPM)
    gen_ema = perturb(copy.deepcopy(gen), 5)
    path = tmp_path / "sfd.pth"
    pre = lambda m: {f"module.{k}": v for k, v in m.state_dict().items()}   # DataParallel
    torch.save([pre(fake), None, pre(gen), None, 500, dict(gen_ema.named_parameters())], path)

    g_state, f_state = sfd_checkpoint_states(path)
    assert all(torch.equal(g_state[f"model.{k}"], v) for k, v in gen_ema.state_dict().items())
    assert all(torch.equal(f_state[f"model.{k}"], v) for k, v in fake.state_dict().items())
    g_raw, _ = sfd_checkpoint_states(path, ema=False)
    assert all(torch.equal(g_raw[f"model.{k}"], v) for k, v in gen.state_dict().items())
    # The states load strictly into a generator/fake score built from the original teacher.
    teacher = VPDenoiser(ConditionalDDPMUNet(**TINY_DDPM))
    g, f = teacher.clone(), teacher.clone()
    from sfd.denoisers.ddpm import load_sfd_init
    load_sfd_init(path, g, f)
    assert torch.equal(g.model.conv_in.weight, gen_ema.conv_in.weight)

    # An SFD checkpoint is never silently used as a teacher (the reference's two-stage bug).
    with pytest.raises(CheckpointError, match="not a teacher"):
        load_teacher(CIFAR, path)
    d = load_teacher(CIFAR, path, role="generator")
    assert torch.equal(d.model.conv_in.weight, gen_ema.conv_in.weight)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_ddpm_container_errors(tmp_path):
    marker = tmp_path / "pwned-by-pt"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump([Evil(), None, 0, None], f)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_teacher(CIFAR, bad)
    assert not marker.exists()

    net = ConditionalDDPMUNet(**TINY_DDPM)
    state = net.state_dict()
    del state["down.1.block.0.temb_cemb_proj.weight"]
    torch.save([state, None, 0, None], tmp_path / "missing.pt")
    with pytest.warns(UserWarning, match="no EMA"):
        with pytest.raises(CheckpointError, match="down.1.block.0.temb_cemb_proj.weight"):
            load_teacher(CIFAR, tmp_path / "missing.pt")


# =========================================================================== EDM pickles

def _module_state(m: torch.nn.Module, convert, init_kwargs=None) -> dict:
    """What NVIDIA's persistence stores as ``meta['state']``: the module's ``__dict__``."""
    state = {
        "training": m.training,
        "_parameters": collections.OrderedDict(m._parameters),      # nn.Parameter objects, as NVIDIA's
        "_buffers": collections.OrderedDict(m._buffers),
        "_non_persistent_buffers_set": set(),
        "_backward_hooks": collections.OrderedDict(),
        "_forward_hooks": collections.OrderedDict(),
        "_forward_pre_hooks": collections.OrderedDict(),
        "_state_dict_hooks": collections.OrderedDict(),
        "_load_state_dict_pre_hooks": collections.OrderedDict(),
        "_modules": collections.OrderedDict((k, None if c is None else convert(c)) for k, c in m._modules.items()),
        "_init_args": (),
        "_init_kwargs": dict(init_kwargs or {}),
    }
    for k, v in vars(m).items():
        if not k.startswith("_") and isinstance(v, (bool, int, float, str)):
            # NVIDIA's modules keep numpy scalars such as np.sqrt(0.5); exercise that path.
            state[k] = np.float64(v) if isinstance(v, float) else v
    return state


def write_nvidia_pickle(path, denoiser, class_name, init_kwargs, module_src, drop=(), add=None):
    """Mimic NVIDIA's ``torch_utils.persistence`` pickles for ``denoiser``.

    Every non-container module reduces to ``torch_utils.persistence._reconstruct_persistent_obj(meta)``
    with ``meta = {type, version, module_src, class_name, state}``; ModuleDicts pickle as real
    ``torch.nn.ModuleDict`` objects. A fake ``torch_utils.persistence`` module exists only while
    writing. ``drop``/``add`` remove or add parameters (by module path) to make broken files.
    """
    fake_pkg = types.ModuleType("torch_utils")
    fake_mod = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):          # the official one would exec module_src
        raise AssertionError("must never be called")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    fake_mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    fake_pkg.persistence = fake_mod

    class Persistent:
        def __init__(self, meta):
            self.meta = meta

        def __reduce__(self):
            return (_reconstruct_persistent_obj, (self.meta,))

    def convert(m, prefix="", kwargs=None, name=None):
        if isinstance(m, torch.nn.ModuleDict):
            md = torch.nn.ModuleDict.__new__(torch.nn.ModuleDict)
            md.__dict__.update(_module_state(m, lambda c: c))
            md.__dict__["_modules"] = collections.OrderedDict(
                (k, convert(c, f"{prefix}{k}.")) for k, c in m._modules.items())
            for k in ("_init_args", "_init_kwargs"):
                md.__dict__.pop(k)
            return md
        state = _module_state(m, lambda c: None, kwargs)
        state["_modules"] = collections.OrderedDict(
            (k, None if c is None else convert(c, f"{prefix}{k}.")) for k, c in m._modules.items())
        for key in list(state["_parameters"]):
            if prefix + key in drop:
                del state["_parameters"][key]
        for key, value in (add or {}).items():
            if key.rsplit(".", 1)[0] + "." == prefix:
                state["_parameters"][key.rsplit(".", 1)[-1]] = torch.nn.Parameter(value)
        return Persistent(dict(type="class", version=6, module_src=module_src,
                               class_name=name or type(m).__name__, state=state))

    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    sys.modules["torch_utils"], sys.modules["torch_utils.persistence"] = fake_pkg, fake_mod
    try:
        loss = Persistent(dict(type="class", version=6, module_src=module_src, class_name="EDMLoss",
                               state={"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}))
        data = {"ema": convert(denoiser, "", init_kwargs, class_name), "loss_fn": loss, "augment_pipe": None,
                "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "path": "cifar10.zip"}}
        with open(path, "wb") as f:
            pickle.dump(data, f)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _evil_src(marker) -> str:
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('module_src was executed')\n"


@pytest.mark.parametrize("config", ["cifar10-cond-ddpmpp-edm", "cifar10-cond-ncsnpp-ve",
                                    pytest.param("imagenet64-cond-adm-edm", marks=pytest.mark.slow)])
def test_edm_pickle_full_size_roundtrip(config, tmp_path):
    class_name, kwargs = EDM_CONFIGS[config]
    torch.manual_seed(6)
    net = perturb(build_edm_denoiser(class_name, kwargs), 7, only_small=True).eval()
    expected = {"cifar10-cond-ddpmpp-edm": 55.7e6, "cifar10-cond-ddpmpp-vp": 55.7e6,
                "cifar10-cond-ncsnpp-ve": 56.4e6, "imagenet64-cond-adm-edm": 295.9e6}[config]
    assert abs(n_params(net) - expected) < 0.05e6, n_params(net)
    marker = tmp_path / "pwned"
    path = tmp_path / "network-snapshot.pkl"
    write_nvidia_pickle(path, net, class_name, kwargs, _evil_src(marker))

    preset = CIFAR if kwargs["img_resolution"] == 32 else None
    if preset is not None:
        loaded = load_teacher(preset, path)
    else:
        from sfd.denoisers.edm_pickle import load_edm_pickle
        loaded = load_edm_pickle(path)
    assert not marker.exists()                                   # module_src never ran
    assert type(loaded) is type(net) and type(loaded.model) is type(net.model)
    # The networks are convolutional, so every weight takes part at any size divisible by
    # 2^depth; the main target (DDPM++ EDM, the public CIFAR-10 checkpoint) runs at its native
    # 32x32, NCSN++ and ADM (296 M parameters) at 16x16 to keep the test file quick on 2 cores.
    res = 32 if config == "cifar10-cond-ddpmpp-edm" else 16
    x = fixed_input((1, 3, res, res))
    sigma, labels = torch.tensor([1.7]), torch.tensor([3])
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, labels), net(x, sigma, labels))


@pytest.mark.parametrize("variant", ["skip", "vp"])
def test_edm_other_variants_and_null_label(variant, tmp_path):
    cls, kw = TINY_SONG
    if variant == "skip":
        kw = dict(kw, encoder_type="skip", decoder_type="skip", embedding_type="fourier", channel_mult_noise=2,
                  resample_filter=[1, 3, 3, 1], label_dropout=0.1)
    else:   # VP preconditioning (EDM's baseline-*-vp.pkl files)
        cls = "VPPrecond"
        kw = {k: v for k, v in kw.items() if k not in ("sigma_min", "sigma_max", "sigma_data")}
        kw.update(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5)
    net = perturb(build_edm_denoiser(cls, kw), 8).eval()
    path = tmp_path / f"{variant}.pkl"
    write_nvidia_pickle(path, net, cls, kw, "pass\n")
    loaded = load_teacher(CIFAR, path)
    x = fixed_input((2, 3, 32, 32))
    with torch.no_grad():
        assert torch.equal(loaded(x, torch.tensor([0.5, 9.0]), torch.tensor([2, 10])),
                           net(x, torch.tensor([0.5, 9.0]), torch.tensor([2, 10])))
        # The null label is EDM's dropped label: the all-zero class vector.
        zero = torch.zeros(2, 10)
        a = net.model(x, torch.tensor([0.1, 0.2]), zero)
        b = net.model(x, torch.tensor([0.1, 0.2]), torch.tensor([10, 10]))
        assert torch.equal(a, b)


@pytest.mark.parametrize("attack", ["system", "open", "eval"])
def test_edm_malicious_pickle_is_refused(attack, tmp_path):
    marker = tmp_path / f"pwned-{attack}"

    class Evil:
        def __reduce__(self):
            if attack == "system":
                return (os.system, (f"touch {marker}",))
            if attack == "open":
                return (builtins.open, (str(marker), "w"))
            return (builtins.eval, (f"open({str(marker)!r}, 'w').write('x')",))

    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ema": Evil()}, f)
    name = {"system": r"(posix|nt|os)\.system", "open": r"(builtins|io|_io)\.open", "eval": r"builtins\.eval"}[attack]
    with pytest.raises(CheckpointError, match=f"refused to load global '{name}'"):
        load_teacher(CIFAR, path)
    assert not marker.exists()


def test_edm_pickle_missing_or_unexpected_parameter_is_refused(tmp_path):
    cls, kw = TINY_SONG
    net = build_edm_denoiser(cls, kw)
    missing = tmp_path / "missing.pkl"
    write_nvidia_pickle(missing, net, cls, kw, "pass\n", drop={"model.map_layer0.bias"})
    with pytest.raises(CheckpointError, match=r"missing keys \['model.map_layer0.bias'\]"):
        load_teacher(CIFAR, missing)
    extra = tmp_path / "extra.pkl"
    write_nvidia_pickle(extra, net, cls, kw, "pass\n", add={"model.map_layer1.gain": torch.ones(3)})
    with pytest.raises(CheckpointError, match=r"unexpected keys \['model.map_layer1.gain'\]"):
        load_teacher(CIFAR, extra)
    wrong_key = tmp_path / "other-key.pkl"
    write_nvidia_pickle(wrong_key, net, cls, kw, "pass\n")
    from sfd.denoisers.edm_pickle import load_edm_pickle
    with pytest.raises(CheckpointError, match="no 'G_ema' entry"):
        load_edm_pickle(wrong_key, key="G_ema")


# =========================================================================== diffusers

def _tiny_unet2d(num_class_embeds):
    from diffusers import UNet2DModel
    torch.manual_seed(9)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                       attention_head_dim=8, num_class_embeds=num_class_embeds).eval()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_diffusers_unet2d_teacher(prediction, tmp_path):
    from diffusers import DDPMScheduler
    embeds = 11 if prediction == "epsilon" else 10
    unet = perturb(_tiny_unet2d(embeds), 10)
    folder = tmp_path / "unet"
    unet.save_pretrained(folder)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction).save_pretrained(folder)
    teacher = load_teacher(CIFAR, folder)
    assert teacher.img_shape == (3, 32, 32) and teacher.num_classes == 10

    abar = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()
    t = torch.tensor([5, 500])
    sigma = ((1 - abar[t]) / abar[t]).sqrt().float()
    x = fixed_input((2, 3, 32, 32)) * 3
    c = torch.tensor([1, 9])
    s = sigma.reshape(-1, 1, 1, 1)
    with torch.no_grad():
        out = unet(x / (1 + s**2).sqrt(), t, class_labels=c).sample
        want = x - s * out if prediction == "epsilon" else x / (1 + s**2) - s / (1 + s**2).sqrt() * out
        got = teacher(x, sigma, c)
    assert torch.equal(got, want)
    if prediction == "epsilon":
        assert torch.equal(teacher.null_cond(c), torch.full_like(c, 10))   # the extra embedding row
    else:
        with pytest.raises(CheckpointError, match="guidance is unsupported"):
            teacher.null_cond(c)

    # Generators started from this backbone export to our safetensors and back.
    save_denoiser(tmp_path / "gen.safetensors", teacher)
    back = load_denoiser(tmp_path / "gen.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(back(x, sigma, c), got)


def test_diffusers_pipeline_folder_is_recognised(tmp_path):
    from diffusers import DDPMScheduler
    root = tmp_path / "pipe"
    _tiny_unet2d(11).save_pretrained(root / "unet")
    DDPMScheduler().save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    assert load_teacher(CIFAR, root).prediction_type == "epsilon"
    bare = tmp_path / "bare"
    _tiny_unet2d(11).save_pretrained(bare)
    with pytest.raises(CheckpointError, match="scheduler_config.json"):
        load_teacher(CIFAR, bare)


@pytest.mark.parametrize("backbone", ["ddpm", "songunet"])
def test_gradient_checkpointing_gives_the_same_gradients(backbone):
    if backbone == "ddpm":
        d = VPDenoiser(ConditionalDDPMUNet(**dict(TINY_DDPM, dropout=0.0)))
    else:
        d = build_edm_denoiser(TINY_SONG[0], dict(TINY_SONG[1], dropout=0.0))
    perturb(d, 16)
    x, s, c = fixed_input((2, 3, 32, 32)), torch.tensor([0.5, 3.0]), torch.tensor([1, 10])
    grads = []
    for on in (False, True):
        d.zero_grad()
        d.set_gradient_checkpointing(on) if hasattr(d, "set_gradient_checkpointing") else \
            setattr(d.model, "gradient_checkpointing", on)
        d(x, s, c).square().mean().backward()
        # map_augment gets no gradient: augment labels are absent (zero) outside training.
        grads.append([None if p.grad is None else p.grad.clone() for p in d.parameters()])
    assert sum(g is not None for g in grads[0]) > 0.9 * len(grads[0])
    assert all((a is None and b is None) or torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


# =========================================================================== our safetensors

def test_exported_generators_roundtrip_through_safetensors(tmp_path):
    ddpm = perturb(VPDenoiser(ConditionalDDPMUNet(**TINY_DDPM)), 11).eval()
    edm = perturb(build_edm_denoiser(*TINY_SONG), 12).eval()
    vp_cls, vp_kw = "VPPrecond", dict(TINY_SONG[1], beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5)
    for k in ("sigma_min", "sigma_max", "sigma_data"):
        vp_kw.pop(k)
    vp = perturb(build_edm_denoiser(vp_cls, vp_kw), 13).eval()
    x, s, c = fixed_input((2, 3, 32, 32)), torch.tensor([0.3, 4.0]), torch.tensor([0, 5])
    for name, d in (("ddpm", ddpm), ("edm", edm), ("vp", vp)):
        save_denoiser(tmp_path / f"{name}.safetensors", d)
        back = load_denoiser(tmp_path / f"{name}.safetensors").eval()
        with torch.no_grad():
            assert torch.equal(back(x, s, c), d(x, s, c)), name


def test_missing_teacher_names_the_formats():
    with pytest.raises(CheckpointError) as e:
        load_teacher(CIFAR, None)
    for fmt in ("ddpm-pt", "edm-pkl", "diffusers-unet2d"):
        assert fmt in str(e.value)


# =========================================================================== judges

def test_resnet34_torchvision_layout(tmp_path):
    from sfd.evaluate.resnet import ResNet34, load_resnet34
    net = ResNet34(num_classes=10).eval()
    sd = net.state_dict()
    # torchvision resnet34: stem 6 + 16 blocks x 12 + 3 downsample x 6 + fc 2 = 218 entries.
    assert len(sd) == 218
    assert n_params(ResNet34(num_classes=1000)) == 21_797_672      # torchvision's resnet34
    assert n_params(net) == 21_289_802
    expected = {"conv1.weight": (64, 3, 7, 7), "bn1.running_mean": (64,), "bn1.num_batches_tracked": (),
                "layer1.0.conv1.weight": (64, 64, 3, 3), "layer1.2.bn2.bias": (64,),
                "layer2.0.downsample.0.weight": (128, 64, 1, 1), "layer2.0.downsample.1.running_var": (128,),
                "layer2.3.conv2.weight": (128, 128, 3, 3), "layer3.5.bn2.weight": (256,),
                "layer4.0.downsample.0.weight": (512, 256, 1, 1), "layer4.2.conv2.weight": (512, 512, 3, 3),
                "fc.weight": (10, 512), "fc.bias": (10,)}
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert "layer1.0.downsample.0.weight" not in sd and "layer3.6.conv1.weight" not in sd

    # A fine-tuned torchvision-style file: DataParallel prefix, wrapped, old BN counters absent.
    perturb(net, 14)
    state = {f"module.{k}": v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "resnet34_cifar10.pth")
    judge = load_resnet34(tmp_path / "resnet34_cifar10.pth")
    x = fixed_input((1, 3, 32, 32)).clamp(-1, 1)
    with torch.no_grad():
        f, logits = judge.features_and_logits(x)
        assert f.shape == (1, 512) and logits.shape == (1, 10)
        assert torch.equal(logits, net(x))
    del state["module.layer3.1.conv2.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="layer3.1.conv2.weight"):
        load_resnet34(tmp_path / "broken.pth")


@pytest.mark.slow
def test_fid_inception_layout_and_reference_stats(tmp_path):
    from PIL import Image
    from sfd.evaluate.inception import (FIDInceptionV3, inception_features, inception_score, load_fid_inception,
                                        load_image_folder, reference_stats, save_stats)
    from sfd.evaluate.metrics import feature_stats, frechet_distance

    net = FIDInceptionV3()
    sd = net.state_dict()
    # torchvision Inception3 has 27,161,264 parameters with its aux head and 1000 classes; the FID
    # network drops the aux head (3,326,696) and has 1008 outputs (+16,392).
    assert n_params(net) == 23_850_960
    expected = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_4a_3x3.bn.running_var": (192,),
                "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1), "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
                "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
                "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
                "Mixed_7c.branch3x3dbl_3b.bn.weight": (384,), "fc.weight": (1008, 2048)}
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith("AuxLogits") for k in sd)

    torch.save({k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")},
               tmp_path / "pt_inception.pth")     # an old-style file without BN counters
    inc = load_fid_inception(tmp_path / "pt_inception.pth")
    assert all(torch.equal(v, sd[k]) for k, v in inc.state_dict().items())

    # Reference images: stored 8-bit values -> x / 127.5 - 1, never stretched per image.
    folder = tmp_path / "real"
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 40, (32, 32, 3), dtype=np.uint8), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"{i}.png")
    imgs = load_image_folder(folder)
    assert torch.equal(imgs[0], torch.from_numpy(arrays[0]).permute(2, 0, 1).float() / 127.5 - 1)
    assert imgs[0].max() < -0.68                                  # a dark image stays dark

    feats = inception_features(inc, imgs)                        # one pass at 299x299
    assert feats.shape == (2, 2048)
    mu, sigma = feature_stats(feats)
    save_stats(tmp_path / "ref.npz", mu, sigma)
    mu2, sigma2 = reference_stats(tmp_path / "ref.npz")
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2) and mu2.shape == (2048,)
    fd_self = frechet_distance((mu, sigma), (mu2, sigma2))
    assert abs(fd_self) < 1e-6 * max(1.0, float(np.trace(sigma)))
    with torch.no_grad():
        logits = inc.fc(torch.from_numpy(feats).float())
    assert logits.shape == (2, 1008)
    # IS of these logits against an independent float64 computation (known answers: test_metrics_independent)
    from scipy import special, stats
    prob = special.softmax(logits.double().numpy(), axis=1)
    want = np.exp(np.mean([stats.entropy(q, prob.mean(0)) for q in prob]))
    assert inception_score(logits, splits=1)[0] == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="needs the Inception network"):
        reference_stats(folder)
