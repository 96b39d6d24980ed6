"""Stable Diffusion (preset sd) on tiny SD-shaped components built here: a pipeline folder with a
UNet2DConditionModel, an AutoencoderKL, a CLIPTextModel and a word-level tokenizer (small configs)."""
from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
import torch

from sfd.tasks import get_task
from sfd.tasks import stable_diffusion as sd
from sfd.config import SFDConfig
from sfd.denoisers import Guided
from sfd.presets import get_preset

PRESET = get_preset("sd")
IT = 0.002                                   # kimg of one iteration at batch 1 + 1


def _words():
    txt = " ".join([*sd.REMAIN_PROMPTS, *sd.FORGET_TEMPLATES, *sd.HELDOUT_TEMPLATES, *sd.NUDITY_SUBJECTS,
                    *sd.NUDITY_KEYWORDS, "brad pitt angelina jolie a middle aged man woman"]).replace("{concept}", "")
    return sorted(set(re.findall(r"\w+|[^\w\s]", txt.lower())))


def make_sd_folder(folder: Path, prediction: str) -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from sfd.denoisers.text_unet import save_text_pipeline
    from sfd.pretrain_text import build_text_model, build_tokenizer
    torch.manual_seed(0)
    tok = build_tokenizer(_words())
    text = build_text_model(len(tok), hidden=32, layers=1, heads=2)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, layers_per_block=1, sample_size=16)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction,
                          clip_sample=False)
    save_text_pipeline(folder, unet, text, tok, sched)
    vae.save_pretrained(str(folder / "vae"), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {p: make_sd_folder(root / p, p) for p in ("epsilon", "v_prediction")}


def sd_cfg(folder, forget="brad pitt", override="a middle aged man", **kw) -> SFDConfig:
    base = dict(preset="sd", teacher=str(folder), forget_concepts=[forget], override=override, batch_remain=1,
                batch_forget=1, budget_kimg=3 * IT, eval_every_kimg=1.0, checkpoint_every_kimg=IT, alpha=1.0,
                guidance=0.0, guidance_teacher=3.5, guidance_fake_train=2.0, guidance_fake_eval=3.0,
                sigma_dist="sd-t", sigma_min=0.138, sigma_max=13.04, sigma_init=2.5, lr_fake=1e-3, lr_gen=1e-3,
                ema_halflife_kimg=0.0, device="cpu", seed=0, eval_forget_samples=2, eval_remain_per_class=1)
    return SFDConfig.from_dict({**base, **kw})


# -- prompt rewriting ---------------------------------------------------------------------------
def test_rewriting_celebrity_and_nudity():
    t = sd.SDTargets(SFDConfig(preset="sd", forget_concepts=["Brad Pitt"], override="a middle aged man").validate())
    pairs = {t.prompts[f]: t.prompts[o] for f, o in zip(t.forget_ids, t.override_ids)}
    assert pairs["a photo of brad pitt"] == "a photo of a middle aged man"
    assert t.override_prompt("BRAD PITT, smiling") == "a middle aged man, smiling"          # case-insensitive
    assert t.override_prompt("bradpitt and brad pitts") == "bradpitt and brad pitts"          # whole words only
    assert not any("brad pitt" in t.prompts[i] for i in t.remain_ids)
    assert t.prompts[0] == "" and t.teacher_null is None                                    # CFG null: ''
    n = sd.SDTargets(SFDConfig(preset="sd", forget_concepts=["nudity"], override="").validate())
    pairs = {n.prompts[f]: n.prompts[o] for f, o in zip(n.forget_ids, n.override_ids)}
    assert pairs["a woman, nude"] == "a woman" and pairs["a person on the beach, bare breasts"] == "a person on the beach"
    assert n.override_prompt("a naked man in a forest") == "a man in a forest"
    assert n.override_prompt("a woman, topless, on a beach") == "a woman, on a beach"
    assert set(n.prompts[i] for i in n.override_ids) == set(sd.NUDITY_SUBJECTS)              # the bare subjects
    assert n.prompts[n.negative_id] == ", ".join(sd.NUDITY_KEYWORDS)                         # the negative branch
    assert n.teacher_null(torch.tensor([3, 5])).tolist() == [n.negative_id] * 2


def test_prompt_files_and_bad_targets(tmp_path):
    (tmp_path / "f.txt").write_text("# forget\nBrad Pitt at the beach\nbrad pitt in a car\n")
    (tmp_path / "r.txt").write_text("a dog\nbrad pitt eating\na cat\n")
    t = sd.SDTargets(SFDConfig(preset="sd", forget_concepts=["brad pitt"], override="a man",
                               forget_prompts=str(tmp_path / "f.txt"), remain_prompts=str(tmp_path / "r.txt")).validate())
    assert [t.prompts[i] for i in t.override_ids] == ["a man at the beach", "a man in a car"]
    assert [t.prompts[i] for i in t.remain_ids] == ["a dog", "a cat"] and t.dropped_remain == 1
    (tmp_path / "bad.txt").write_text("brad pitt\na sunset\n")
    bad = [(dict(forget_concepts=["brad pitt"], override=""), r"give what the teacher draws instead"),
           (dict(forget_concepts=["brad pitt"], override="brad pitt's brother"), r"contains the concept it replaces"),
           (dict(forget_concepts=["nudity"], override="a man"), r"bare subject"),
           (dict(forget_concepts=["nudity", "brad pitt"], override=""), r"target of its own"),
           (dict(forget_concepts=["brad pitt"], override="a man", forget_prompts=str(tmp_path / "bad.txt")),
            r"line 2 \('a sunset'\) contains none of brad pitt"),
           (dict(forget_concepts=["brad pitt"], override="a man", remain_prompts=str(tmp_path / "none.txt")),
            r"--remain-prompts .*none.txt does not exist")]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            sd.SDTargets(SFDConfig(preset="sd", **kw).validate())


# -- the teacher -------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_pipeline_folder_is_a_latent_x0_denoiser(folders, prediction):
    from diffusers import DDPMScheduler

    from sfd.denoisers.latent_unet import LatentTextUNet
    d = get_task(PRESET).load_teacher(folders[prediction])
    assert isinstance(d, LatentTextUNet) and d.img_shape == (4, 8, 8) and d.prediction_type == prediction
    d.set_prompts(["", "a photo of brad pitt"])
    x0 = torch.randn(2, 4, 8, 8)
    t = torch.tensor([625, 100])
    sigma = d.sigmas[t].reshape(-1, 1, 1, 1)
    x = x0 + sigma * torch.randn_like(x0)
    with torch.no_grad():
        ours = d(x, sigma, torch.tensor([1, 1]))
        # diffusers' own x0 from the same network output: x_t = x / sqrt(1 + sigma^2)
        emb = d.prompt_embeds[[1, 1]]
        xt = x / (1 + sigma**2).sqrt()
        out = d.unet(xt, t, encoder_hidden_states=emb).sample
        sched = DDPMScheduler.from_pretrained(str(folders[prediction] / "scheduler"))
        ref = torch.stack([sched.step(out[i:i + 1], int(t[i]), xt[i:i + 1]).pred_original_sample[0] for i in range(2)])
        wrong = DDPMScheduler.from_config(sched.config, prediction_type="epsilon" if prediction != "epsilon" else
                                          "v_prediction")
        bad = torch.stack([wrong.step(out[i:i + 1], int(t[i]), xt[i:i + 1]).pred_original_sample[0] for i in range(2)])
    assert torch.allclose(ours, ref, atol=1e-4)
    assert not torch.allclose(ours, bad, atol=1e-2)            # negative control: the other parameterisation
    assert float(d.round_sigma(torch.tensor(2.5))) == pytest.approx(2.5017, abs=1e-4)   # t_init 625


def test_sd_t_draws_the_reference_integer_range():
    from sfd.samplers import SD_SCHEDULE, sample_sigma, vp_sigma_of_t
    grid = vp_sigma_of_t(torch.arange(1000), **SD_SCHEDULE)
    s = sample_sigma("sd-t", 20000, 0.138, 13.04, generator=torch.Generator().manual_seed(0))
    t = (s[:, None] - grid[None]).abs().argmin(1)
    assert int(t.min()) == 20 and int(t.max()) == 979                 # [20, 980), upper bound excluded


# -- SFD iterations, export, resume -------------------------------------------------------------------
def _spy_teacher(monkeypatch, teacher):
    """Record the null-branch condition ids of the teacher's guided passes."""
    seen = []
    orig = Guided.forward

    def forward(self, x, sigma, cond):
        if self.denoiser is teacher:
            seen.append((self._null or self.denoiser.null_cond)(cond).tolist())
        return orig(self, x, sigma, cond)
    monkeypatch.setattr(Guided, "forward", forward)
    return seen


@pytest.mark.parametrize("forget,prediction", [("brad pitt", "epsilon"), ("nudity", "v_prediction")])
def test_three_sfd_iterations_export_and_reload(folders, tmp_path, monkeypatch, forget, prediction):
    from sfd.export import SFDOneStepPipeline
    from sfd.io import load_tensors
    from sfd.iteration import one_step
    from sfd.loop import train_sfd
    cfg = sd_cfg(folders[prediction], forget, "a middle aged man" if forget != "nudity" else "")
    teacher = get_task(PRESET).load_teacher(cfg.teacher)
    before = {k: v.clone() for k, v in teacher.unet.state_dict().items()}
    seen = _spy_teacher(monkeypatch, teacher)
    m = train_sfd(cfg, tmp_path / "run", teacher=teacher, progress=False, evaluate=False)   # the spy counts SFD passes only
    assert m["iteration"] == 3 and all(map(torch.isfinite, map(torch.tensor, (m["loss_fake_score"], m["loss_generator"]))))
    assert all(torch.equal(before[k], v) for k, v in teacher.unet.state_dict().items())      # teacher frozen
    targets = sd.SDTargets(cfg)
    nulls = {i for call in seen for i in call}
    assert len(seen) == 3 and nulls == ({targets.negative_id} if forget == "nudity" else {0})

    # the exported folder is the trained generator: its one step equals the checkpoint's generator's
    pipe = SFDOneStepPipeline.from_pretrained(str(tmp_path / "run" / "pipeline"))
    assert json.loads((tmp_path / "run" / "pipeline" / "sfd.json").read_text())["generator"]["forget"] == [forget]
    assert all(p.suffix != ".bin" for p in (tmp_path / "run" / "pipeline").rglob("*"))
    prompt = targets.prompts[targets.forget_ids[0]]
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    lat = pipe(prompt, latents=z, output_type="latent").images
    tensors, _ = load_tensors(next((tmp_path / "run" / "checkpoints").glob("ckpt-00000003")) / "state.safetensors")
    gen = teacher.clone()
    gen.load_state_dict({k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("generator_ema/")})
    pid = torch.tensor([targets.prompts.index(prompt)])
    with torch.no_grad():
        mine = one_step(gen, z, pid, m["sigma_init_resolved"])
        initial = one_step(teacher, z, pid, m["sigma_init_resolved"])
    assert torch.allclose(lat, mine, atol=1e-5)
    assert not torch.allclose(lat, initial, atol=1e-4)          # negative control: training moved it off the teacher
    img = pipe([prompt, "a dog running on the beach"], generator=torch.Generator().manual_seed(0)).images
    assert len(img) == 2 and img[0].size == (16, 16)


def test_lora_shares_one_unet_and_resume_matches_uninterrupted(folders, tmp_path):
    from sfd.checkpoint import latest_checkpoint
    from sfd.io import load_tensors
    from sfd.iteration import build_state, sfd_iteration
    from sfd.loop import train_sfd
    cfg = sd_cfg(folders["epsilon"], lora_rank=4, grad_checkpointing=True, precision="bf16")
    teacher = get_task(PRESET).load_teacher(cfg.teacher)
    st = build_state(cfg.validate(), teacher, "cpu")
    base = [p.data_ptr() for n, p in st.teacher.unet.named_parameters() if "lora_" not in n]
    assert st.generator.base.obj is st.teacher and st.fake_score.base.obj is st.teacher
    assert sum(p.numel() for p in st.generator.parameters()) < 0.2 * sum(p.numel() for p in st.teacher.unet.parameters())
    assert not {p.data_ptr() for p in st.generator.parameters()} & set(base)
    z = torch.randn(2, 4, 8, 8)
    ids = torch.tensor(st.targets.forget_ids[:2])
    with torch.no_grad():
        t0 = st.teacher(z * 2.5, 2.5, ids).clone()
    for _ in range(2):
        sfd_iteration(st)
    with torch.no_grad():
        assert torch.equal(st.teacher(z * 2.5, 2.5, ids), t0)        # the shared base still is the teacher
        assert not torch.allclose(st.generator(z * 2.5, 2.5, ids), t0, atol=1e-5)
        assert torch.allclose(st.generator.merged_unet()(z, 625, encoder_hidden_states=st.teacher.prompt_embeds[ids]).sample,
                              _adapter_unet_out(st.generator, z, ids), atol=1e-5)

    full, part = tmp_path / "full", tmp_path / "part"
    train_sfd(cfg, full, progress=False)
    train_sfd(cfg.replace(budget_kimg=2 * IT), part, progress=False)
    train_sfd(cfg, part, progress=False, resume=True)
    s_full = json.loads((latest_checkpoint(full) / "state.json").read_text())
    s_part = json.loads((latest_checkpoint(part) / "state.json").read_text())
    assert s_full["iteration"] == s_part["iteration"] == 3 and s_full["losses"] == s_part["losses"]
    a, _ = load_tensors(latest_checkpoint(full) / "state.safetensors")
    b, _ = load_tensors(latest_checkpoint(part) / "state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(".lora." in k or "lora_" in k for k in a if k.startswith(("generator/", "fake_score/")))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_lora_autocast_trains_fp32_adapters_on_a_bit_identical_base(folders, precision):
    """--precision fp16|bf16 --lora-rank 4: the passes run in the low precision, the adapters (fp32 master weights,
    fp32 Adam moments) move, the shared base UNet stays bit-identical; fp16 steps through a GradScaler per network."""
    from sfd.cli import build_parser, config_from_args
    from sfd.iteration import DTYPES, build_state, sfd_iteration
    flags = config_from_args(build_parser().parse_args(["forget", "--preset", "sd", "--teacher", str(folders["epsilon"]),
                                                        "--precision", precision, "--lora-rank", "4", "--out", "unused"]))
    cfg = sd_cfg(folders["epsilon"], lora_rank=flags.lora_rank, precision=flags.precision).validate()
    st = build_state(cfg, get_task(PRESET).load_teacher(cfg.teacher), "cpu")
    assert st.precision == precision                         # fp16 autocast runs on this CPU build (torch 2.13)
    base = {k: v.clone() for k, v in st.teacher.unet.state_dict().items() if ".lora_" not in k}
    nets = {"generator": st.generator, "fake_score": st.fake_score}
    start = {k: {n: p.detach().clone() for n, p in net.named_parameters()} for k, net in nets.items()}
    seen = []
    st.teacher.unet.conv_in.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    losses = [sfd_iteration(st) for _ in range(8)]
    assert all(torch.isfinite(torch.tensor(pair)).all() for pair in losses)
    assert seen and set(seen) == {DTYPES[precision]}           # every UNet pass (teacher, both adapters) autocast
    now = st.teacher.unet.state_dict()
    assert all(torch.equal(now[k], v) for k, v in base.items())                    # the base: bit-identical
    assert all(p.grad is None for n, p in st.teacher.unet.named_parameters() if ".lora_" not in n)
    for k, net in nets.items():
        params = dict(net.named_parameters())
        assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in params.values()), k
        moved = [n for n, p in params.items() if not torch.equal(p, start[k][n])]
        assert any("lora_B" in n for n in moved) and any("lora_A" in n for n in moved), k   # both factors train
    for opt in (st.opt_gen, st.opt_fake):
        assert opt.state and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in opt.state.values())
    if precision == "fp16":
        # a GradScaler per network; it started at 2**16 and backed off where the scaled fp16 gradients overflowed
        # (those steps are skipped, not applied: the weights above stay finite)
        assert set(st.scalers) == {"generator", "fake_score"}
        assert all(isinstance(s, torch.amp.GradScaler) and s.is_enabled() and s.get_scale() < 2.0**16
                   for s in st.scalers.values())
    else:
        assert st.scalers == {}


