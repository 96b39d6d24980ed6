"""Chained forgetting (sfd/chain.py): merged targets, refusals, rebound."""
import copy
import json

import pytest
import torch

from sfd.chain import extend, rebound
from sfd.config import SFDConfig


def earlier_run(path, **cfg):
    """A finished forgetting run folder: metrics.json with its validated configuration."""
    c = SFDConfig(**cfg).validate()
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({"config": c.to_dict(), "ua_per_target": {"3": 1.0}}))
    return path


def test_chain_keeps_the_forgotten_set(tmp_path):
    run = earlier_run(tmp_path / "c3", forget=[3], override="next")
    merged, chain = extend(SFDConfig(forget=[5], override="next", init_from=str(run)))
    assert merged.forget == [3, 5] and merged.override == "4,6"
    assert chain.earlier == [("3", "4")] and chain.ua_before == {"3": 1.0}


def test_negative_control_a_run_that_forgot_nothing_is_no_chain(tmp_path):
    run = earlier_run(tmp_path / "s1", forget=[3], override="4", lambda_gen_forget=0.0, lambda_fake_forget=0.0)
    merged, chain = extend(SFDConfig(forget=[5], override="6", init_from=str(run)))
    assert chain is None and merged.forget == [5]


@pytest.mark.parametrize("earlier, new, words", [
    (dict(forget=[3], override="4"), dict(forget=[5], override="3"), "forgotten by an earlier stage"),
    (dict(forget=[3], override="4"), dict(forget=[4], override="5"), "override of"),
    (dict(forget=list(range(8)), override="random"), dict(forget=[8, 9], override="random"), "all 10 classes"),
    (dict(forget=[3], override="4"), dict(forget=[5], override="random"), "one override policy"),
])
def test_chain_refusals_name_the_value(tmp_path, earlier, new, words):
    run = earlier_run(tmp_path / "r", **earlier)
    with pytest.raises(ValueError, match=words):
        extend(SFDConfig(**new, init_from=str(run)))


def test_chain_refuses_another_teacher(tmp_path, teacher):
    from sfd.tasks import get_task
    run = earlier_run(tmp_path / "c3", forget=[3], override="4")
    _, chain = extend(SFDConfig(forget=[5], override="6", init_from=str(run)))
    task = get_task("digits")
    chain.check_teacher(teacher, task, None)                       # the same teacher passes
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="one teacher"):          # recorded fingerprint differs
        chain.check_teacher(other, task, None)
    chain.teacher_fingerprint, chain.earlier_teacher = None, "elsewhere.safetensors"
    with pytest.raises(ValueError, match="cannot be read"):         # unrecorded and unreadable
        chain.check_teacher(other, task, None)


def test_concept_chain_merges_and_refuses_a_forgotten_override(tmp_path):
    run = earlier_run(tmp_path / "seven", preset="colordigits", forget_concepts=["seven"], override="one")
    merged, chain = extend(SFDConfig(preset="colordigits", forget_concepts=["red"], override="blue",
                                     init_from=str(run)))
    assert merged.forget_concepts == ["seven", "red"] and merged.override == "one,blue"
    with pytest.raises(ValueError, match="forgotten by an earlier stage"):
        extend(SFDConfig(preset="colordigits", forget_concepts=["eight"], override="seven", init_from=str(run)))


def test_rebound_is_the_drop_of_each_earlier_target():
    r = rebound({"3": 1.0, "5": 0.99}, {"ua_per_target": {"3": 0.9, "5": 1.0, "8": 0.5}})
    assert r["rebound_per_target"] == {"3": pytest.approx(0.1), "5": 0.0} and r["rebound_max"] == pytest.approx(0.1)


def test_colordigits_chain_is_accepted_and_still_checks_the_teacher(tmp_path):
    """A text teacher gets each run's prompt table (a state-dict buffer) during training; the recorded fingerprint
    is the teacher's as loaded, so stage 2 of a colordigits chain passes the teacher check (it was refused with
    'another teacher' when the fingerprint was taken after the table was installed)."""
    from sfd.denoisers import load_teacher
    from sfd.evaluate.forgetting import teacher_fingerprint
    from sfd.io import read_json
    from sfd.loop import train_sfd
    from sfd.presets import get_preset

    def stage(out, concept, override, **kw):
        cfg = SFDConfig(preset="colordigits", forget_concepts=[concept], override=override, batch_remain=4,
                        batch_forget=4, budget_kimg=0.008, eval_every_kimg=1.0, checkpoint_every_kimg=1.0,
                        device="cpu", seed=0, **kw)
        return train_sfd(cfg, out, progress=False, evaluate=False, measure_speed=False)

    bare = teacher_fingerprint(load_teacher(get_preset("colordigits")))
    stage(tmp_path / "c1", "seven", "one")
    assert read_json(tmp_path / "c1" / "metrics.json")["teacher_fingerprint"] == bare
    stage(tmp_path / "c2", "red", "blue", init_from=str(tmp_path / "c1"))
    rec = read_json(tmp_path / "c2" / "chain.json")
    assert rec["targets"] == [["seven", "one"], ["red", "blue"]] and rec["teacher_fingerprint"] == bare
    assert [s["targets"] for s in rec["stages"]] == [[["seven", "one"]], [["seven", "one"], ["red", "blue"]]]
    assert read_json(tmp_path / "c2" / "run.json")["config"]["forget_concepts"] == ["seven", "red"]

    # negative control: the check still refuses a teacher with other weights
    other = load_teacher(get_preset("colordigits"))
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    cfg = SFDConfig(preset="colordigits", forget_concepts=["red"], override="blue", batch_remain=4, batch_forget=4,
                    budget_kimg=0.008, device="cpu", init_from=str(tmp_path / "c1"))
    with pytest.raises(ValueError, match="another teacher"):
        train_sfd(cfg, tmp_path / "c2-other", teacher=other, progress=False, evaluate=False, measure_speed=False)
