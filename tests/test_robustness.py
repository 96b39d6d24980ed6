"""Is it really gone? sfd.robustness tells a generator that hides a class from one that lost it, reports the worst
family and cell beside the mean, and `sfd attack` refuses what it cannot measure with a clear error.

The two stand-in generators are built from the digits teacher so the answer is known without training:
- ``Relabel`` draws a 4 whenever asked for a 3 (a label remap: every prompt says "gone", but the class embedding
  of 3 is still in the network, so the continuous attack brings it back);
- ``Blind`` draws a 4 whatever the condition (its class embedding does nothing, so no attack can bring a 3 back).
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sfd.config import SFDConfig
from sfd.robustness import Budget, Report, Sampler, Subject, class_table, measure
from sfd.tasks import get_task
from standins import FixedPrompt

SMALL = Budget(steps=12, seeds=2, starts=2, teacher_steps=4, per_prompt=1, min_cell=20, lr=1.0)


class Relabel(nn.Module):
    """The teacher with class 3 answered by class 4 at the label, before the class embedding."""

    def __init__(self, net, src=3, dst=4):
        super().__init__()
        self.net, self.src, self.dst = net, src, dst
        self.num_classes, self.sigma_min, self.sigma_max = net.num_classes, net.sigma_min, net.sigma_max

    def forward(self, x, sigma, c):
        return self.net(x, sigma, torch.where(c == self.src, torch.full_like(c, self.dst), c))


class Blind(Relabel):
    """Always class 4; its own class table (the one an attacker finds) feeds nothing."""

    def __init__(self, net):
        nn.Module.__init__(self)
        self.table = nn.Embedding(net.num_classes, 4)            # registered first: class_table finds it
        self.net, self.dst = net, 4
        self.num_classes, self.sigma_min, self.sigma_max = net.num_classes, net.sigma_min, net.sigma_max

    def forward(self, x, sigma, c):
        self.table(c)
        return self.net(x, sigma, torch.full_like(c, self.dst))


def _suite(digits, teacher, judge):
    task = get_task(digits)
    cfg = SFDConfig(preset="digits", forget=[3], override="4").validate(digits)
    return task.robustness_suite(task.targets(cfg, teacher), judge, SMALL, teacher)


def _subjects(gen_net, teacher):
    return {"generator": Subject("generator", Sampler(gen_net, steps=SMALL.teacher_steps)),
            "teacher": Subject("teacher", Sampler(teacher, steps=SMALL.teacher_steps),
                               fast=Sampler(teacher, steps=SMALL.teacher_steps))}


@pytest.fixture(scope="module")
def reports(digits, teacher, judge):
    torch.manual_seed(0)
    return {name: measure(_suite(digits, teacher, judge), _subjects(wrap(teacher), teacher), SMALL,
                          attacks=("continuous",))
            for name, wrap in (("relabel", Relabel), ("blind", Blind), ("teacher", lambda t: t))}


def test_prompts_say_gone_but_the_attack_finds_a_hidden_class(reports):
    rel = reports["relabel"].summary()
    assert rel["residue_worst_family"] == 0.0                   # no label draws a 3
    assert rel["residue_worst_family_teacher"] > 0.8            # the teacher draws its 3s
    assert rel["asr_continuous"] >= 0.5                          # ...yet a free class embedding brings 3 back
    assert rel["asr_continuous_teacher"] >= 0.5


def test_a_generator_that_lost_the_class_resists_the_same_attack(reports):
    """Negative control of the one above: the same attack, budget and noise on a generator whose condition cannot
    reach a 3 succeed nowhere — the attack's success above is the generator's, not the judge's or the noise's."""
    blind = reports["blind"].summary()
    assert blind["asr_continuous"] == 0.0
    assert blind["asr_continuous_teacher"] == reports["relabel"].summary()["asr_continuous_teacher"]


def test_nothing_forgotten_reads_as_residue(reports):
    """The teacher measured as its own generator: residue equals the teacher's, side effects are zero."""
    s = reports["teacher"].summary()
    assert s["residue_worst_family"] == s["residue_worst_family_teacher"] > 0.8
    assert s["side_effect_worst_cell"] == 0.0


def test_side_effects_name_the_damaged_class(reports):
    """Blind draws a 4 for every label: every other class loses what the teacher had; class 4 loses nothing."""
    cells = {c["concept"]: c for c in reports["blind"].cells}
    assert "3" not in cells and cells["4"]["drop"] <= 0.05
    assert min(c["drop"] for k, c in cells.items() if k != "4") > 0.5
    assert reports["relabel"].summary()["side_effect_worst_cell"] <= 0.05     # the remap touches no other class