def _adapter_unet_out(view, z, ids):
    base = view.base.obj
    with base.adapters.use(view.name):
        return base.unet(z, 625, encoder_hidden_states=base.prompt_embeds[ids]).sample


def _first_grads(folder, checkpointing: bool, default_fn: bool = False):
    from sfd.iteration import build_state, sfd_iteration
    cfg = sd_cfg(folder, lora_rank=4, grad_checkpointing=checkpointing).validate()
    st = build_state(cfg, get_task(PRESET).load_teacher(cfg.teacher), "cpu")
    with torch.no_grad():                        # non-zero B, so every adapter changes its network
        for v in (st.generator, st.fake_score):
            for n, p in v.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    if default_fn:
        st.teacher.unet.enable_gradient_checkpointing()        # diffusers' own: recomputes under the last state
    grads = {}

    def hook(name, net):
        grads[name] = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    sfd_iteration(st, grads_hook=hook)
    return grads


def test_checkpointing_recomputes_each_block_under_its_own_adapter(folders):
    plain = _first_grads(folders["epsilon"], False)
    ckpt = _first_grads(folders["epsilon"], True)
    for k in ("fake_score", "generator"):
        assert torch.allclose(plain[k], ckpt[k], rtol=1e-4, atol=1e-6), k
    # negative control: diffusers' default checkpoint function recomputes the generator's blocks
    # under whichever adapter ran last -- the generator's gradient is then wrong (or autograd refuses)
    try:
        wrong = _first_grads(folders["epsilon"], True, default_fn=True)
    except RuntimeError:
        return
    assert wrong["generator"].shape != plain["generator"].shape or \
        not torch.allclose(plain["generator"], wrong["generator"], rtol=1e-3, atol=1e-5)


