"""`sfd forget / sample / evaluate / bench` from the command line (in-process via sfd.cli.main)."""
import functools
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from sfd.cli import build_parser, main
from sfd.io import load_tensors

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


METRIC_KEYS = ("ua", "remaining_accuracy", "fd_remaining", "fd_remaining_teacher", "fd_forget_vs_override",
               "override_rate", "kimg", "wall_seconds", "images_per_second_generator",
               "images_per_second_teacher")

SMALL = ["--batch-remain", "8", "--batch-forget", "8", "--budget-kimg", "0.064",     # 4 iterations
         "--eval-every-kimg", "0.032", "--checkpoint-every-kimg", "0.032",
         "--eval-forget-samples", "10", "--eval-remain-per-class", "10", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny `sfd forget` run shared by the tests of this module."""
    cache = tmp_path_factory.getbasetemp() / "sfd_cache"
    cache.mkdir(exist_ok=True)
    out = tmp_path_factory.mktemp("cli") / "forget0"
    import sfd.evaluate.forgetting as fg
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFD_CACHE", str(cache))
        # the end-of-run speed figure on a small batch (500 x 3 repeats of the teacher sampler
        # costs ~10 s on 2 cores); the keys and the code path are the same
        mp.setattr(fg, "throughput", functools.partial(fg.throughput, batch=20, repeats=1))
        rc = main(["forget", "--forget", "0", "--override", "1", *SMALL, "--out", str(out)])
        assert rc == 0
        yield out


def _is_png(path):
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_forget_writes_metrics_and_artifacts(run_dir, capsys):
    m = json.loads((run_dir / "metrics.json").read_text())
    for k in METRIC_KEYS:
        assert k in m, k
        assert isinstance(m[k], (int, float)) and m[k] == m[k], (k, m[k])    # a number, not NaN
    assert 0.0 <= m["ua"] <= 1.0 and 0.0 <= m["override_rate"] <= 1.0
    assert 0.0 <= m["remaining_accuracy"] <= 1.0
    assert m["fd_remaining"] >= 0 and m["fd_remaining_teacher"] >= 0
    assert m["kimg"] == pytest.approx(0.064)
    assert m["images_per_second_generator"] > 0 and m["images_per_second_teacher"] > 0
    assert m["config"]["forget"] == [0] and m["config"]["override"] == "1"
    assert m["config"]["batch_remain"] == 8
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["iteration"] for h in history] == [0, 2, 4]
    assert all("ua" in h and "fd_remaining" in h for h in history)
    for name in ("curves.png", "samples_generator.png", "samples_teacher.png"):
        assert _is_png(run_dir / name), name
    assert (run_dir / "generator.safetensors").is_file()
    _, meta = load_tensors(run_dir / "generator.safetensors")
    assert meta["generator"]["sigma_init"] == 2.5 and meta["generator"]["forget"] == [0]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "ckpt-00000004"


def test_sample_png_and_tensors(run_dir, tmp_path, capsys):
    gen = str(run_dir / "generator.safetensors")
    png = tmp_path / "x.png"
    assert main(["sample", "--generator", gen, "--classes", "0,1", "--n", "3", "--device", "cpu",
                 "--out", str(png)]) == 0
    assert _is_png(png)
    with Image.open(png) as im:                       # 2 rows (classes) x 3 columns, 8x8 + 1px pad, x4
        assert im.size == ((3 * 9 + 1) * 4, (2 * 9 + 1) * 4)
    st = tmp_path / "x.safetensors"
    assert main(["sample", "--generator", gen, "--classes", "0,1", "--n", "3", "--device", "cpu",
                 "--out", str(st)]) == 0
    t, _ = load_tensors(st)
    assert t["images"].shape == (6, 1, 8, 8) and t["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.isfinite(t["images"]).all()
    assert "forgotten: [0] -> 1" in capsys.readouterr().out


def test_sample_rejects_non_generator_and_bad_class(run_dir, tmp_path, digits, capsys):
    assert main(["sample", "--generator", str(digits.weights_dir / "teacher.safetensors"), "--out",
                 str(tmp_path / "y.png")]) == 2
    assert "not an sfd one-step generator" in capsys.readouterr().err
    assert main(["sample", "--generator", str(run_dir / "generator.safetensors"), "--classes", "12",
                 "--out", str(tmp_path / "y.png")]) == 2
    assert "class 12" in capsys.readouterr().err
    assert not (tmp_path / "y.png").exists()


def test_evaluate_writes_evaluation_json(run_dir, tmp_path_factory, monkeypatch, capsys):
    monkeypatch.setenv("SFD_CACHE", str(tmp_path_factory.getbasetemp() / "sfd_cache"))
    assert main(["evaluate", "--run", str(run_dir), "--device", "cpu", "--no-progress"]) == 0
    ev = json.loads((run_dir / "evaluation.json").read_text())
    for k in ("ua", "remaining_accuracy", "fd_remaining", "fd_remaining_teacher", "fd_forget_vs_override",
              "override_rate"):
        assert k in ev, k
    # the digits defaults average the remaining-class FD over 5 draws of 10 per class
    assert ev["n_forget_samples"] == 10 and ev["fd_draws"] == 5 and ev["n_remaining_samples"] == 5 * 9 * 10
    assert "evaluation.json" in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["--forget", "12"], ["12", "valid classes"]),
    (["--forget", "0", "--override", "0"], ["override class 0", "forgotten"]),
    (["--forget", "0,1,2,3,4,5,6,7,8,9"], ["all 10 classes"]),
    (["--override", "banana"], ["banana"]),
])
def test_forget_bad_input_exits_2_without_traceback(tmp_path, capsys, args, words):
    out = tmp_path / "bad"
    assert main(["forget", *args, "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sfd: error:")
    assert "Traceback" not in err
    for w in words:
        assert w in err
    assert not out.exists()


def _subcommands():
    return sorted(build_parser()._subparsers._group_actions[0].choices)


def test_subcommands_listed():
    assert {"forget", "sample", "evaluate", "bench"} <= set(_subcommands())


@pytest.mark.parametrize("cmd", [[]] + [[c] for c in ["attack", "bench", "distil", "evaluate", "export", "fetch", "forget", "pretrain",
                                                       "sample", "train-classifier"]])
def test_help_exits_0(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sfd")


def test_every_subcommand_has_help_test():
    # keep the parametrisation above in step with the parser
    assert _subcommands() == ["attack", "bench", "distil", "evaluate", "export", "fetch", "forget", "pretrain", "sample",
                            "train-classifier"]


def test_forget_help_shows_defaults_from_config(capsys):
    with pytest.raises(SystemExit):
        main(["forget", "--help"])
    out = capsys.readouterr().out
    for flag in ("--forget", "--override", "--budget-kimg", "--lr-gen", "--init-from", "--stage1-kimg", "--resume"):
        assert flag in out


def test_python_m_sfd_help_subprocess():
    r = subprocess.run([sys.executable, "-m", "sfd", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for c in ("forget", "sample", "evaluate", "bench"):
        assert c in r.stdout


def test_forget_flags_start_from_the_preset_yaml_defaults():
    """`sfd forget --preset X` and the sweep's baseline read the same defaults (one source)."""
    from orchestration.space import load_space, space_path
    from sfd.cli import build_parser, config_from_args

    parse = build_parser().parse_args
    cfg = config_from_args(parse(["forget", "--preset", "cifar10", "--out", "x"]))
    base = load_space(space_path("cifar10")).baseline()
    for k in ("lr_gen", "lr_fake", "lambda_gen_forget", "alpha", "sigma_dist", "batch_remain", "batch_forget",
              "ema_beta", "budget_kimg"):
        assert getattr(cfg, k) == getattr(base, k), k
    assert (cfg.lr_gen, cfg.batch_remain, cfg.ema_beta) == (1e-5, 128, 0.9999)
    # a flag given wins over the preset; bool flags parse as booleans
    cfg = config_from_args(parse(["forget", "--preset", "cifar10", "--out", "x", "--lr-gen", "3e-5",
                                  "--grad-checkpointing", "--precision", "bf16"]))
    assert (cfg.lr_gen, cfg.grad_checkpointing, cfg.precision, cfg.lr_fake) == (3e-5, True, "bf16", 1e-5)
    assert config_from_args(parse(["forget", "--out", "x", "--no-grad-checkpointing"])).grad_checkpointing is False
    # digits: SFDConfig's own defaults plus the YAML's defaults block, nothing else (the trial schedule is
    # sweep-only); that block starts the forgetting from the bundled stage 1
    import yaml

    from sfd.config import SFDConfig, spaces_dir
    block = yaml.safe_load((spaces_dir() / "digits.yaml").read_text())["defaults"]
    assert block["init_from"] == "stage1"
    assert config_from_args(parse(["forget", "--out", "x"])) == SFDConfig(**block).validate()


def test_an_override_policy_gets_its_own_defaults_under_the_flags():
    """digits' `override_defaults: random` (search_spaces/digits.yaml) is what `sfd forget --override
    random` starts from, on top of `defaults`; a fixed override does not get it; a flag given wins;
    the sweep's baseline trial of a random target is the same configuration."""
    import yaml

    from orchestration.search import PerTargetSearch
    from orchestration.space import load_space, space_path
    from orchestration.targets import parse_targets
    from sfd.cli import build_parser, config_from_args
    from sfd.config import SFDConfig, config_for_preset, spaces_dir

    doc = yaml.safe_load((spaces_dir() / "digits.yaml").read_text())
    extra = doc["override_defaults"]["random"]
    assert extra and all(doc["defaults"].get(k, getattr(SFDConfig, k)) != v for k, v in extra.items())
    parse = build_parser().parse_args
    rnd = config_from_args(parse(["forget", "--forget", "3", "--override", "random", "--out", "x"]))
    fixed = config_from_args(parse(["forget", "--forget", "3", "--override", "4", "--out", "x"]))
    for k, v in extra.items():
        assert getattr(rnd, k) == v and getattr(fixed, k) == doc["defaults"].get(k, getattr(SFDConfig, k)), k
    assert rnd == SFDConfig(**{**doc["defaults"], **extra, "forget": [3], "override": "random"}).validate()
    assert config_for_preset("digits", forget=[3], override="random") == rnd
    given = config_from_args(parse(["forget", "--forget", "3", "--override", "random", "--batch-forget", "7",
                                    "--out", "x"]))
    assert given.batch_forget == 7 and all(getattr(given, k) == v for k, v in extra.items() if k != "batch_forget")
    # the sweep: a random target's baseline trial (Optuna's first point + the rest of the config)
    space = load_space(space_path("digits"))
    target = parse_targets(["digits:3->random"], "next")[0]
    search = PerTargetSearch([target], {"digits": space}, 2)
    first = search.suggest("t0")
    assert first["baseline"]
    for k, v in extra.items():
        assert first["sfd"][k] == v, k
    assert search.studies[target.name].trials[0].params == space.baseline_point("random")
