"""The teacher's identity (teacher_fingerprint: the key of its reference samples, of stage 1 and a chain's teacher
check) covers a text teacher's encoder; stage 1 of a text preset (`sfd distil --preset colordigits`) names a valid
target."""
import copy

import pytest
import torch

from sfd import colordigits as cd
from sfd.evaluate.forgetting import teacher_fingerprint
from sfd.stage1 import stage1_config, stage1_key


def _text_teacher(seed_text: int = 0, seed_unet: int = 0):
    from sfd.denoisers.text_unet import TextEncoder, TextUNetDenoiser
    from sfd.pretrain_text import build_text_model, build_tokenizer, build_unet, edm_scheduler
    tok = build_tokenizer(cd.vocabulary())
    torch.manual_seed(seed_unet)
    unet = build_unet(channels=(8, 8), cross_attention_dim=16)
    torch.manual_seed(seed_text)
    text = build_text_model(len(tok), hidden=16)
    sched = edm_scheduler()
    return TextUNetDenoiser(unet, {"_class_name": "EDMEulerScheduler", **dict(sched.config)}, TextEncoder(tok, text))


def test_the_text_encoder_is_part_of_the_teacher_fingerprint():
    a, same = _text_teacher(0), _text_teacher(0)
    other = _text_teacher(1)                                   # the same UNet, another text encoder
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in a.state_dict().items())   # state dicts equal
    assert teacher_fingerprint(a) == teacher_fingerprint(same)          # negative control: same encoder, same key
    assert teacher_fingerprint(a) != teacher_fingerprint(other)
    # one weight of the encoder changed is enough
    nudged = _text_teacher(0)
    with torch.no_grad():
        next(nudged.text.obj.model.parameters()).view(-1)[0] += 1e-3
    assert teacher_fingerprint(nudged) != teacher_fingerprint(a)
    # and so the stage-1 key (the cache of stage 1) differs; the reference-sample cache name reads the same value
    cfg = stage1_config("colordigits", 1.0)
    assert stage1_key(cfg, a) == stage1_key(cfg, same) != stage1_key(cfg, other)
    # a clone (fake score, generator) shares the encoder: the same identity
    assert teacher_fingerprint(a.clone()) == teacher_fingerprint(a)


def test_class_teachers_keep_their_fingerprint(teacher):
    """A teacher without extra parts hashes its state dict only, as before: the bundled stage 1 is still found by
    its key (a changed fingerprint would make every sweep distil stage 1 again)."""
    import hashlib

    from sfd.presets import get_preset
    from sfd.stage1 import bundled_stage1, find_stage1
    h = hashlib.sha256()
    for k, v in sorted(teacher.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    assert teacher_fingerprint(teacher) == h.hexdigest()[:16]
    key = stage1_key(stage1_config("digits", 400, 0, fake_score_reduction="mean"), teacher)
    assert find_stage1(key, get_preset("digits")) == bundled_stage1(get_preset("digits"))


def test_stage1_config_names_a_valid_target_for_every_chaining_preset():
    from sfd.presets import get_preset
    digits = stage1_config("digits", 1.0)
    assert digits.forget == [0] and digits.override == "1"            # unchanged: the bundled stage 1's key
    cfg = stage1_config("colordigits", 1.0)
    cfg.validate(get_preset("colordigits"))                           # raised "forget: no concept given" before
    assert cfg.forget_concepts and cfg.lambda_gen_forget == 0 and cfg.lambda_fake_forget == 0


@pytest.mark.slow      # ~60 s on 2 loaded cores: the evaluation samples the text teacher
def test_sfd_distil_runs_on_colordigits(tmp_path, monkeypatch, capsys):
    from sfd.cli import main
    from sfd.io import read_json
    monkeypatch.setenv("SFD_CACHE", str(tmp_path / "cache"))
    rc = main(["distil", "--preset", "colordigits", "--kimg", "0.03", "--out", str(tmp_path / "s1"), "--no-progress",
               "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    man = read_json(tmp_path / "s1" / "stage1.json")
    assert man["config"]["preset"] == "colordigits" and man["config"]["lambda_gen_forget"] == 0
    assert man["teacher_fingerprint"] and man["key"]
    # the key is the one the sweep computes for the same settings and teacher
    from sfd.tasks import get_task
    teacher = get_task("colordigits").load_teacher(None, "cpu")
    assert man["key"] == stage1_key(stage1_config("colordigits", 0.03, 0, device="cpu"), copy.deepcopy(teacher))


def test_the_vae_is_part_of_a_stable_diffusion_teachers_fingerprint(tmp_path):
    """SD judges see the VAE's decodings: one UNet and text encoder with another VAE is another teacher (its
    stage 1 and chain check are not shared); the same folder loaded twice, or a clone, keeps one identity."""
    import shutil

    from diffusers import AutoencoderKL
    from test_sd import make_sd_folder

    from sfd.presets import get_preset
    from sfd.tasks import get_task
    folder = make_sd_folder(tmp_path / "a", "epsilon")
    other = tmp_path / "b"
    shutil.copytree(folder, other)
    vae = AutoencoderKL.from_pretrained(str(other / "vae"))
    with torch.no_grad():
        next(vae.decoder.parameters()).view(-1)[0] += 1e-3       # one decoder weight
    vae.save_pretrained(str(other / "vae"), safe_serialization=True)
    task = get_task(get_preset("sd"))
    a, same, b = task.load_teacher(folder), task.load_teacher(folder), task.load_teacher(other)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())   # UNet and prompts equal
    assert teacher_fingerprint(a) == teacher_fingerprint(same) == teacher_fingerprint(a.clone())
    assert teacher_fingerprint(a) != teacher_fingerprint(b)
