"""The shared stage 1 (distil once, forget many) and the per-target study with its UA constraint."""
import copy

import pytest
import torch

from sfd.io import load_tensors, read_json
from sfd.iteration import build_state
from sfd.loop import distil
from sfd.stage1 import (cache_root, export_stage1, find_stage1, is_stage1, resolve_init, stage1_config,
                        stage1_key)

TINY = dict(eval_forget_samples=10, eval_remain_per_class=4, device="cpu")


@pytest.fixture
def stage1(tmp_path, teacher, monkeypatch):
    monkeypatch.setenv("SFD_CACHE", str(tmp_path / "cache"))
    path = distil("digits", 0.26, tmp_path / "s1", progress=False, teacher_module=copy.deepcopy(teacher),
                  command="test", **TINY)
    return path


def test_distil_writes_a_keyed_stage1_that_starts_stage2(stage1, teacher, digits):
    assert is_stage1(stage1)
    man = read_json(stage1 / "stage1.json")
    cfg = stage1_config("digits", 0.26, 0, **TINY)
    assert man["key"] == stage1_key(cfg, teacher)
    assert man["config"]["lambda_gen_forget"] == 0 and man["config"]["stage1_kimg"] == 0.26
    tensors, _ = load_tensors(stage1 / "state.safetensors")
    assert {k.split("/")[0] for k in tensors} == {"generator_ema", "fake_score"}   # no optimiser states
    # stage 2 starts from it: the generator and fake score are the stage-1 weights, not the teacher's
    from sfd.loop import load_generator_init
    st = build_state(cfg.replace(init_from=str(stage1)), copy.deepcopy(teacher), "cpu",
                     init=lambda g, f: load_generator_init(resolve_init(str(stage1), digits, teacher), g, f))
    gen = {k: v for k, v in st.generator.state_dict().items()}
    assert all(torch.equal(gen[k], tensors["generator_ema/" + k]) for k in gen)
    assert any(not torch.equal(gen[k], v) for k, v in teacher.state_dict().items())


def test_stage1_key_tracks_what_changes_the_result(teacher):
    base = stage1_config("digits", 100, 0)
    k = stage1_key(base, teacher)
    assert stage1_key(base.replace(eval_forget_samples=7, device="cpu"), teacher) == k     # observation only
    assert stage1_key(base.replace(lr_gen=3e-4), teacher) != k
    assert stage1_key(stage1_config("digits", 200, 0), teacher) != k
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert stage1_key(base, other) != k


def test_find_stage1_by_key_and_refuse_another_teacher(stage1, teacher, digits):
    key = read_json(stage1 / "stage1.json")["key"]
    assert find_stage1(key, digits) is None                      # not in the cache yet
    cached = export_stage1(stage1 / "run", cache_root() / key, key,
                           stage1_config("digits", 0.26, 0, **TINY),
                           teacher_fingerprint=read_json(stage1 / "stage1.json")["teacher_fingerprint"])
    assert find_stage1(key, digits) == cached
    assert find_stage1("0" * 16, digits) is None
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="another teacher"):
        resolve_init(str(stage1), digits, other)
    assert resolve_init(None, digits, teacher) is None


def test_per_target_study_treats_ua_as_a_constraint():
    from orchestration.search import PerTargetSearch
    from orchestration.space import load_space, space_path
    from orchestration.targets import parse_targets

    targets = parse_targets(["digits:3->4"])
    space = load_space(space_path("digits"))
    s = PerTargetSearch(targets, {"digits": space}, trials_per_target=3, ua_threshold=0.99)
    first = s.suggest("t0")
    assert first["baseline"] and first["params"] == space.baseline_point()     # the default is trial 1
    s.suggest("t1"), s.suggest("t2")
    # t1 has the best FD but did not forget: infeasible; t0 and t2 forgot
    s.on_trial_complete("t0", {"ua": 0.995, "fd_ratio": 2.0, "override_fd_ratio": 1.5})
    s.on_trial_complete("t1", {"ua": 0.50, "fd_ratio": 1.1, "override_fd_ratio": 1.0})
    s.on_trial_complete("t2", {"ua": 1.0, "fd_ratio": 1.6, "override_fd_ratio": 3.0})
    study = s.studies["digits:3->4"]
    feasible = {t.number for t in study.best_trials}
    assert 1 not in feasible and feasible == {0, 2}                # a Pareto front of feasible trials only
    assert study.trials[1].constraints == {"ua_threshold": pytest.approx(0.49)}
    from ray.tune.search import Searcher
    assert s.suggest("t3") == Searcher.FINISHED                      # 3 trials per target, all asked
    # a trial without metrics (stopped before its first evaluation) is a failed Optuna trial
    s2 = PerTargetSearch(targets, {"digits": space}, trials_per_target=1)
    s2.suggest("x")
    s2.on_trial_complete("x", {"iteration": 0})
    assert s2.studies["digits:3->4"].trials[0].state.name == "FAIL"