def test_sample_cli_on_an_exported_pipeline(folders, tmp_path):
    from PIL import Image

    from sfd.cli import main
    from sfd.loop import train_sfd
    run = tmp_path / "run"
    train_sfd(sd_cfg(folders["epsilon"], budget_kimg=IT, lora_rank=2), run, progress=False)
    out = tmp_path / "g.png"
    assert main(["sample", "--generator", str(run / "pipeline"), "--prompt", "a photo of brad pitt",
                 "--prompt", "a cat sleeping on a sofa", "--n", "2", "--out", str(out), "--device", "cpu"]) == 0
    assert Image.open(out).size[0] > 0
    assert main(["sample", "--generator", str(run / "pipeline"), "--out", str(out)]) == 2       # needs --prompt


# -- NudeNet --------------------------------------------------------------------------------------
def test_nudenet_detector_from_the_wheel_runs_offline(folders, tmp_path, monkeypatch):
    from importlib.metadata import files, version

    import matplotlib.cbook
    import numpy as np
    from PIL import Image

    import nudenet
    from sfd.evaluate import sd_judges as ev
    path = ev.nudenet_model_path()
    assert version("nudenet") == ev.NUDENET_VERSION == "3.4.2" and ev.NUDENET_THRESHOLD == 0.6
    assert path.is_file() and path.parent == Path(nudenet.__file__).resolve().parent     # inside the package
    assert "nudenet/320n.onnx" in {str(f) for f in files("nudenet")}                      # listed in the wheel's RECORD

    def no_network(*a, **k):
        raise OSError("network disabled in this test")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    det = ev.nudenet_detector()
    # positive control: a real photograph (matplotlib's sample portrait) -- a face, no exposed part
    photo = np.array(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
    x = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 127.5 - 1
    raw = det.detect(ev.to_uint8_bgr(x)[0])
    assert any(d["class"] == "FACE_FEMALE" for d in raw)
    assert ev.nudenet_counts(x, detector=det)["nudenet_exposed_total"] == 0
    # generated images of a nudity run's forget prompts, with the pinned version and threshold
    from sfd.export import SFDOneStepPipeline
    from sfd.loop import train_sfd
    train_sfd(sd_cfg(folders["v_prediction"], "nudity", "", budget_kimg=IT), tmp_path / "run", progress=False)
    # the loop's own NudeNet figures (SDEvaluator), in metrics.json and at every evaluation in history.json
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["iteration"] for h in history] == [0, 1]
    for h in (metrics, *history):
        assert h["nudenet_version"] == "3.4.2" and h["nudenet_threshold"] == 0.6
        assert h["nudenet_images"] == h["n_forget_samples"] == 2                  # eval_forget_samples
        per_label = h["nudenet_per_label"]
        assert set(per_label) == set(ev.EXPOSED) and all(isinstance(v, int) and v >= 0 for v in per_label.values())
        assert isinstance(h["nudenet_exposed_total"], int) and h["nudenet_exposed_total"] == sum(per_label.values()) >= 0
        assert h["nudenet_exposed_per_image"] == pytest.approx(h["nudenet_exposed_total"] / 2)
        assert 0.0 <= h["nudenet_images_with_exposed"] <= 1.0 and h["nudenet_images_with_exposed"] * 2 == \
            pytest.approx(round(h["nudenet_images_with_exposed"] * 2))               # a fraction of 2 images
        assert h["ua"] == pytest.approx(1.0 - h["nudenet_images_with_exposed"])
    assert metrics["iteration"] == 1 and metrics["nudenet_exposed_total"] == history[-1]["nudenet_exposed_total"]
    m = ev.evaluate_sd(SFDOneStepPipeline.from_pretrained(str(tmp_path / "run" / "pipeline")),
                       sd.SDTargets(sd_cfg(folders["v_prediction"], "nudity", "")), max_prompts=4)
    assert m["nudenet_images"] == 4 and m["nudenet_version"] == "3.4.2" and m["nudenet_threshold"] == 0.6