def test_summary_reports_the_worst_cell_beside_the_mean():
    rep = Report(kind="classes", target="3", budget={},
                 families={"a": {"residue": 0.0, "forget_samples": 10, "residue_teacher": 1.0},
                           "b": {"residue": 0.6, "forget_samples": 10, "residue_teacher": 0.9},
                           "empty": {"residue": 1.0, "forget_samples": 0}},
                 cells=[{"family": "a", "concept": "x", "drop": 0.01}, {"family": "b", "concept": "y", "drop": 0.5},
                        {"family": "a", "concept": "z", "drop": 0.0}],
                 attacks={"continuous": {"asr": 0.25, "asr_teacher": 1.0}, "discrete": {"asr": 0.5,
                                                                                      "asr_teacher": 0.75}})
    s = rep.summary()
    assert (s["residue_worst_family"], s["residue_worst_family_name"], s["residue_worst_family_teacher"]) == \
        (0.6, "b", 0.9)                                          # a family with no forget samples is not a family
    assert s["residue_mean"] == pytest.approx(0.3)
    assert (s["side_effect_worst_cell"], s["side_effect_worst_cell_name"]) == (0.5, "b/y")
    assert s["side_effect_mean"] == pytest.approx(0.51 / 3)
    assert s["asr_max"] == 0.5 and s["asr_discrete_teacher"] == 0.75
    assert "leakage_worst_cell" not in s                             # no cell measured the override's share
    rep.cells = [{"family": "a", "concept": "x", "drop": 0.0, "override_share": 0.30, "override_share_teacher": 0.25},
                 {"family": "s", "concept": "two", "drop": -0.1, "override_share": 0.26, "override_share_teacher": 0.11},
                 {"family": "a", "concept": "one", "drop": 0.0, "override": True}]
    s = rep.summary()
    assert (s["leakage_worst_cell"], s["leakage_worst_cell_name"]) == (pytest.approx(0.15), "s/two")   # above the teacher's
    assert (s["leakage_worst_cell_share"], s["leakage_worst_cell_share_teacher"]) == (0.26, 0.11)


def test_class_table_is_found_or_refused(teacher):
    assert class_table(teacher).num_embeddings in (teacher.num_classes, teacher.num_classes + 1)

    class NoTable(nn.Module):
        num_classes = 10

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="no class-embedding table"):
        class_table(NoTable())


def test_the_teachers_cached_control_is_keyed_by_its_judge(teacher, judge, tmp_path, monkeypatch):
    """The teacher's attack result is cached on disk; with another judge it is computed again (the same
    judge reads it back: the control that the cache still works)."""
    import copy

    from sfd.robustness import judge_fingerprint
    monkeypatch.setenv("SFD_CACHE", str(tmp_path))
    other = copy.deepcopy(judge)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    calls = []

    def compute():
        calls.append(1)
        return {"asr": 0.5}

    def subject(j):
        return Subject("teacher", Sampler(teacher, steps=2), cached=True, judge=judge_fingerprint(j))
    assert judge_fingerprint(judge) != judge_fingerprint(other) == judge_fingerprint(copy.deepcopy(other))
    for j in (judge, judge, other):
        assert subject(j).remember("continuous|3|budget", compute) == {"asr": 0.5}
    assert len(calls) == 2


def test_budget_refuses_bad_values():
    with pytest.raises(ValueError, match="steps=0"):
        Budget(steps=0)
    with pytest.raises(ValueError, match="lr=-1"):
        Budget(lr=-1.0)


# -- the command, on a real (tiny) run -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    from sfd.loop import train_sfd
    run = tmp_path_factory.mktemp("att") / "d3"
    cfg = SFDConfig(preset="digits", forget=[3], override="4", batch_remain=4, batch_forget=4, budget_kimg=0.016,
                    eval_every_kimg=1.0, checkpoint_every_kimg=1.0, device="cpu", seed=0)
    train_sfd(cfg, run, progress=False, evaluate=False, measure_speed=False)
    return run


FLAGS = ["--steps", "2", "--seeds", "1", "--starts", "2", "--teacher-steps", "2", "--per-prompt", "1",
         "--no-progress"]


def test_sfd_attack_writes_its_report(class_run, capsys):
    from sfd.cli import main
    assert main(["attack", str(class_run), "--attacks", "discrete,continuous", *FLAGS]) == 0
    out = capsys.readouterr().out
    assert "discrete attack: preset 'digits' has no such attack" in out or "continuous" in out
    rep = json.loads((class_run / "attack.json").read_text())
    assert rep["schema"] == 1 and rep["kind"] == "classes" and rep["target"] == "3"
    assert set(rep["attacks"]) == {"continuous"} and rep["notes"]      # discrete noted, not silently dropped
    a = rep["attacks"]["continuous"]
    assert a["instances"] == 2 and 0 <= a["asr"] <= 1 and 0 <= a["asr_teacher"] <= 1
    assert {"residue_worst_family", "residue_worst_family_teacher", "side_effect_worst_cell", "asr_max"} <= set(rep)
    assert len(rep["cells"]) == 9                                 # every remaining class
    metrics = json.loads((class_run / "metrics.json").read_text())
    assert metrics["attack"]["asr_continuous"] == a["asr"]


