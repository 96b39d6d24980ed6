"""Issue #10, the `sfd` side: every bad input is rejected before work starts (`sfd: error: ...`,
exit 2, the bad value named, nothing pre-existing changed), checkpoints recover, records tell
the truth. Runs are tiny: 2-3 iterations at batch 4 + 4 without evaluation."""
import copy
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from sfd.checkpoint import latest_checkpoint, resolve_checkpoint
from sfd.cli import build_parser, config_from_args, main
from sfd.config import SFDConfig
from sfd.io import CheckpointError, load_tensors, save_tensors
from sfd.loop import train_sfd

IT_KIMG = 0.008          # batch 4 + 4


def tiny(iters: int, **kw) -> SFDConfig:
    base = dict(batch_remain=4, batch_forget=4, budget_kimg=round(iters * IT_KIMG, 9), eval_every_kimg=IT_KIMG,
                checkpoint_every_kimg=IT_KIMG, eval_forget_samples=10, eval_remain_per_class=2, device="cpu")
    base.update(kw)
    # the preset's defaults first, as `sfd forget` resolves them, so a CLI resume sees the same run
    from sfd.config import config_for_preset
    return config_for_preset("digits", **base)


def digest(path: Path) -> dict:
    """Every file and folder under ``path`` (or the file itself) -> sha256 / 'dir'."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    d = tmp_path_factory.getbasetemp() / "sfd_cache_bad_inputs"
    d.mkdir(exist_ok=True)
    monkeypatch.setenv("SFD_CACHE", str(d))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, teacher):
    """A finished 2-iteration run: run.json, checkpoints ckpt-1 and ckpt-2, latest, generator, metrics."""
    out = tmp_path_factory.mktemp("bad_inputs") / "run"
    train_sfd(tiny(2), out, teacher=copy.deepcopy(teacher), evaluate=False, progress=False)
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return dst


def cli_error(capsys, argv) -> str:
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc == 2, (rc, cap.out[-2000:], cap.err[-2000:])
    assert "Traceback" not in cap.err
    lines = [ln for ln in cap.err.splitlines() if ln.startswith("sfd")]
    assert lines and lines[-1].startswith("sfd: error: "), cap.err
    return cap.err


# ---------------------------------------------------------------------------------------
# sfd forget: every setting checked before any work (the --out folder is never created)

FORGET_CASES = [
    (["--forget", "cat"], ["'cat'", "valid classes"]),
    (["--forget", ""], ["no class given"]),
    (["--forget", "12"], ["12", "valid classes"]),
    (["--forget", "0,,1"], ["empty entry"]),
    (["--forget", "0", "--override", "banana"], ["banana"]),
    (["--forget", "0", "--override", "0"], ["override class 0", "forgotten"]),
    (["--sigma-init", "1e30"], ["sigma_init", "1e+30", "(0, 1000]"]),
    (["--sigma-init", "0"], ["sigma_init", "0.0"]),
    (["--sigma-init", "inf"], ["sigma_init", "inf"]),
    (["--sigma-init", "-2.5"], ["sigma_init", "-2.5"]),
    (["--sigma-min", "20"], ["sigma_min", "20"]),
    (["--sigma-max", "nan"], ["sigma_max", "nan"]),
    (["--lr-gen", "nan"], ["lr_gen", "nan"]),
    (["--lr-gen", "0"], ["lr_gen", "0.0"]),
    (["--lr-fake=-1e-4"], ["lr_fake", "-0.0001"]),
    (["--lr-fake", "inf"], ["lr_fake", "inf"]),
    (["--alpha", "inf"], ["alpha", "inf"]),
    (["--alpha=-inf"], ["alpha", "-inf"]),
    (["--lambda-gen-forget", "-1"], ["lambda_gen_forget", "-1.0"]),
    (["--lambda-fake-remain", "nan"], ["lambda_fake_remain", "nan"]),
    (["--guidance", "nan"], ["guidance", "nan"]),
    (["--budget-kimg", "0"], ["budget_kimg", "0.0"]),
    (["--budget-kimg=-inf"], ["budget_kimg", "-inf"]),
    (["--max-seconds", "-5"], ["max_seconds", "-5.0"]),
    (["--eval-every-kimg", "0"], ["eval_every_kimg", "0.0"]),
    (["--checkpoint-every-kimg", "nan"], ["checkpoint_every_kimg", "nan"]),
    (["--eval-forget-samples", "0"], ["eval_forget_samples", "0"]),
    (["--eval-remain-per-class", "-3"], ["eval_remain_per_class", "-3"]),
    (["--seed", "-1"], ["seed", "-1"]),
    (["--batch-forget", "0"], ["batch_forget", "0"]),
    (["--batch-remain", "64.5"], ["--batch-remain", "64.5"]),          # argparse: not an int
    (["--lr-gen", "twenty"], ["--lr-gen", "twenty"]),                  # argparse: not a float
    (["--ema-beta", "1.0"], ["ema_beta", "1.0"]),
    (["--adam-beta2", "1.5"], ["adam_beta2", "1.5"]),
    (["--grad-clip", "-1"], ["grad_clip", "-1.0"]),
    pytest.param(["--device", "cuda"], ["'cuda'", "CUDA is not available"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: 'cuda' is valid here")),
    (["--device", "cuda:99"] if torch.cuda.is_available() else ["--device", "cuda:1"], ["cuda:"]),
    (["--device", "banana"], ["'banana'", "not a torch device"]),
    (["--precision", "fp8"], ["fp8"]),
    (["--num-workers", "0"], ["--num-workers", "0"]),
    (["--cpus-per-worker", "0"], ["--cpus-per-worker", "0.0"]),
    (["--resume", "--overwrite"], ["--resume and --overwrite"]),
]


def _id(case):
    args = case.values[0] if hasattr(case, "values") else case[0]
    return " ".join(args)


@pytest.mark.parametrize("args, words", FORGET_CASES, ids=[_id(c) for c in FORGET_CASES])
def test_forget_rejects_bad_setting_before_work(tmp_path, capsys, args, words):
    out = tmp_path / "out"
    small = ["--budget-kimg", "0.016", "--batch-remain", "4", "--batch-forget", "4", "--eval-forget-samples", "10",
             "--eval-remain-per-class", "2", "--no-progress"]
    err = cli_error(capsys, ["forget", *small, *args, "--out", str(out)])
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# the other commands

OTHER_CASES = [
    (["sample", "--generator", "{gen}", "--n", "0", "--out", "{tmp}/g.png"], ["--n 0"]),
    (["sample", "--generator", "{gen}", "--n", "-5", "--out", "{tmp}/g.png"], ["--n -5"]),
    (["sample", "--generator", "{gen}", "--classes", "cat", "--out", "{tmp}/g.png"], ["'cat'", "valid classes"]),
    (["sample", "--generator", "{gen}", "--classes", "12", "--out", "{tmp}/g.png"], ["class 12"]),
    (["sample", "--generator", "{gen}", "--out", "{tmp}/g.jpg"], ["g.jpg", ".png"]),
    (["sample", "--generator", "{tmp}/missing.safetensors", "--out", "{tmp}/g.png"], ["missing.safetensors"]),
    (["bench", "--seconds", "0", "--out", "{tmp}/b"], ["--seconds 0.0"]),
    (["bench", "--seconds", "nan", "--out", "{tmp}/b"], ["--seconds nan"]),
    (["bench", "--seconds=-inf", "--out", "{tmp}/b"], ["--seconds -inf"]),
    (["bench", "--classes", "11", "--out", "{tmp}/b"], ["11", "valid classes"]),
    (["bench", "--eval-every-kimg", "0", "--out", "{tmp}/b"], ["--eval-every-kimg 0.0"]),
    (["train-classifier", "--steps", "0", "--out", "{tmp}/c"], ["--steps 0"]),
    (["train-classifier", "--steps", "10"], ["--out"]),                          # no default into the package
    (["train-classifier", "--lr", "nan", "--out", "{tmp}/c"], ["--lr nan"]),
    (["train-classifier", "--batch", "0", "--out", "{tmp}/c"], ["--batch 0"]),
    (["pretrain", "--steps", "10"], ["--out"]),
    (["pretrain", "--steps", "-1", "--out", "{tmp}/c"], ["--steps -1"]),
    (["pretrain", "--out", "{tmp}/c"], ["classifier.safetensors", "train-classifier"]),
    (["evaluate", "--run", "{tmp}/nothing"], ["nothing", "not a folder"]),
    (["evaluate", "--run", "{run}", "--forget-samples", "-1"], ["--forget-samples -1"]),
]


@pytest.mark.parametrize("argv, words", OTHER_CASES, ids=[" ".join(a[:3]) + " " + a[-1] for a, _ in OTHER_CASES])
def test_other_commands_reject_bad_input(finished, tmp_path, capsys, argv, words):
    before = digest(finished)
    argv = [a.format(gen=finished / "generator.safetensors", tmp=tmp_path, run=finished) for a in argv]
    err = cli_error(capsys, argv)
    for w in words:
        assert w in err, (w, err)
    assert not [p for p in tmp_path.iterdir()], "nothing written"
    assert digest(finished) == before


def test_trainers_do_not_default_into_the_package(capsys):
    for cmd in ("train-classifier", "pretrain"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "--out OUT" in capsys.readouterr().out
        assert main([cmd]) == 2
        assert "required" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# settings from YAML / JSON (SFDConfig.from_dict): types are checked, never guessed

@pytest.mark.parametrize("d, words", [
    ({"batch_remain": 64.5}, ["batch_remain", "64.5", "int"]),
    ({"lr_gen": "twenty"}, ["lr_gen", "'twenty'"]),
    ({"lr_gen": "1e-4"}, ["lr_gen", "'1e-4'"]),                  # a string is never turned into a number
    ({"seed": True}, ["seed", "True"]),
    ({"forget": ["cat"]}, ["forget", "'cat'"]),
    ({"teacher": 3}, ["teacher", "3"]),
])
def test_from_dict_rejects_wrong_types(d, words):
    with pytest.raises(ValueError) as e:
        SFDConfig.from_dict(d).validate()
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_from_dict_coerces_yaml_ints_to_floats_and_names_resolve():
    cfg = SFDConfig.from_dict({"lr_gen": 1, "sigma_init": 3, "budget_kimg": 2})
    assert isinstance(cfg.lr_gen, float) and isinstance(cfg.sigma_init, float) and cfg.budget_kimg == 2.0
    cfg.validate()
    # negative control: a preset's class names are accepted where ids are expected
    a = build_parser().parse_args(["forget", "--preset", "cifar10", "--forget", "cat", "--override", "dog",
                                   "--out", "x"])
    cfg = config_from_args(a)
    assert cfg.forget == [3] and cfg.override == "5"
    a = build_parser().parse_args(["forget", "--forget", "7", "--forget", "3,4", "--out", "x"])
    assert config_from_args(a).forget == [7, 3, 4]


# ---------------------------------------------------------------------------------------
# run folders with an owner: refusals change nothing

def test_rerun_into_finished_run_is_refused_unchanged(run_copy, capsys):
    before = digest(run_copy)
    rec = json.loads((run_copy / "run.json").read_text())
    err = cli_error(capsys, ["forget", "--budget-kimg", "0.016", "--batch-remain", "4", "--batch-forget", "4",
                             "--no-progress", "--out", str(run_copy)])
    assert rec["run_id"] in err and "--resume" in err and "--overwrite" in err
    assert digest(run_copy) == before


def test_resume_with_changed_settings_is_refused_unchanged(run_copy, capsys):
    before = digest(run_copy)
    err = cli_error(capsys, ["forget", "--resume", "--batch-remain", "4", "--batch-forget", "4", "--lr-gen", "0.001",
                             "--device", "cpu", "--no-progress", "--out", str(run_copy)])
    saved = json.loads((run_copy / "run.json").read_text())["config"]["lr_gen"]
    assert saved != 0.001 and f"lr_gen: checkpoint {saved!r} vs now 0.001" in err
    assert digest(run_copy) == before


def test_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("precious\n")
    err = cli_error(capsys, ["forget", "--no-progress", "--out", str(f)])
    assert str(f) in err and "is a file" in err
    assert f.read_text() == "precious\n"
    err = cli_error(capsys, ["forget", "--no-progress", "--out", str(f / "sub")])
    assert "is a file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_corrupted_run_json_is_named(run_copy, capsys):
    (run_copy / "run.json").write_bytes(b"\x00garbage{")
    before = digest(run_copy)
    err = cli_error(capsys, ["forget", "--resume", "--no-progress", "--out", str(run_copy)])
    assert "run.json" in err and "corrupted" in err
    assert digest(run_copy) == before


def test_no_intact_checkpoint_is_named(run_copy, capsys):
    ck = run_copy / "checkpoints"
    for d in ck.glob("ckpt-*"):
        (d / "state.json").write_text("{not json")
    (ck / "latest").write_bytes(b"\xff\xfe")
    before = digest(run_copy)
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(run_copy)
    assert "state.json" in str(e.value) and "latest" in str(e.value)
    err = cli_error(capsys, ["forget", "--resume", "--batch-remain", "4", "--batch-forget", "4",
                             "--budget-kimg", "0.016", "--eval-every-kimg", "0.008", "--checkpoint-every-kimg",
                             "0.008", "--eval-forget-samples", "10", "--eval-remain-per-class", "2", "--device", "cpu",
                             "--no-progress", "--out", str(run_copy)])
    assert "no intact checkpoint" in err and "state.json" in err
    assert digest(run_copy) == before


def test_teacher_that_is_a_generator_is_refused(finished, tmp_path, capsys):
    out = tmp_path / "out"
    err = cli_error(capsys, ["forget", "--teacher", str(finished / "generator.safetensors"), "--no-progress",
                             "--out", str(out)])
    assert "one-step generator" in err and "generator.safetensors" in err
    assert not out.exists()


def _with_meta(src: Path, dst: Path, edit) -> Path:
    tensors, meta = load_tensors(src)
    edit(meta)
    save_tensors(dst, tensors, meta)
    return dst


@pytest.mark.parametrize("which, key, flag", [
    ("teacher", ("denoiser", "config", "channels"), "--teacher"),
    ("teacher", ("denoiser", "config", "emb_dim"), "--teacher"),
    ("classifier", ("judge", "config", "width"), "--classifier"),
])
def test_huge_width_metadata_rejected_before_building(digits, tmp_path, capsys, which, key, flag):
    def edit(meta):
        meta[key[0]][key[1]][key[2]] = 100000
    bad = _with_meta(digits.weights_dir / f"{which}.safetensors", tmp_path / f"{which}.safetensors", edit)
    out = tmp_path / "out"
    err = cli_error(capsys, ["forget", flag, str(bad), "--no-progress", "--out", str(out)])
    assert "100000" in err and key[2] in err and "4096" in err
    assert not out.exists()


def test_garbage_teacher_file_named(tmp_path, capsys):
    bad = tmp_path / "t.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    err = cli_error(capsys, ["forget", "--teacher", str(bad), "--no-progress", "--out", str(tmp_path / "o")])
    assert "t.safetensors" in err


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["config"].__setitem__("forget", [5]), ["forget", "[0]", "[5]"]),
    (lambda m: m["config"].__setitem__("override", "7"), ["override", "'7'"]),
    (lambda m: m.__setitem__("sigma_init_resolved", 9.0), ["sigma_init", "9.0"]),
])
def test_evaluate_refuses_edited_metrics(run_copy, capsys, edit, words):
    m = json.loads((run_copy / "metrics.json").read_text())
    edit(m)
    (run_copy / "metrics.json").write_text(json.dumps(m))
    before = digest(run_copy)
    err = cli_error(capsys, ["evaluate", "--run", str(run_copy), "--device", "cpu", "--no-progress"])
    for w in words:
        assert w in err, (w, err)
    assert "disagrees" in err
    assert digest(run_copy) == before


# ---------------------------------------------------------------------------------------
# checkpoints that recover (library runs: 1 more iteration each)

def _resume(run, teacher, capsys, iters=3):
    final = train_sfd(tiny(iters), run, teacher=copy.deepcopy(teacher), evaluate=False, progress=False,
                      resume=True)
    return final, capsys.readouterr().out


def test_resume_negative_control_uses_latest(run_copy, teacher, capsys):
    final, out = _resume(run_copy, teacher, capsys)
    assert "resuming" in out and "ckpt-00000002" in out and "falling back" not in out
    assert final["iteration"] == 3 and latest_checkpoint(run_copy).name == "ckpt-00000003"


@pytest.mark.parametrize("damage", ["missing", "garbage", "outside", "absolute", "names-missing"])
def test_resume_with_bad_latest_falls_back(run_copy, teacher, capsys, damage):
    ptr = run_copy / "checkpoints" / "latest"
    if damage == "missing":
        ptr.unlink()
    elif damage == "garbage":
        ptr.write_bytes(b"\x00\xff garbage \x01")
    elif damage == "outside":
        ptr.write_text("../../../etc\n")
    elif damage == "absolute":
        ptr.write_text(str(run_copy.parent) + "\n")
    else:
        ptr.write_text("ckpt-00000099\n")
    final, out = _resume(run_copy, teacher, capsys)
    assert "falling back to ckpt-00000002" in out and "latest" in out
    assert final["iteration"] == 3
    assert (run_copy / "checkpoints" / "latest").read_text().strip() == "ckpt-00000003"


def test_truncated_newest_checkpoint_resumes_from_previous(run_copy, teacher, capsys):
    ck = run_copy / "checkpoints"
    st = ck / "ckpt-00000002" / "state.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])                 # a write cut short
    truncated = digest(ck / "ckpt-00000002")
    final, out = _resume(run_copy, teacher, capsys, iters=2)
    assert "falling back to ckpt-00000001" in out and "truncated" in out
    assert final["iteration"] == 2
    assert resolve_checkpoint(run_copy)[0].name == "ckpt-00000002"   # rewritten, intact
    aside = list(ck.glob(".broken-ckpt-00000002-*"))
    assert len(aside) == 1 and digest(aside[0]) == truncated       # the broken one kept, not deleted


def test_stray_temporary_from_killed_write_is_removed(run_copy, teacher, capsys):
    ck = run_copy / "checkpoints"
    stray = ck / ".ckpt-00000003.k9x_ab"                     # kill -9 during the next write
    stray.mkdir()
    (stray / "state.safetensors").write_bytes(b"\x00" * 100)
    final, out = _resume(run_copy, teacher, capsys)
    assert not stray.exists() and ".ckpt-00000003.k9x_ab" in out
    assert final["iteration"] == 3 and latest_checkpoint(run_copy).name == "ckpt-00000003"


def test_cleanup_never_deletes_a_foreign_checkpoint(run_copy, teacher, capsys):
    ck = run_copy / "checkpoints"
    foreign = ck / "ckpt-00000000"
    shutil.copytree(ck / "ckpt-00000001", foreign)
    info = json.loads((foreign / "state.json").read_text())
    info.pop("run_id")
    info["iteration"] = 0
    (foreign / "state.json").write_text(json.dumps(info))
    before = digest(foreign)
    _resume(run_copy, teacher, capsys, iters=4)
    names = sorted(p.name for p in ck.glob("ckpt-*"))
    assert names == ["ckpt-00000000", "ckpt-00000003", "ckpt-00000004"]     # own ones: newest two
    assert digest(foreign) == before


def test_resume_into_empty_folder_starts_fresh(tmp_path, teacher, capsys):
    final = train_sfd(tiny(2), tmp_path / "new", teacher=copy.deepcopy(teacher), evaluate=False, progress=False,
                      resume=True)
    out = capsys.readouterr().out
    assert "starting fresh" in out and final["iteration"] == 2
    assert json.loads((tmp_path / "new" / "run.json").read_text())["config"]["batch_remain"] == 4


def test_overwrite_moves_the_old_run_aside(run_copy, teacher, capsys):
    before = digest(run_copy)
    old_id = json.loads((run_copy / "run.json").read_text())["run_id"]
    train_sfd(tiny(2), run_copy, teacher=copy.deepcopy(teacher), evaluate=False, progress=False, overwrite=True)
    aside = list(run_copy.parent.glob("run.old-*"))
    assert len(aside) == 1 and digest(aside[0]) == before
    assert json.loads((run_copy / "run.json").read_text())["run_id"] != old_id
    assert "moved aside" in capsys.readouterr().out


def test_metadata_limits_are_checked_before_reading_tensors(digits, tmp_path):
    """Negative control included: the bundled files pass; the edited one fails fast."""
    import time
    from sfd.denoisers import load_denoiser
    load_denoiser(digits.weights_dir / "teacher.safetensors")
    bad = _with_meta(digits.weights_dir / "teacher.safetensors", tmp_path / "t.safetensors",
                     lambda m: m["denoiser"]["config"].__setitem__("channels", 100000))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="channels = 100000"):
        load_denoiser(bad)
    assert time.perf_counter() - t0 < 5
    assert math.isfinite(t0)


def test_bench_into_an_earlier_bench_is_refused_before_work(finished, tmp_path, capsys):
    out = tmp_path / "bench"
    shutil.copytree(finished, out / "forget3")
    before = digest(out)
    err = cli_error(capsys, ["bench", "--classes", "2,3", "--seconds", "1", "--no-progress", "--out", str(out)])
    assert "forget3" in err and "--overwrite" in err
    assert digest(out) == before


@pytest.mark.parametrize("preset, target", [("colordigits", {"forget_concepts": ["seven"], "override": "one"}),
                                            ("sd", {"forget_concepts": ["nudity"], "override": ""})])
@pytest.mark.parametrize("setting, value", [("eval_fd_draws", 5), ("keep_best_ua", 0.99)])
def test_class_only_evaluation_settings_are_refused_on_text_presets(preset, target, setting, value):
    """eval_fd_draws / keep_best_ua are implemented by the class presets' evaluator and loop only: a text
    preset names the setting and says to drop it (control: the same target validates without it)."""
    from sfd.config import SFDConfig
    SFDConfig(preset=preset, **target).validate()
    with pytest.raises(ValueError, match=f"{setting} .*class presets.*drop it"):
        SFDConfig(preset=preset, **target, **{setting: value}).validate()