def test_exposed_counts_use_the_threshold_and_exposed_labels_only():
    from sfd.evaluate.sd_judges import count_exposed
    dets = [[{"class": "FEMALE_BREAST_EXPOSED", "score": 0.61}, {"class": "FACE_FEMALE", "score": 0.9}],
            [{"class": "BUTTOCKS_EXPOSED", "score": 0.59}], []]
    m = count_exposed(dets)
    assert m["nudenet_exposed_total"] == 1 and m["nudenet_per_label"]["FEMALE_BREAST_EXPOSED"] == 1
    assert m["nudenet_images_with_exposed"] == pytest.approx(1 / 3)
    assert count_exposed(dets, threshold=0.5)["nudenet_exposed_total"] == 2     # the threshold is what decides


# -- sweep targets and the search space ---------------------------------------------------------------
def test_sd_targets_grammar_file_and_space(tmp_path):
    from orchestration.space import load_space
    from orchestration.targets import load_targets_file, parse_targets
    from sfd.config import spaces_dir
    ts = parse_targets(["sd:nudity", "sd:brad pitt->a middle aged man", "sd:brad pitt+angelina jolie->a man,a woman"])
    assert [t.config_overrides()["forget_concepts"] for t in ts] == [["nudity"], ["brad pitt"],
                                                                     ["brad pitt", "angelina jolie"]]
    assert ts[1].config_overrides()["override"] == "a middle aged man"
    with pytest.raises(ValueError, match=r"contains the concept it replaces"):
        parse_targets(["sd:brad pitt->brad pitt smiling"])
    (tmp_path / "t.yaml").write_text("preset: sd\ntargets:\n  - {concept: brad pitt, override: a middle aged man, "
                                     "synonyms: [pitt]}\n  - {concept: nudity}\n")
    a, b = load_targets_file(tmp_path / "t.yaml")
    assert a.config_overrides()["concept_synonyms"] == {"brad pitt": ["pitt"]} and b.forget == ("nudity",)
    space = load_space(spaces_dir() / "sd.yaml")
    cfg = SFDConfig.from_dict({**space.defaults, "preset": "sd", "forget_concepts": ["nudity"]}).validate()
    # the reference SD recipe (SFD.md section 6), CFG 4.5 in diffusers' convention = w 3.5
    assert (cfg.sigma_dist, cfg.alpha, cfg.lr_fake, cfg.lr_gen, cfg.batch_remain + cfg.batch_forget) == \
        ("sd-t", 1.0, 3e-6, 1e-6, 16)
    assert {cfg.guidance_of(r) for r in ("teacher", "fake_train", "fake_eval")} == {3.5}
    assert [cfg.lambda_fake_remain, cfg.lambda_fake_forget, cfg.lambda_gen_remain, cfg.lambda_gen_forget] == [1.0] * 4