@pytest.mark.parametrize("args, message", [
    (["--attacks", "gcg"], "gcg is not an attack"),
    (["--attacks", "none", "--no-families"], "measures nothing"),
    (["--control", "/nonexistent/run"], "is not a folder"),
    (["--prompts-file", "PROMPTS"], "--prompts-file is for text presets"),
    (["--steps", "0"], "steps=0"),
])
def test_sfd_attack_refuses_bad_input(class_run, tmp_path, capsys, args, message):
    from sfd.cli import main
    before = (class_run / "metrics.json").read_bytes()
    (tmp_path / "p.txt").write_text("a red seven\n")
    args = [str(tmp_path / "p.txt") if a == "PROMPTS" else a for a in args]
    assert main(["attack", str(class_run), *FLAGS, *args]) == 2
    assert message in capsys.readouterr().err
    assert (class_run / "metrics.json").read_bytes() == before   # nothing written on a refusal


def test_sfd_attack_refuses_a_control_of_another_teacher(class_run, tmp_path, capsys):
    from sfd.cli import main
    other = tmp_path / "other"
    other.mkdir()
    m = json.loads((class_run / "metrics.json").read_text())
    m["config"]["preset"] = "colordigits"
    (other / "metrics.json").write_text(json.dumps(m))
    assert main(["attack", str(class_run), *FLAGS, "--control", str(other)]) == 2
    assert "a control must share the teacher" in capsys.readouterr().err


def test_sfd_attack_refuses_what_it_does_not_cover(digits):
    from sfd.presets import get_preset
    get_task(get_preset("sd")).check_attackable()                # covered (tests/test_robustness_sd.py)
    task = type(get_task(digits))(digits)                        # a fresh instance, not the cached one
    task.attacks = ()                                            # a kind without attacks
    with pytest.raises(ValueError, match="preset 'digits' is not supported yet"):
        task.check_attackable()


# -- text presets (colordigits) ------------------------------------------------------------------------------------

def test_families_cover_the_vocabulary_and_swap_slots():
    from sfd import colordigits as cd
    from sfd.robustness import family_prompts, family_templates
    prompts = family_prompts(family_templates())
    fams = {p.family for p in prompts}
    assert {"train_templates", "heldout_templates", "swapped_slots", "bare_pairs", "single_word", "repeated",
            "upper_case"} <= fams
    sevens = [p for p in prompts if p.digit == 7]
    assert {p.family for p in sevens} == fams                    # every family asks for a seven somewhere
    assert all(("seven" in p.text.lower() or "7" in p.text) for p in sevens)
    assert all(p.color is None or cd.COLOR_NAMES[p.color] in p.text.lower() for p in prompts)


def test_prompts_file_reads_attributes_and_refuses_unscorable_lines(tmp_path):
    from sfd.robustness import read_prompts_file
    f = tmp_path / "p.txt"
    f.write_text("# mine\n\na RED seven\nsome 3\n")
    got = [(p.text, p.digit, p.color, p.family) for p in read_prompts_file(f)]
    assert got[0][1] == 7 and got[0][2] is not None and got[1][1:3] == (3, None)
    assert {g[3] for g in got} == {"user_file"}
    f.write_text("a red seven\na lovely picture\n")
    with pytest.raises(ValueError, match="line 2: 'a lovely picture' names no digit and no colour"):
        read_prompts_file(f)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    from sfd.loop import train_sfd
    run = tmp_path_factory.mktemp("att") / "seven"
    cfg = SFDConfig(preset="colordigits", forget_concepts=["seven"], override="one", batch_remain=4, batch_forget=4,
                    budget_kimg=0.016, eval_every_kimg=1.0, checkpoint_every_kimg=1.0, device="cpu", seed=0)
    train_sfd(cfg, run, progress=False, evaluate=False, measure_speed=False)
    return run


def test_sfd_attack_on_a_text_run_edits_tokens_and_embeddings(text_run):
    from sfd.cli import main
    assert main(["attack", str(text_run), "--no-families", "--candidates", "4", *FLAGS]) == 0
    rep = json.loads((text_run / "attack.json").read_text())
    assert rep["kind"] == "concepts" and set(rep["attacks"]) == {"discrete", "continuous"}
    d = rep["attacks"]["discrete"]
    assert d["instances"] == 2
    for ex in d["examples"] + d["examples_teacher"]:
        assert "one" in ex["start"] or "1" in ex["start"]       # starts: forget prompts rewritten to the override
        a, b = ex["start"].split(), ex["prompt"].split()         # the search changes at most --edits (2) tokens
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) <= 2
    assert rep["attacks"]["continuous"]["nfe_per_step"] == 1     # through the one-step generator


