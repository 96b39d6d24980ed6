"""Issue 27's edges: checkpoints on their own clock, the strict YAML loader, target validation, and
`sfd forget` stopped by a signal. Each case checks the exit code or error, that the message names the bad
value, and that nothing already there changed."""
import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sfd.loop
from orchestration.space import load_space, space_path
from orchestration.targets import parse_targets
from sfd.checkpoint import latest_checkpoint
from sfd.cli import main
from sfd.config import SFDConfig
from sfd.yamlfile import YAMLFileError, loads

ROOT = Path(__file__).resolve().parents[1]
KIMG_PER_IT = 16 / 1000


def cfg(iters, eval_every, ckpt_every):
    k = lambda n: round(n * KIMG_PER_IT, 9)  # noqa: E731
    return SFDConfig(batch_remain=8, batch_forget=8, budget_kimg=k(iters), eval_every_kimg=k(eval_every),
                     checkpoint_every_kimg=k(ckpt_every), device="cpu", eval_at_start=False)


def killed_at(teacher, tmp_path, monkeypatch, ckpt_every, kill_at=7):
    """A run of 8 iterations evaluating every 8, killed during iteration ``kill_at``: its newest checkpoint."""
    real = sfd.loop.sfd_iteration

    def iteration(st, **kw):
        if st.iteration == kill_at - 1:
            raise KeyboardInterrupt("killed")
        return real(st, **kw)
    monkeypatch.setattr(sfd.loop, "sfd_iteration", iteration)
    with pytest.raises(KeyboardInterrupt):
        sfd.loop.train_sfd(cfg(8, 8, ckpt_every), tmp_path, teacher=copy.deepcopy(teacher), evaluate=False,
                           progress=False)
    return latest_checkpoint(tmp_path)


def test_a_kill_between_evaluations_loses_at_most_one_checkpoint_interval(teacher, tmp_path, monkeypatch):
    ckpt = killed_at(teacher, tmp_path, monkeypatch, ckpt_every=2)
    assert ckpt is not None and ckpt.name == "ckpt-00000006"        # killed in iteration 7: 1 iteration lost


def test_negative_control_checkpoints_only_at_evaluations_lose_everything(teacher, tmp_path, monkeypatch):
    # checkpoints following the evaluations (every 8): the same kill leaves none, the loss the test above rules out
    assert killed_at(teacher, tmp_path, monkeypatch, ckpt_every=8) is None


def test_checkpoints_between_evaluations_reach_the_callback(teacher, tmp_path):
    seen = []
    sfd.loop.train_sfd(cfg(6, 6, 2), tmp_path, teacher=copy.deepcopy(teacher), evaluate=False, progress=False,
                       callback=lambda m, c: seen.append((m["iteration"], c.name if c else None)))
    assert seen == [(2, "ckpt-00000002"), (4, "ckpt-00000004"), (6, "ckpt-00000006")]


# -- YAML ------------------------------------------------------------------------------------------------

def test_yaml_reads_exponent_floats_as_numbers():
    assert loads("a: 1e-4\nb: -1e-4\nc: 5E+3\nd: '1e-4'\ne: 3") == {"a": 1e-4, "b": -1e-4, "c": 5000.0,
                                                                  "d": "1e-4", "e": 3}


def test_yaml_refuses_a_key_written_twice_naming_key_and_lines():
    with pytest.raises(YAMLFileError, match=r"key 'lr_gen' is written twice \(lines 2 and 4\)"):
        loads("defaults:\n  lr_gen: 1.0e-5\n  seed: 0\n  lr_gen: 2.0e-5\n", "space.yaml")


def test_search_space_with_a_duplicate_key_is_refused_and_unchanged(tmp_path):
    text = space_path("digits").read_text().replace("defaults:\n", "defaults:\n  seed: 1\n  seed: 2\n", 1)
    p = tmp_path / "dup.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=r"dup.yaml.*key 'seed' is written twice"):
        load_space(p)
    assert p.read_text() == text
    load_space(space_path("digits"))                     # the shipped one still loads (control)


# -- targets ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,match", [
    ("digits:3+3->5", r"--targets: target 'digits:3\+3->5': class '3' is forgotten twice"),
    ("digits:³", r"--targets: target 'digits:³': class '³' is not a class of preset 'digits'.*0=0"),
    ("digits:3,3", r"--targets: target digits:3->4 is listed twice"),
    ("colordigits:seven+seven->one", r"concept 'seven' is forgotten twice"),
    ("nope:3", r"--targets: target 'nope:3': unknown preset 'nope'; valid presets"),
])
def test_bad_targets_name_the_flag_and_value(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_targets([spec])


def test_good_targets_still_parse():
    assert [t.name for t in parse_targets(["digits:3->5 digits:7"])] == ["digits:3->5", "digits:7->8"]


def test_a_huge_target_list_is_refused_fast_with_the_limit():
    t0 = time.time()
    with pytest.raises(ValueError, match=r"more than 1000 targets|at most 1000"):
        parse_targets([" ".join(f"digits:{i % 10}+{(i + 1) % 10}->{(i + 2) % 10}" for i in range(10))
                       + " digits:" + ",".join(str(i % 10) for i in range(50000))])
    assert time.time() - t0 < 5


@pytest.mark.parametrize("value,match", [("3,3", r"--forget '3,3': class '3' is given twice"),
                                         ("³", r"--forget '³' is not a class of preset 'digits'.*valid classes")])
def test_forget_flag_errors(tmp_path, capsys, value, match):
    out = tmp_path / "run"
    assert main(["forget", "--forget", value, "--override", "5", "--out", str(out)]) == 2
    import re
    assert re.search(match, capsys.readouterr().err)
    assert not out.exists()


# -- signals ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sfd_forget_stops_on_a_signal_with_a_checkpoint_and_one_line(tmp_path, sig):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "sfd", "forget", "--forget", "0", "--override", "1",
                          "--batch-remain", "8", "--batch-forget", "8", "--budget-kimg", "100",
                          "--eval-every-kimg", "50", "--checkpoint-every-kimg", "0.032", "--no-eval-at-start",
                          "--device", "cpu", "--no-progress", "--out", str(out)],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "latest").exists() and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and f"stopped by {signal.Signals(sig).name}" in lines[0] and "--resume" in lines[0]
    assert "Traceback" not in err
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and str(ckpt) in lines[0]