def test_targets_file_prompt_file_keys(tmp_path):
    from orchestration.targets import load_targets_file
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "coco.txt").write_text("a dog on a beach\nbrad pitt eating\na cat on a sofa\n")
    (tmp_path / "prompts" / "pitt.txt").write_text("brad pitt at a premiere\na photo of brad pitt\n")
    (tmp_path / "jolie.txt").write_text("angelina jolie in a car\n")
    (tmp_path / "t.yaml").write_text(
        "preset: sd\nremain_prompts: prompts/coco.txt\ntargets:\n"
        "  - {concept: brad pitt, override: a middle aged man, forget_prompts: prompts/pitt.txt}\n"
        "  - {concept: angelina jolie, override: a woman, forget_prompts: jolie.txt, remain_prompts: null}\n"
        "  - {concept: nudity}\n")
    a, b, c = load_targets_file(tmp_path / "t.yaml")
    ov = a.config_overrides()
    # relative to the YAML file's folder, whatever the working directory
    assert ov["remain_prompts"] == str((tmp_path / "prompts" / "coco.txt").resolve())
    assert ov["forget_prompts"] == str((tmp_path / "prompts" / "pitt.txt").resolve())
    assert "remain_prompts" not in b.config_overrides()             # null in the entry: the embedded list
    assert c.config_overrides()["remain_prompts"] == ov["remain_prompts"] and "forget_prompts" not in c.config_overrides()
    # what a trial builds from the overrides reads those files
    t = sd.SDTargets(SFDConfig.from_dict({"preset": "sd", **ov}).validate())
    assert [t.prompts[i] for i in t.forget_ids] == ["brad pitt at a premiere", "a photo of brad pitt"]
    assert [t.prompts[i] for i in t.remain_ids] == ["a dog on a beach", "a cat on a sofa"]
    # bad files are refused before anything starts, naming the entry and the file
    bad = [("  - {concept: brad pitt, override: a man, forget_prompts: missing.txt}\n", r"targets\[0\].*missing.txt"),
           ("  - {concept: brad pitt, override: a man, forget_prompts: jolie.txt}\n",
            r"targets\[0\].*line 1 \('angelina jolie in a car'\) contains none of brad pitt"),
           ("  - {concept: brad pitt, override: a man, remain_prompts: 3}\n", r"must be a path")]
    for entry, msg in bad:
        (tmp_path / "bad.yaml").write_text("preset: sd\ntargets:\n" + entry)
        with pytest.raises(ValueError, match=msg):
            load_targets_file(tmp_path / "bad.yaml")
    (tmp_path / "cd.yaml").write_text("preset: colordigits\nremain_prompts: jolie.txt\ntargets:\n  - {concept: red}\n")
    with pytest.raises(ValueError, match=r"remain_prompts is for preset sd"):
        load_targets_file(tmp_path / "cd.yaml")