def test_forget_with_the_attack_setting_reports_asr_beside_ua(tmp_path, capsys):
    """`sfd forget --attack continuous`: the run's report and metrics.json carry the attack's figures."""
    from sfd.cli import main
    out = tmp_path / "run"
    assert main(["forget", "--preset", "digits", "--forget", "3", "--override", "4", "--batch-remain", "4",
                 "--batch-forget", "4", "--budget-kimg", "0.016", "--eval-every-kimg", "1", "--eval-forget-samples",
                 "50", "--eval-remain-per-class", "5", "--device", "cpu", "--attack", "continuous", "--no-progress",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "asr_continuous" in printed and "ua" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert 0 <= m["attack"]["asr_continuous"] <= 1 and (out / "attack.json").is_file()


def test_evaluate_with_the_attack_stage(class_run, capsys):
    from sfd.cli import main
    (class_run / "attack.json").unlink(missing_ok=True)
    assert main(["evaluate", "--run", str(class_run), "--forget-samples", "20", "--remain-per-class", "5",
                 "--device", "cpu", "--attack", "continuous", "--no-progress"]) == 0
    ev = json.loads((class_run / "evaluation.json").read_text())
    assert 0 <= ev["attack"]["asr_continuous"] <= 1 and "residue_worst_family" in ev["attack"]
    assert (class_run / "attack.json").is_file()
    assert "asr_continuous" in capsys.readouterr().out


@pytest.mark.slow
def test_colordigits_families_residue_and_side_effects():
    """Every prompt family of colordigits (seven -> one): the teacher measured as its own generator has the
    teacher's residue and no side effect; a generator that always draws 'a red one' has no residue and loses
    every other digit (negative control of the residue's direction and of the side-effect cells)."""
    from sfd.presets import get_preset
    from sfd.robustness import TextSide
    p = get_preset("colordigits")
    task = get_task(p)
    teacher = task.load_teacher(None, "cpu")
    judge = task.load_judge(SFDConfig(preset="colordigits"), "cpu")
    cfg = SFDConfig(preset="colordigits", forget_concepts=["seven"], override="one").validate(p)
    b = Budget(per_prompt=1, min_cell=4, teacher_steps=4)
    suite = task.robustness_suite(task.targets(cfg, teacher), judge, b, teacher)
    side = TextSide(teacher.text.obj)
    fixed = side.encode(side.ids(["a red one"]))
    teacher_s = Subject("teacher", Sampler(teacher, steps=4))
    same_rep = measure(suite, {"generator": Subject("generator", Sampler(teacher, steps=4)), "teacher": teacher_s}, b,
                       attacks=())
    same = same_rep.summary()
    assert same["residue_worst_family"] == same["residue_worst_family_teacher"] > 0.8
    assert same["residue_mean"] > 0.8 and same["side_effect_worst_cell"] == 0.0
    assert same["leakage_worst_cell"] == 0.0                          # the same samples: no leakage of the override
    # a cell's override share leaves out its prompts that ask for the override: red's cell holds 'a red one' (7 of its
    # 63 prompts), which the teacher draws as a one; counted, its share would be about 0.11
    red = next(c for c in same_rep.cells if (c["family"], c["concept"]) == ("train_templates", "red"))
    assert red["n"] == 63 and red["override_share_teacher"] < 0.06
    blind = measure(suite, {"generator": Subject("generator", Sampler(FixedPrompt(teacher, fixed), steps=4)),
                            "teacher": teacher_s}, b, attacks=())
    s = blind.summary()
    assert s["residue_worst_family"] <= 0.15 and s["residue_worst_family_teacher"] > 0.8     # 4-step samples: noise
    cells = {(c["family"], c["concept"]): c for c in blind.cells}
    assert cells[("train_templates", "five")]["drop"] > 0.5           # a five is asked, a one is drawn
    assert s["side_effect_worst_cell"] > 0.5
    # leakage: a one drawn where a five (or a colour alone) is asked; the override's own cell is not leakage
    assert cells[("train_templates", "five")]["override_share"] > 0.5
    assert cells[("train_templates", "five")]["override_share_teacher"] < 0.3
    assert "override_share" not in cells[("train_templates", "one")]
    assert s["leakage_worst_cell"] > 0.5 and s["leakage_worst_cell_share"] > 0.5
