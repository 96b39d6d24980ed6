"""End-to-end smokes with real-dataset presets: `sfd forget --preset cifar10 --teacher X` for each
teacher format (random weights, tiny configs, saved by the test in the original containers), and
one run evaluated with a ResNet-34 classifier, FID Inception features and a reference .npz."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sfd.cli import main
from sfd.denoisers.ddpm import ConditionalDDPMUNet
from test_real_teachers import TINY_DDPM, TINY_SONG, _tiny_unet2d, perturb, write_nvidia_pickle

TINY_RUN = ["--preset", "cifar10", "--forget", "0", "--override", "1", "--budget-kimg", "0.008",
            "--batch-remain", "2", "--batch-forget", "2", "--eval-every-kimg", "1", "--device", "cpu",
            "--no-progress"]


def _ddpm(tmp_path):
    torch.manual_seed(0)
    net = ConditionalDDPMUNet(**TINY_DDPM)
    path = tmp_path / "ddpm.pth"
    torch.save([net.state_dict(), None, 1, dict(net.named_parameters())], path)
    return path


def _edm(tmp_path):
    from sfd.denoisers.edm_networks import build_edm_denoiser
    cls, kw = TINY_SONG
    torch.manual_seed(1)
    net = perturb(build_edm_denoiser(cls, kw), 2, only_small=True)
    path = tmp_path / "edm.pkl"
    write_nvidia_pickle(path, net, cls, kw, "raise SystemExit('module_src must never run')\n")
    return path


def _diffusers(tmp_path):
    from diffusers import DDPMScheduler
    folder = tmp_path / "unet"
    _tiny_unet2d(11).save_pretrained(folder)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("make", [_ddpm, _edm, _diffusers], ids=["ddpm", "edm-pkl", "diffusers"])
def test_forget_runs_on_each_teacher_format(make, tmp_path, capsys):
    teacher = make(tmp_path)
    out = tmp_path / "run"
    assert main(["forget", "--teacher", str(teacher), "--out", str(out), *TINY_RUN]) == 0
    assert "UA/FD are not measured" in capsys.readouterr().out      # said, not silently skipped
    m = json.loads((out / "metrics.json").read_text())
    assert m["kimg"] == pytest.approx(0.008) and m["config"]["teacher"] == str(teacher)
    gen = out / "generator.safetensors"
    assert main(["sample", "--generator", str(gen), "--classes", "0,1", "--n", "2", "--device", "cpu",
                 "--out", str(tmp_path / "s.safetensors")]) == 0


def test_cifar10_without_teacher_names_the_formats(tmp_path, capsys):
    assert main(["forget", "--out", str(tmp_path / "r"), *TINY_RUN]) == 2
    err = capsys.readouterr().err
    assert "--teacher" in err and "no bundled teacher" in err


@pytest.mark.slow
def test_cifar10_run_evaluated_with_resnet_inception_and_reference(tmp_path, monkeypatch):
    from sfd.evaluate.inception import FIDInceptionV3
    from sfd.evaluate.resnet import ResNet34

    monkeypatch.setenv("SFD_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(3)
    torch.save(ResNet34(num_classes=10).state_dict(), tmp_path / "resnet34.pth")
    torch.save(FIDInceptionV3().state_dict(), tmp_path / "pt_inception.pth")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", images=rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8),
             labels=np.repeat(np.arange(10), 3))
    out = tmp_path / "run"
    assert main(["forget", "--teacher", str(_ddpm(tmp_path)), "--out", str(out), *TINY_RUN,
                 "--classifier", str(tmp_path / "resnet34.pth"), "--fid-weights", str(tmp_path / "pt_inception.pth"),
                 "--reference", str(tmp_path / "ref.npz"), "--eval-forget-samples", "4",
                 "--eval-remain-per-class", "3"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for k in ("ua", "remaining_accuracy", "fd_remaining", "fd_remaining_teacher", "fd_forget_vs_override"):
        assert np.isfinite(m[k]), k
    assert m["n_forget_samples"] == 4 and m["n_remaining_samples"] == 27


def test_two_stage_start_from_an_official_sfd_checkpoint(tmp_path):
    """--init-from an official SFD checkpoint: generator (its EMA) and fake score are copied in,
    the teacher stays the original DDPM."""
    from sfd.denoisers import load_teacher
    from sfd.loop import load_generator_init
    from sfd.presets import get_preset

    teacher_path = _ddpm(tmp_path)
    torch.manual_seed(5)
    fake, gen = ConditionalDDPMUNet(**TINY_DDPM), ConditionalDDPMUNet(**TINY_DDPM)
    gen_ema = {k: v + 0.01 for k, v in gen.named_parameters()}
    sfd_ckpt = tmp_path / "sfd_stage1.pth"
    torch.save([fake.state_dict(), None, gen.state_dict(), None, 100, gen_ema], sfd_ckpt)

    teacher = load_teacher(get_preset("cifar10"), teacher_path)
    g, f = teacher.clone(), teacher.clone()
    load_generator_init(sfd_ckpt, g, f)
    name = next(iter(gen_ema))
    assert torch.equal(g.state_dict()[f"model.{name}"], gen_ema[name])
    assert torch.equal(f.state_dict()[f"model.{name}"], fake.state_dict()[name])
    assert not torch.equal(teacher.state_dict()[f"model.{name}"], gen_ema[name])