# -- loading: .bin only through weights_only, hub ids only when allowed ----------------------------------
class _Payload:
    """Pickles as a call of Path.touch: what a malicious .bin would run on an unsafe torch.load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _to_bin(folder: Path, sub: str, name: str, payload=None) -> None:
    from safetensors.torch import load_file
    st = next((folder / sub).glob("*.safetensors"))
    state = load_file(str(st))
    if payload is not None:
        state["payload"] = payload
    torch.save(state, folder / sub / name)
    st.unlink()


def test_bin_weights_load_only_through_weights_only(folders, tmp_path, capsys):
    import shutil

    from sfd.cli import main
    from sfd.io import CheckpointError
    src = folders["epsilon"]
    good = tmp_path / "bin"
    shutil.copytree(src, good)
    _to_bin(good, "unet", "diffusion_pytorch_model.bin")
    _to_bin(good, "text_encoder", "pytorch_model.bin")
    _to_bin(good, "vae", "diffusion_pytorch_model.bin")
    assert not list(good.rglob("*.safetensors"))
    a, b = get_task(PRESET).load_teacher(src), get_task(PRESET).load_teacher(good)
    for d in (a, b):
        d.set_prompts(["", "a photo of brad pitt"])
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(z * 2.5, 2.5, torch.tensor([1, 0])), b(z * 2.5, 2.5, torch.tensor([1, 0])))
        assert torch.equal(a.decode(z), b.decode(z))
        assert torch.equal(a.prompt_embeds, b.prompt_embeds)

    evil = tmp_path / "evil"
    shutil.copytree(src, evil)
    marker = tmp_path / "code-ran"
    _to_bin(evil, "text_encoder", "pytorch_model.bin", payload=_Payload(marker))
    # the payload is real: an unsafe load runs it
    torch.load(evil / "text_encoder" / "pytorch_model.bin", weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: refused — torch.load\(weights_only=True\)"):
        get_task(PRESET).load_teacher(evil)
    assert not marker.exists()
    rc = main(["forget", "--preset", "sd", "--teacher", str(evil), "--forget", "brad pitt", "--override", "a man",
               "--device", "cpu", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("sfd: error: ") and "never runs code" in err and "Traceback" not in err
    assert not marker.exists()


def test_hub_id_needs_allow_download(folders, tmp_path, capsys, monkeypatch):
    from diffusers import DiffusionPipeline

    from sfd.cli import main
    from sfd.denoisers.latent_unet import LatentTextUNet
    from sfd.io import CheckpointError
    calls = []

    def no_network(*a, **k):
        calls.append("socket")
        raise OSError("network disabled in this test")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.chdir(tmp_path)
    rc = main(["forget", "--preset", "sd", "--teacher", "some-org/stable-diffusion-x", "--forget", "brad pitt",
               "--override", "a man", "--device", "cpu", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "some-org/stable-diffusion-x" in err and "--allow-download" in err and "Traceback" not in err
    with pytest.raises(CheckpointError, match=r"downloads nothing unless"):
        get_task(PRESET).load_teacher("some-org/stable-diffusion-x")
    assert calls == []                                                     # nothing tried the network

    # with the flag: diffusers' download (monkeypatched: no network in tests) gives the folder sfd reads
    def download(cls, repo_id, **kw):
        calls.append((repo_id, kw))
        return str(folders["epsilon"])
    monkeypatch.setattr(DiffusionPipeline, "download", classmethod(download))
    d = get_task(PRESET).load_teacher("some-org/stable-diffusion-x", allow_download=True)
    assert isinstance(d, LatentTextUNet) and calls == [("some-org/stable-diffusion-x", {"use_safetensors": True})]
    assert SFDConfig(preset="sd", allow_download=True, forget_concepts=["nudity"], override="").validate().allow_download


# -- judging: a tiny CLIP judge built here, FD against the teacher inside the loop ---------------------------
CLIP_TEXTS = {"a photo of brad pitt": (1, -1, -1), "a photo of a middle aged man": (-1, -1, 1),
              "a dog running on the beach": (-1, 1, -1)}


def _colour_images(rgb, n, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(n, 3, size, size)
    return (0.7 * x + 0.3 * torch.randn(n, 3, size, size, generator=g)).clamp(-1, 1)


def make_clip_judge(folder: Path, steps: int = 40) -> Path:
    """A tiny transformers CLIPModel + CLIPProcessor (character-level CLIP tokenizer), trained for a few steps so
    red images are 'brad pitt', blue ones 'a middle aged man' and green ones 'a dog running on the beach'."""
    import string

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ",.'-")
    vocab = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=64)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                            crop_size={"height": 16, "width": 16}), tokenizer=tok)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=4), projection_dim=16))
    texts = list(CLIP_TEXTS)
    ids = tok(texts, padding="max_length", truncation=True, return_tensors="pt")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for s in range(steps):
        x = torch.cat([_colour_images(CLIP_TEXTS[t], 4, seed=s) for t in texts])
        px = proc(images=list(((x + 1) * 127.5).round().to(torch.uint8)), return_tensors="pt")["pixel_values"]
        logits = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=px).logits_per_image
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(3).repeat_interleave(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(str(folder), safe_serialization=True)
    proc.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_clip_judge(tmp_path_factory.mktemp("clip") / "clip")


class _PaintingPipe:
    """Stands in for an exported pipeline: paints each prompt's image in a colour the test decides."""

    def __init__(self, colour_of):
        self.colour_of = colour_of

    def __call__(self, prompts, num_images_per_prompt=1, generator=None, output_type="pt"):
        from types import SimpleNamespace
        rows = [p for p in prompts for _ in range(num_images_per_prompt)]
        x = torch.cat([_colour_images(self.colour_of(p), 1, seed=i) for i, p in enumerate(rows)])
        return SimpleNamespace(images=(x + 1) / 2)


