"""`sfd export`: a class-conditional run's one-step generator as a diffusers pipeline folder."""
from __future__ import annotations

import pytest
import torch

from sfd.config import SFDConfig


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from sfd.loop import train_sfd
    run = tmp_path_factory.mktemp("export") / "run"
    cfg = SFDConfig(preset="digits", forget=[0], override="1", batch_remain=4, batch_forget=4, budget_kimg=0.016,
                    eval_every_kimg=1.0, checkpoint_every_kimg=1.0, lr_gen=1e-3, lr_fake=1e-3, device="cpu", seed=0)
    train_sfd(cfg, run, progress=False, evaluate=False)
    return run


def test_export_reloads_in_two_lines_and_equals_the_generator(digits_run, tmp_path, capsys):
    from sfd.cli import main
    from sfd.denoisers import load_denoiser, load_teacher
    from sfd.export import SFDClassPipeline
    from sfd.io import read_metadata
    from sfd.iteration import one_step
    from sfd.presets import get_preset
    out = tmp_path / "exported"
    assert main(["export", "--run", str(digits_run), "--out", str(out)]) == 0
    assert "SFDClassPipeline.from_pretrained" in capsys.readouterr().out
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"model_index.json", "denoiser/config.json", "denoiser/diffusion_pytorch_model.safetensors"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".py")) for f in files)

    pipe = SFDClassPipeline.from_pretrained(str(out))                                  # the two lines
    imgs = pipe(class_labels=[3, 4], generator=torch.Generator().manual_seed(0)).images
    assert len(imgs) == 2 and imgs[0].size == (8, 8)

    gen = load_denoiser(digits_run / "generator.safetensors")
    sigma = read_metadata(digits_run / "generator.safetensors")["generator"]["sigma_init"]
    z = torch.randn(4, *gen.img_shape, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 4, 9])
    raw = pipe(class_labels=labels.tolist(), latents=z, output_type="raw").images
    with torch.no_grad():
        mine = one_step(gen, z, labels, sigma)
        teacher = one_step(load_teacher(get_preset("digits")), z, labels, sigma)
    assert torch.allclose(raw, mine, atol=1e-5)
    assert not torch.allclose(raw, teacher, atol=1e-3)          # negative control: training moved it off the teacher
    pt = pipe(class_labels=labels.tolist(), latents=z, output_type="pt").images
    assert torch.allclose(pt, ((mine + 1) / 2).clamp(0, 1), atol=1e-5)
    assert pipe.denoiser.config.info["forget"] == [0] and pipe.denoiser.config.class_names[3] == "3"

    with pytest.raises(ValueError, match=r"class ids in 0\.\.9"):
        pipe(class_labels=[10])
    assert main(["export", "--run", str(digits_run), "--out", str(out)]) == 2           # not empty: refused
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "--run", str(digits_run), "--out", str(out), "--overwrite"]) == 0
    assert main(["export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "sfd: error: --run" in capsys.readouterr().err


def test_export_help_names_the_two_lines(capsys):
    from sfd.cli import main
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    h = capsys.readouterr().out
    assert "SFDClassPipeline.from_pretrained(OUT)(class_labels=[3, 4]).images" in h and "safetensors" in h
