"""Text in, image out: a text-conditioned (colordigits) run exports as a diffusers pipeline folder that carries
its text encoder and tokenizer and takes any prompt; `sfd sample` does the same from the run folder."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from sfd.config import SFDConfig


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """Two SFD iterations on colordigits (forget seven -> one): enough to move the generator off the teacher."""
    from sfd.loop import train_sfd
    run = tmp_path_factory.mktemp("text") / "run"
    cfg = SFDConfig(preset="colordigits", forget_concepts=["seven"], override="one", batch_remain=4, batch_forget=4,
                    budget_kimg=0.016, eval_every_kimg=1.0, checkpoint_every_kimg=1.0, lr_gen=1e-3, lr_fake=1e-3,
                    device="cpu", seed=0)
    train_sfd(cfg, run, progress=False, evaluate=False, measure_speed=False)
    return run


@pytest.fixture(scope="module")
def exported(text_run, tmp_path_factory):
    from sfd.cli import main
    out = tmp_path_factory.mktemp("export") / "pipe"
    assert main(["export", "--run", str(text_run), "--out", str(out)]) == 0
    return out


def _sample_cli(generator, tmp_path, *prompts, n=2, seed=5, name="s"):
    from sfd.cli import main
    from sfd.io import load_tensors
    args = ["sample", "--generator", str(generator), "--n", str(n), "--seed", str(seed), "--device", "cpu",
            "--out", str(tmp_path / f"{name}.safetensors")]
    for p in prompts:
        args += ["--prompt", p]
    assert main(args) == 0
    return load_tensors(tmp_path / f"{name}.safetensors")[0]["images"]


def test_export_is_a_pipeline_folder_that_equals_the_run(text_run, exported, tmp_path):
    from sfd.denoisers import load_denoiser, load_teacher
    from sfd.export import SFDTextPipeline
    from sfd.io import read_metadata
    from sfd.iteration import one_step
    from sfd.presets import get_preset
    files = {p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()}
    assert {"model_index.json", "sfd.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/tokenizer.json",
            "scheduler/scheduler_config.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".py")) for f in files)
    sigma = read_metadata(text_run / "generator.safetensors")["generator"]["sigma_init"]
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "SFDTextPipeline" and index["sigma_init"] == pytest.approx(sigma)
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]

    pipe = SFDTextPipeline.from_pretrained(str(exported))                        # the two lines
    imgs = pipe(prompt="red seven", generator=torch.Generator().manual_seed(0)).images
    assert len(imgs) == 1 and imgs[0].size == (8, 8) and imgs[0].mode == "RGB"
    assert pipe(prompt="red seven", output_type="np").images.shape == (1, 8, 8, 3)

    # the export, the run folder and generator.safetensors sample the same images for the same seed
    want = pipe(prompt="red seven", num_images_per_prompt=2, generator=torch.Generator().manual_seed(5),
                output_type="pt").images * 2 - 1
    for source in (text_run, text_run / "generator.safetensors", exported):
        got = _sample_cli(source, tmp_path, "red seven")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    # free text reaches the UNet as the training did: a prompt of the run's table, encoded now, gives exactly what
    # the run's generator gives with its cached table embedding (sfd.iteration.one_step on the prompt id)
    gen = load_denoiser(text_run / "generator.safetensors")
    z = torch.randn(2, *gen.img_shape, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([gen.prompts.index("a red seven"), gen.prompts.index("the digit 3 in blue ink")])
    raw = pipe(prompt=["a red seven", "the digit 3 in blue ink"], latents=z, output_type="raw").images
    with torch.no_grad():
        mine = one_step(gen, z, ids, sigma)
        teacher = load_teacher(get_preset("colordigits"))
        teacher.set_prompts(gen.prompts)
        theirs = one_step(teacher, z, ids, sigma)
    torch.testing.assert_close(raw, mine, atol=1e-5, rtol=0)
    assert not torch.allclose(raw, theirs, atol=1e-3)          # negative control: the export is the trained generator
    sfd = json.loads((exported / "sfd.json").read_text())
    assert sfd["generator"]["forget"] == ["seven"] and sfd["teacher"] == "the bundled 'colordigits' teacher"


def test_free_text_is_encoded_not_looked_up(text_run, exported, tmp_path):
    from sfd.denoisers import load_denoiser
    from sfd.export import SFDTextPipeline
    table = load_denoiser(text_run / "generator.safetensors").prompts
    assert "seven in red ink" not in table and "red seven" not in table and "RED Seven" not in table
    pipe = SFDTextPipeline.from_pretrained(str(exported))
    z = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))

    def raw(prompt):
        return pipe(prompt=prompt, latents=z, output_type="raw").images
    assert torch.equal(raw("RED Seven"), raw("red seven"))                 # case as the tokenizer normalises it
    assert not torch.allclose(raw("a red seven"), raw("a blue seven"), atol=1e-3)     # the words steer the image
    assert not torch.allclose(raw("seven in red ink"), raw(""), atol=1e-3)
    both = pipe(prompt=["a red seven", "seven in red ink"], latents=z.repeat(2, 1, 1, 1), output_type="raw").images
    torch.testing.assert_close(both, torch.cat([raw("a red seven"), raw("seven in red ink")]), atol=1e-5, rtol=0)
    out = _sample_cli(text_run, tmp_path, "seven in red ink", "RED Seven", n=1, name="free")
    assert out.shape == (2, 3, 8, 8)


def test_unknown_words_are_reported_not_dropped(text_run, exported, tmp_path, capsys):
    from sfd.cli import main
    from sfd.export import PromptWarning, SFDTextPipeline
    pipe = SFDTextPipeline.from_pretrained(str(exported))
    with pytest.warns(PromptWarning, match=r"prompt 'a Purple seven': 'Purple' is not in the tokenizer's vocabulary "
                                           r"\(it maps to \[UNK\]\) — known words: .*\bred\b"):
        imgs = pipe(prompt=["a Purple seven", "a red seven"], output_type="pt").images
    assert imgs.shape == (2, 3, 8, 8)                                     # warned, still sampled
    with pytest.raises(ValueError, match="'purple', 'mauve' are not in the tokenizer's vocabulary"):
        pipe(prompt="a purple mauve seven", strict=True)
    with pytest.warns(PromptWarning, match="is cut off"):                # past the 10 words the encoder reads
        pipe(prompt="a red seven " * 5, output_type="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptWarning)
        pipe(prompt=["a red seven", "Seven, in RED ink"], output_type="pt")       # known words: no warning
    capsys.readouterr()
    assert main(["sample", "--generator", str(text_run), "--prompt", "a purple seven", "--prompt", "a red one",
                 "--n", "1", "--device", "cpu", "--out", str(tmp_path / "u.png")]) == 0
    err = capsys.readouterr().err
    assert "note: prompt 'a purple seven': 'purple' is not in the tokenizer's vocabulary (it maps to [UNK])" in err
    assert "a red one" not in err and (tmp_path / "u.png").is_file()


@pytest.mark.parametrize("which", ["run", "export"])
def test_classes_on_a_text_generator_is_refused(text_run, exported, tmp_path, capsys, which):
    from sfd.cli import main
    gen = text_run if which == "run" else exported
    capsys.readouterr()
    assert main(["sample", "--generator", str(gen), "--classes", "3", "--device", "cpu",
                 "--out", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert f"sfd: error: --classes 3: --generator {gen} is text-conditioned; give --prompt" in err
    assert "Traceback" not in err and not (tmp_path / "c.png").exists()
    assert main(["sample", "--generator", str(gen), "--device", "cpu", "--out", str(tmp_path / "c.png")]) == 2
    assert "give at least one --prompt" in capsys.readouterr().err


def test_prompt_ids_out_of_range_are_refused(text_run, tmp_path):
    from sfd.denoisers import load_denoiser
    from sfd.export import SFDClassPipeline, SFDOneStepGenerator, export_class_run
    from sfd.io import CheckpointError, read_metadata
    gen = load_denoiser(text_run / "generator.safetensors").eval()
    n = len(gen.prompts)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert gen(x, 2.5, torch.tensor([n - 1])).shape == (1, 3, 8, 8)
        for bad in (n, 10000, -1):
            with pytest.raises(ValueError, match=rf"prompt id {bad} is not in this generator's prompt table "
                                                 rf"\(ids 0\.\.{n - 1}\)"):
                gen(x, 2.5, torch.tensor([0, bad]))
    # an id-based class export of a text generator is refused; one built by hand (as exports were) refuses bad ids
    with pytest.raises(CheckpointError, match="is text-conditioned"):
        export_class_run(text_run / "generator.safetensors", tmp_path / "cls")
    sigma = read_metadata(text_run / "generator.safetensors")["generator"]["sigma_init"]
    model = SFDOneStepGenerator(spec=dict(gen.spec), sigma_init=sigma)
    model.denoiser.load_state_dict(gen.state_dict())
    pipe = SFDClassPipeline(denoiser=model.eval())
    with pytest.raises(ValueError, match=rf"prompt id -1 is not in .*ids 0\.\.{n - 1}"):
        pipe(class_labels=[-1])


def test_a_run_whose_teacher_encoder_differs_is_refused(text_run, tmp_path):
    """The run's cached prompt embeddings check the text encoder: another teacher would encode free text wrongly."""
    import shutil

    from sfd.colordigits import vocabulary
    from sfd.denoisers.text_unet import save_text_pipeline
    from sfd.export import load_text_generator
    from sfd.io import CheckpointError
    from sfd.pretrain_text import build_text_model, build_tokenizer, build_unet, edm_scheduler
    torch.manual_seed(0)
    tok = build_tokenizer(vocabulary())
    other = save_text_pipeline(tmp_path / "other", build_unet(channels=(8, 8), cross_attention_dim=64),
                               build_text_model(len(tok)), tok, edm_scheduler())
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(text_run / "generator.safetensors", run)
    rec = json.loads((text_run / "run.json").read_text())
    rec["config"]["teacher"] = str(other)
    (run / "run.json").write_text(json.dumps(rec))
    with pytest.raises(CheckpointError, match=rf"the text encoder of {other} does not reproduce the prompt "
                                              rf"embeddings .* its run used another teacher"):
        load_text_generator(run)
    rec["config"]["teacher"] = str(tmp_path / "gone")
    (run / "run.json").write_text(json.dumps(rec))
    with pytest.raises(CheckpointError, match=r"needs the text encoder and tokenizer of the teacher its run used "
                                              r"\(.*gone\)"):
        load_text_generator(run)