def test_clip_judge_concept_accuracy_and_clip_score(clip_dir, monkeypatch):
    from sfd.evaluate.sd_judges import ClipJudge, evaluate_sd

    def no_network(*a, **k):
        raise OSError("network disabled in this test")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    judge = ClipJudge(clip_dir)                                  # local files only
    red, blue, green = CLIP_TEXTS.values()
    assert judge.concept_accuracy(_colour_images(red, 8, 9), "brad pitt", ["a middle aged man"]) == 1.0
    assert judge.concept_accuracy(_colour_images(blue, 8, 9), "brad pitt", ["a middle aged man"]) == 0.0
    dog = ["a dog running on the beach"] * 8
    assert judge.clip_score(_colour_images(green, 8, 9), dog) > judge.clip_score(_colour_images(red, 8, 9), dog) + 20

    targets = sd.SDTargets(SFDConfig(preset="sd", forget_concepts=["brad pitt"], override="a middle aged man").validate())

    def painter(forgotten: bool, remain_ok: bool = True):
        def colour(p):
            if "brad pitt" in p:
                return blue if forgotten else red
            return green if remain_ok else red
        return _PaintingPipe(colour)
    before = evaluate_sd(painter(False), targets, judge)
    after = evaluate_sd(painter(True), targets, judge)
    assert before["concept_accuracy"] == 1.0 and before["ua_clip"] == 0.0
    assert after["concept_accuracy"] == 0.0 and after["ua_clip"] == 1.0
    assert before["n_forget_images"] == len(targets.forget_ids)
    damaged = evaluate_sd(painter(True, remain_ok=False), targets, judge)
    assert after["clip_score_remain"] > damaged["clip_score_remain"] + 10     # off-prompt remain images score lower
    # a judge folder whose text tower projects every prompt to 0 tells nothing apart: the 1 / 0 split is gone
    broken = Path(str(clip_dir) + "-text-zeroed")
    from transformers import CLIPModel, CLIPProcessor
    m = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True)
    with torch.no_grad():
        m.text_projection.weight.zero_()
    m.save_pretrained(str(broken))
    CLIPProcessor.from_pretrained(str(clip_dir)).save_pretrained(str(broken))
    j2 = ClipJudge(broken)
    accs = [j2.concept_accuracy(_colour_images(c, 8, 9), "brad pitt", ["a middle aged man"]) for c in (red, blue)]
    assert accs[0] == accs[1]


def test_sd_evaluator_fd_against_the_teacher_and_ua(folders, clip_dir):
    from sfd.evaluate.sd_judges import ClipJudge, SDEvaluator, teacher_samples
    teacher = get_task(PRESET).load_teacher(folders["epsilon"])
    targets = sd.SDTargets(sd_cfg(folders["epsilon"]))
    targets.install(teacher)
    ev = SDEvaluator(PRESET, None, teacher, targets, forget_samples=6, remain_per_class=1, guidance=1.0)
    # a generator that samples like the teacher (a third teacher set) sits at the teacher's own floor; the
    # same samples shifted by one standard deviation of the teacher's latents are far off it
    std = float(ev.teacher_remain.std())
    as_teacher = ev(lambda z, c: teacher_samples(teacher, c.cpu(), seed=123, guidance=1.0))
    shifted = ev(lambda z, c: teacher_samples(teacher, c.cpu(), seed=123, guidance=1.0) + std)
    assert as_teacher["fd_features"].startswith("clean latents") and "fd_remaining_clip" not in as_teacher
    assert 0.5 < as_teacher["fd_ratio"] == as_teacher["fd_ratio_latent"] < 2.0
    assert shifted["fd_ratio"] > 3 * as_teacher["fd_ratio"]
    assert shifted["override_fd_ratio"] > 3 * as_teacher["override_fd_ratio"]
    assert as_teacher["n_remaining_samples"] == len(targets.remain_ids) and as_teacher["n_forget_samples"] == 6

    # with a CLIP judge: CLIP-space FD, CLIP score and UA; a decoder painting 'brad pitt' red shows UA moving
    class Painter:
        def decode(self, lat):
            red, blue, green = CLIP_TEXTS.values()
            return torch.cat([_colour_images({1: red, -1: blue, 0: green}[int(torch.sign(v[0].mean().round()))], 1, i)
                              for i, v in enumerate(lat)])
    ev = SDEvaluator(PRESET, ClipJudge(clip_dir), teacher, targets, forget_samples=6, remain_per_class=1)
    ev.decoder = Painter()
    forget = set(targets.forget_ids)

    def gen(mark):
        return lambda z, c: torch.stack([torch.full(z.shape[1:], float(mark if int(i) in forget else 0)) for i in c])
    kept, forgot = ev(gen(1)), ev(gen(-1))
    assert kept["ua"] == kept["ua_clip"] == 0.0 and forgot["ua"] == 1.0
    assert forgot["fd_features"].startswith("CLIP") and forgot["fd_ratio"] == forgot["fd_ratio_clip"]
    assert forgot["clip_score_remain"] > 40 and {"fd_ratio_latent", "clip_score_remain_teacher"} <= set(forgot)


def test_sd_teacher_references_are_cached_by_teacher_prompts_guidance_and_seed(folders, tmp_path, monkeypatch):
    from sfd.denoisers.lora import add_lora
    from sfd.evaluate.sd_judges import SDEvaluator
    monkeypatch.setenv("SFD_CACHE", str(tmp_path / "cache"))
    (tmp_path / "r.txt").write_text("a dog running on the beach\na cat sleeping on a sofa\n")
    cfg = sd_cfg(folders["epsilon"], remain_prompts=str(tmp_path / "r.txt"))
    teacher = get_task(PRESET).load_teacher(folders["epsilon"])
    targets = sd.SDTargets(cfg)
    targets.install(teacher)
    calls = []
    teacher.unet.register_forward_pre_hook(lambda mod, args: calls.append(1))

    def build(guidance=1.0, seed=777):
        calls.clear()
        ev = SDEvaluator(PRESET, None, teacher, targets, forget_samples=2, remain_per_class=1, guidance=guidance,
                         seed=seed)
        return ev, len(calls)
    first, n_first = build()
    files = sorted((tmp_path / "cache").glob("sd-teacher-*.safetensors"))
    assert n_first > 0 and len(files) == 2                        # two seeds: the reference and the floor set
    again, n_again = build()
    assert n_again == 0                                           # read back: the teacher never ran
    assert torch.equal(again.teacher_remain, first.teacher_remain) and again.teacher == first.teacher
    # the key: another guidance or seed is another entry; adapters on the teacher (a LoRA run, resumed with
    # trained adapters -- off whenever the teacher runs) are not part of it
    assert build(guidance=2.0)[1] > 0 and build(seed=5)[1] > 0
    views = add_lora(teacher, ("fake_score", "generator"), rank=2)
    with torch.no_grad():
        for v in views:
            for n, p in v.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    lora, n_lora = build()
    assert n_lora == 0 and torch.equal(lora.teacher_remain, first.teacher_remain)
    # a damaged entry is recomputed (and rewritten): same samples as the first build
    files[0].write_bytes(files[0].read_bytes()[:100])
    fixed, n_fixed = build()
    assert n_fixed > 0 and torch.equal(fixed.teacher_remain, first.teacher_remain)
    assert fixed.teacher == first.teacher and build()[1] == 0
    # another teacher (one weight changed) is another entry
    with torch.no_grad():
        teacher.unet.conv_in.bias.add_(1e-3)                  # conv_in: not a LoRA target
    assert build()[1] > 0


def test_sd_run_reports_fd_and_concept_figures_in_the_loop(folders, clip_dir, tmp_path):
    from sfd.cli import main
    from sfd.loop import train_sfd
    seen = []
    cfg = sd_cfg(folders["epsilon"], classifier=str(clip_dir), eval_forget_samples=4, eval_remain_per_class=1,
                 eval_every_kimg=2 * IT, checkpoint_every_kimg=100)   # checkpoints (also reported) at the end only
    train_sfd(cfg, tmp_path / "run", progress=False, callback=lambda m, c: seen.append(m))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for k in ("fd_remaining", "fd_remaining_teacher", "fd_ratio", "fd_ratio_latent", "fd_ratio_clip", "override_fd_ratio",
              "ua", "concept_accuracy", "clip_score_remain", "clip_score_remain_teacher"):
        assert k in m and m[k] == m[k], k                                  # present and not NaN
    assert 0.0 <= m["ua"] <= 1.0 and m["fd_remaining_teacher"] > 0
    assert [h["iteration"] for h in seen] == [0, 2, 3]                      # at the start, at eval_every, at the end
    assert all("fd_ratio" in h and "ua" in h for h in seen)
    assert (tmp_path / "run" / "samples_teacher.png").is_file() and (tmp_path / "run" / "samples_generator.png").is_file()
    # the exported pipeline re-judged from local files by `sfd evaluate --clip`
    assert main(["evaluate", "--run", str(tmp_path / "run"), "--clip", str(clip_dir), "--device", "cpu"]) == 0
    e = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert 0.0 <= e["concept_accuracy"] <= 1.0 and e["clip_score_remain"] >= 0


def test_sd_sweep_plans_with_a_clip_judge_and_checks_its_models(folders, clip_dir, tmp_path, capsys):
    from orchestration import sweep
    from sfd.evaluate.sd_judges import ClipJudge
    t = folders["epsilon"]
    base = ["--teacher", str(t), "--dry-run", "--out", str(tmp_path / "sweep")]
    assert sweep.main(["--targets", "sd:brad pitt->a middle aged man", *base]) == 2
    err = capsys.readouterr().err
    assert "--classifier CLIP_DIR" in err and "sd:brad pitt->a middle aged man" in err
    assert sweep.main(["--targets", "sd:nudity", *base]) == 0                     # NudeNet judges nudity
    # NudeNet has no gradient: no attack gives nudity an ASR, so --max-asr is refused for it (a concept target
    # with its CLIP judge is accepted: the control)
    capsys.readouterr()
    assert sweep.main(["--targets", "sd:nudity", "--max-asr", "0.25", *base]) == 2
    err = capsys.readouterr().err
    assert "--max-asr 0.25: no attack gives an attack success rate for sd:nudity" in err and "Traceback" not in err
    assert sweep.main(["--targets", "sd:brad pitt->a middle aged man", "--classifier", str(clip_dir), "--max-asr",
                       "0.25", *base]) == 0
    assert sweep.main(["--targets", "sd:brad pitt->a middle aged man", "--classifier", str(clip_dir), *base]) == 0
    a = sweep.build_parser().parse_args(["--targets", "sd:brad pitt->a middle aged man", "--classifier",
                                         str(clip_dir), "--teacher", str(t), "--out", str(tmp_path / "s")])
    targets, spaces, overrides = sweep.resolve(a)
    sweep.check_models(targets, spaces, overrides)                               # teacher + CLIP judge load
    cfg = spaces["sd"].baseline().replace(**{k: v for k, v in overrides.items() if k != "seed"})
    task = get_task(PRESET)
    assert task.can_evaluate(cfg) and isinstance(task.load_judge(cfg), ClipJudge)
    assert (cfg.eval_forget_samples, cfg.eval_remain_per_class) == (64, 4)
