"""The SFD loop (SFD.md sections 3-5): frozen teacher, conditioning of each branch, resume,
divergence, bad inputs, several forget pairs, two-stage runs, and one real forgetting check."""
import copy
import math
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import sfd.iteration
import sfd.loop
from sfd.checkpoint import latest_checkpoint, load_checkpoint
from sfd.config import SFDConfig
from sfd.denoisers import Denoiser, load_denoiser
from sfd.evaluate.metrics import judge_outputs, unlearning_accuracy
from sfd.io import CheckpointError, load_tensors
from sfd.loop import SFDDivergedError, load_generator_init, one_step, train_sfd

B = 8                      # per-branch batch of the small runs
IMGS = 2 * B               # images per iteration
KIMG_PER_IT = IMGS / 1000


def tiny(iters: int, **kw) -> SFDConfig:
    """A config of ``iters`` iterations at batch 8 + 8, evaluating/checkpointing every ``every``."""
    every = kw.pop("every", iters)
    # rounded: the loop takes ceil(budget_kimg * 1000 / images per iteration), and e.g.
    # 9 * 0.016 = 0.14400000000000002 would give a 10th iteration
    base = dict(batch_remain=B, batch_forget=B, budget_kimg=round(iters * KIMG_PER_IT, 9),
                eval_every_kimg=round(every * KIMG_PER_IT, 9), checkpoint_every_kimg=round(every * KIMG_PER_IT, 9),
                device="cpu")
    base.update(kw)
    return SFDConfig(**base)


def snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def folder_bytes(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir()) if p.is_file()}


@pytest.fixture
def sfd_cache(tmp_path_factory, monkeypatch):
    """Teacher-sample cache of the evaluator in a tmp folder shared by this session's tests."""
    d = tmp_path_factory.getbasetemp() / "sfd_cache"
    d.mkdir(exist_ok=True)
    monkeypatch.setenv("SFD_CACHE", str(d))
    return d


# ---------------------------------------------------------------------------------------
# A recording denoiser: which network was called with which labels, inputs and grad state.

@dataclass
class Call:
    tag: str
    labels: torch.Tensor
    x: torch.Tensor
    sigma: object
    grad_enabled: bool
    params_require_grad: bool
    x_requires_grad: bool
    training: bool = False


class Recorder(Denoiser):
    """Wraps a denoiser and logs every call into a list shared with its clones.

    ``clone()`` (how the loop makes the fake score and the generator from the teacher) hands
    out the next tag of ``clone_tags``, so each network of the run logs under its own name.
    """

    def __init__(self, inner: Denoiser, tag: str, log: list, clone_tags: list, clones: dict):
        super().__init__()
        self.inner = inner
        self.tag = tag
        self.log = log
        self.clone_tags = clone_tags
        self.clones = clones
        self.img_shape = inner.img_shape
        self.num_classes = inner.num_classes
        self.sigma_data = inner.sigma_data
        self.sigma_min, self.sigma_max = inner.sigma_min, inner.sigma_max
        self.spec = getattr(inner, "spec", None)   # lets the loop export the (wrapped) generator

    def forward(self, x, sigma, cond):
        self.log.append(Call(self.tag, cond.detach().clone(), x.detach().clone(), sigma, torch.is_grad_enabled(),
                             any(p.requires_grad for p in self.parameters()), x.requires_grad, self.training))
        return self.inner(x, sigma, cond)

    def null_cond(self, cond):
        return self.inner.null_cond(cond)

    def clone(self):
        tag = self.clone_tags.pop(0)
        twin = Recorder(copy.deepcopy(self.inner), tag, self.log, self.clone_tags, self.clones)
        twin.requires_grad_(True)
        self.clones[tag] = twin
        return twin


def recorded_run(teacher, cfg, tmp_path, **kw):
    log, clones = [], {}
    rec = Recorder(copy.deepcopy(teacher), "teacher", log, ["fake", "generator"], clones)
    before = snapshot(rec)
    train_sfd(cfg, tmp_path, teacher=rec, evaluate=False, progress=False, **kw)
    return rec, clones, log, before


def generator_steps(log, iters):
    """Split the log into iterations and return each iteration's generator-step calls.

    Before the first iteration, one probe pass of fake score and generator finds parameters
    that get no gradient. Per iteration the loop then makes exactly: generator (no grad) ->
    fake score (trainable) -> generator (grad) -> fake score (frozen) -> teacher.
    """
    probes, log = log[:2], log[2:]
    assert [c.tag for c in probes] == ["fake", "generator"]
    assert [c.tag for c in log] == ["generator", "fake", "generator", "fake", "teacher"] * iters
    steps = []
    for i in range(iters):
        g0, f0, g1, f1, t1 = log[5 * i: 5 * i + 5]
        # (a) fake-score step: generator samples without grad, trainable fake score
        assert not g0.grad_enabled and f0.grad_enabled and f0.params_require_grad
        assert torch.equal(g0.labels, f0.labels)
        # (b) generator step: generator with grad, fake score and teacher frozen as parameters
        assert g1.grad_enabled and g1.params_require_grad
        assert not f1.params_require_grad and not t1.params_require_grad
        # ... but the generator's gradient flows through their inputs
        assert f1.x_requires_grad and t1.x_requires_grad
        assert not f0.x_requires_grad
        # dropout where the reference has it: only the two training passes run in train mode
        assert (g0.training, f0.training, g1.training, f1.training, t1.training) == (False, True, True, False, False)
        # the generator is one denoiser call at sigma_init (SFD.md section 3)
        assert float(g0.sigma) == float(g1.sigma) == 2.5
        # teacher and fake score see the same noisy input
        assert torch.equal(f1.x, t1.x)
        steps.append((g1, f1, t1))
    return steps


# ---------------------------------------------------------------------------------------

def test_teacher_bit_identical_after_training(teacher, tmp_path):
    t = copy.deepcopy(teacher)
    before = snapshot(t)
    train_sfd(tiny(3, every=1), tmp_path, teacher=t, evaluate=False, progress=False)
    assert_same_state(before, snapshot(t))
    assert all(p.grad is None and not p.requires_grad for p in t.parameters())
    # ... while the generator did move away from the teacher
    gen, _ = load_tensors(tmp_path / "generator.safetensors")
    assert any(not torch.equal(gen[k], before[k]) for k in before)


def test_forget_branch_conditions_teacher_on_override_fixed(teacher, tmp_path):
    iters = 3
    rec, clones, log, before = recorded_run(teacher, tiny(iters, forget=[0], override="1"), tmp_path)
    for g1, f1, t1 in generator_steps(log, iters):
        # remain branch: the same remaining labels for all three networks
        assert torch.equal(t1.labels[:B], f1.labels[:B])
        assert torch.equal(g1.labels, f1.labels)
        assert not torch.isin(t1.labels[:B], torch.tensor([0])).any()
        # forget branch: generator and fake score on the forget class, teacher on the override
        assert f1.labels[B:].tolist() == [0] * B
        assert g1.labels[B:].tolist() == [0] * B
        assert t1.labels[B:].tolist() == [1] * B
    # the loop leaves the teacher untouched and the fake score trainable again
    assert_same_state(before, snapshot(rec))
    assert all(p.grad is None for p in rec.parameters())
    assert all(p.requires_grad for p in clones["fake"].parameters())
    assert all(p.requires_grad for p in clones["generator"].parameters())


@pytest.mark.parametrize("policy", ["random", "classifier"])
def test_forget_branch_override_never_the_forget_class(teacher, judge, tmp_path, policy):
    iters = 3
    _, _, log, _ = recorded_run(teacher, tiny(iters, forget=[0], override=policy), tmp_path, judge=judge)
    over = []
    for g1, f1, t1 in generator_steps(log, iters):
        assert torch.equal(t1.labels[:B], f1.labels[:B])
        assert f1.labels[B:].tolist() == [0] * B and g1.labels[B:].tolist() == [0] * B
        assert not (t1.labels[B:] == 0).any()
        assert ((t1.labels[B:] >= 1) & (t1.labels[B:] <= 9)).all()
        over.append(t1.labels[B:])
    if policy == "random":        # per sample, not one class for the whole batch
        assert len(torch.cat(over).unique()) > 1


def test_several_forget_override_pairs(teacher, tmp_path):
    iters = 3
    _, _, log, _ = recorded_run(teacher, tiny(iters, forget=[0, 3], override="1,5"), tmp_path)
    seen = set()
    for g1, f1, t1 in generator_steps(log, iters):
        assert not torch.isin(f1.labels[:B], torch.tensor([0, 3])).any()
        for f, o in zip(f1.labels[B:].tolist(), t1.labels[B:].tolist()):
            assert (f, o) in {(0, 1), (3, 5)}
            seen.add(f)
        assert torch.equal(g1.labels, f1.labels)
    assert seen == {0, 3}


def test_several_pairs_evaluated(teacher, judge, tmp_path, sfd_cache, monkeypatch):
    # the end-of-run throughput figure (500 images x 3 repeats of 35 teacher calls) is not the
    # point here; measure it on a small batch
    import functools

    import sfd.evaluate.forgetting as fg
    monkeypatch.setattr(fg, "throughput", functools.partial(fg.throughput, batch=20, repeats=1))
    cfg = tiny(2, forget=[0, 3], override="1,5", eval_forget_samples=10, eval_remain_per_class=10)
    final = train_sfd(cfg, tmp_path, teacher=copy.deepcopy(teacher), judge=judge, progress=False)
    for k in ("ua", "override_rate", "fd_remaining", "fd_forget_vs_override", "remaining_accuracy"):
        assert k in final and final[k] == final[k]          # present and not NaN
    assert final["n_forget_samples"] == 10 and final["n_remaining_samples"] == 80


def test_branch_weights_and_two_stage_zero_forget_weights(teacher, tmp_path, monkeypatch):
    """Loss = lam_remain * mean(remain) + lam_forget * mean(forget); stage 1 zeroes lam_forget."""
    def fake_per_sample(d_fake, x_g, weight, reduction="sum"):          # remain samples 1, forget samples 3
        return torch.cat([torch.ones(B), torch.full((B,), 3.0)]) + 0.0 * d_fake.sum()

    def gen_per_sample(y_real, y_fake, x_g, alpha):    # remain samples 2, forget samples 5
        return torch.cat([torch.full((B,), 2.0), torch.full((B,), 5.0)]) + 0.0 * x_g.sum()

    monkeypatch.setattr(sfd.iteration, "fake_score_loss", fake_per_sample)
    monkeypatch.setattr(sfd.iteration, "generator_loss", gen_per_sample)
    t = copy.deepcopy(teacher)
    before = snapshot(t)
    cfg = tiny(4, every=4, lambda_fake_remain=2.0, lambda_fake_forget=0.5, lambda_gen_remain=0.25,
               lambda_gen_forget=4.0, stage1_kimg=2 * KIMG_PER_IT)
    train_sfd(cfg, tmp_path, teacher=t, evaluate=False, progress=False)
    losses = json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())["losses"]
    stage1 = [2.0 * 1, 0.25 * 2]
    stage2 = [2.0 * 1 + 0.5 * 3, 0.25 * 2 + 4.0 * 5]
    assert losses == [pytest.approx(stage1)] * 2 + [pytest.approx(stage2)] * 2
    assert_same_state(before, snapshot(t))


def test_two_stage_remain_branch_covers_all_classes_in_stage1(teacher, tmp_path):
    iters = 4
    cfg = tiny(iters, forget=[0], override="1", stage1_kimg=2 * KIMG_PER_IT)
    rec, _, log, before = recorded_run(teacher, cfg, tmp_path)
    steps = generator_steps(log, iters)
    stage1_remain = torch.cat([log[5 * i].labels[:B] for i in range(2)] + [s[0].labels[:B] for s in steps[:2]])
    stage2_remain = torch.cat([log[5 * i].labels[:B] for i in range(2, 4)] + [s[0].labels[:B] for s in steps[2:]])
    assert (stage1_remain == 0).any()          # stage 1 distils every class, the forget class too
    assert not (stage2_remain == 0).any()
    for g1, f1, t1 in steps:                   # the teacher is the original model throughout
        assert t1.labels[B:].tolist() == [1] * B
    assert_same_state(before, snapshot(rec))


def test_init_from_earlier_run_loads_generator_and_fake_score(teacher, tmp_path, monkeypatch):
    first = tmp_path / "stage1"
    train_sfd(tiny(2, lambda_gen_forget=0.0, lambda_fake_forget=0.0), first, teacher=copy.deepcopy(teacher),
              evaluate=False, progress=False)
    tensors, _ = load_tensors(latest_checkpoint(first) / "state.safetensors")

    def part(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    # the library function: EMA generator (when present) and the fake score
    gen, fake = teacher.clone(), teacher.clone()
    load_generator_init(first, gen, fake)
    assert_same_state(part("generator_ema/"), snapshot(gen))
    assert_same_state(part("fake_score/"), snapshot(fake))
    assert any(not torch.equal(v, teacher.state_dict()[k]) for k, v in part("fake_score/").items())

    # ... and train_sfd uses it for init_from, keeping the original teacher
    seen = {}
    real = sfd.loop.load_generator_init

    def spy(path, generator, fake_score):
        real(path, generator, fake_score)
        seen["gen"], seen["fake"], seen["path"] = snapshot(generator), snapshot(fake_score), path

    monkeypatch.setattr(sfd.loop, "load_generator_init", spy)
    t = copy.deepcopy(teacher)
    before = snapshot(t)
    train_sfd(tiny(2, init_from=str(first)), tmp_path / "stage2", teacher=t, evaluate=False, progress=False)
    assert str(seen["path"]) == str(first)
    assert_same_state(part("generator_ema/"), seen["gen"])
    assert_same_state(part("fake_score/"), seen["fake"])
    assert_same_state(before, snapshot(t))

    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_generator_init(empty, teacher.clone(), teacher.clone())


# ---------------------------------------------------------------------------------------
# Resume equivalence

class _Stop(KeyboardInterrupt):
    pass


def test_resume_reproduces_uninterrupted_run(teacher, tmp_path):
    n = 8
    cfg = tiny(n, every=1, checkpoint_every_kimg=2 * KIMG_PER_IT)
    full = tmp_path / "full"
    train_sfd(cfg, full, teacher=copy.deepcopy(teacher), evaluate=False, progress=False)

    part = tmp_path / "part"

    def stop_at_half(m, ckpt_dir):
        if ckpt_dir is not None and m["iteration"] == 4:
            raise _Stop
    # iterations 1..4 run; the checkpoint at 4 = n/2 is written, then the run is interrupted
    with pytest.raises(KeyboardInterrupt):
        train_sfd(cfg, part, teacher=copy.deepcopy(teacher), evaluate=False, progress=False, callback=stop_at_half)
    assert latest_checkpoint(part).name == "ckpt-00000004"
    assert not (part / "generator.safetensors").exists()
    train_sfd(cfg, part, teacher=copy.deepcopy(teacher), evaluate=False, progress=False, resume=True)

    ck_full, ck_part = latest_checkpoint(full), latest_checkpoint(part)
    assert ck_full.name == ck_part.name == f"ckpt-{n:08d}"
    s_full = json.loads((ck_full / "state.json").read_text())
    s_part = json.loads((ck_part / "state.json").read_text())
    assert len(s_full["losses"]) == n
    assert s_full["losses"] == s_part["losses"]                  # exact, not approx
    t_full, _ = load_tensors(ck_full / "state.safetensors")
    t_part, _ = load_tensors(ck_part / "state.safetensors")
    assert_same_state(t_full, t_part)                            # nets, EMA, optimisers, RNG
    g_full, _ = load_tensors(full / "generator.safetensors")
    g_part, _ = load_tensors(part / "generator.safetensors")
    assert_same_state(g_full, g_part)
    # resuming a finished run does no more work
    train_sfd(cfg, part, teacher=copy.deepcopy(teacher), evaluate=False, progress=False, resume=True)
    assert latest_checkpoint(part).name == f"ckpt-{n:08d}"


# ---------------------------------------------------------------------------------------
# Bad inputs

def test_forget_class_not_in_preset():
    with pytest.raises(ValueError) as e:
        SFDConfig(forget=[12]).validate()
    msg = str(e.value)
    assert "12" in msg and "valid classes" in msg
    assert all(f"{i}=" in msg for i in range(10))


@pytest.mark.parametrize("kw, words", [
    (dict(forget=[0], override="0"), ["override class 0", "forgotten"]),
    (dict(forget=[0, 3], override="1,3"), ["override class 3", "forgotten"]),
    (dict(forget=list(range(10))), ["all 10 classes", "nothing would remain"]),
    (dict(override="banana"), ["'banana'", "random", "classifier"]),
    (dict(override="13"), ["override class 13", "valid classes"]),
    (dict(forget=[0, 3], override="1,2,4"), ["one per forget class"]),
    (dict(forget=[]), ["at least one class"]),
    (dict(lr_gen=float("nan")), ["lr_gen"]),
    (dict(sigma_dist="cosine"), ["sigma_dist", "loguniform"]),
])
def test_bad_configs_give_clear_errors(kw, words):
    with pytest.raises(ValueError) as e:
        SFDConfig(**kw).validate()
    for w in words:
        assert w in str(e.value)


def test_unknown_setting_named():
    with pytest.raises(ValueError, match="lr_generator"):
        SFDConfig.from_dict({"lr_generator": 1e-3})


def test_train_sfd_rejects_bad_config_before_writing(tmp_path):
    with pytest.raises(ValueError, match="12"):
        train_sfd(SFDConfig(forget=[12]), tmp_path / "run", evaluate=False, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("which", ["generator_loss", "fake_score_loss"])
def test_nan_loss_raises_and_keeps_checkpoints(teacher, tmp_path, monkeypatch, which):
    real = getattr(sfd.iteration, which)
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        out = real(*args)
        return out * float("nan") if calls["n"] == 5 else out   # iteration 5 of 6

    monkeypatch.setattr(sfd.iteration, which, poisoned)
    cfg = tiny(6, every=1, checkpoint_every_kimg=2 * KIMG_PER_IT)
    saved = {}

    def remember(m, ckpt_dir):
        if ckpt_dir is not None:
            saved[ckpt_dir.name] = folder_bytes(ckpt_dir)

    with pytest.raises(SFDDivergedError) as e:
        train_sfd(cfg, tmp_path, teacher=copy.deepcopy(teacher), evaluate=False, progress=False, callback=remember)
    msg = str(e.value)
    assert "nan" in msg and "iteration 5" in msg and "--resume" in msg
    assert ("generator" if which == "generator_loss" else "fake-score") in msg
    assert isinstance(e.value, FloatingPointError)

    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "ckpt-00000004"
    assert set(saved) == {"ckpt-00000002", "ckpt-00000004"}
    for name, files in saved.items():                  # both kept checkpoints, byte for byte
        assert folder_bytes(tmp_path / "checkpoints" / name) == files
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not (tmp_path / "metrics.json").exists()

    # loadable, and --resume restarts from it
    gen, ema, fake = teacher.clone(), teacher.clone(), teacher.clone()
    opts = {"generator": torch.optim.Adam(gen.parameters()), "fake_score": torch.optim.Adam(fake.parameters())}
    info = load_checkpoint(ckpt, {"generator": gen, "generator_ema": ema, "fake_score": fake}, opts,
                           torch.Generator())
    assert info["iteration"] == 4 and len(info["losses"]) == 4
    monkeypatch.setattr(sfd.iteration, which, real)
    train_sfd(cfg, tmp_path, teacher=copy.deepcopy(teacher), evaluate=False, progress=False, resume=True)
    assert latest_checkpoint(tmp_path).name == "ckpt-00000006"


# ---------------------------------------------------------------------------------------
# One real check that SFD forgets on the bundled digits teacher

@pytest.mark.slow
def test_sfd_forgets_digit_zero(teacher, judge, tmp_path):
    """Defaults (batch 64 + 64, lr 1e-4, override 0 -> 1), 40 iterations = 5.12 kimg.

    The generator starts as the teacher's one-step denoiser, whose 0s are 0s (UA ~ 0); a few
    seconds of SFD push UA on 200 forget-class samples to >= 0.9 (0.99+ when measured).
    """
    iters = 40
    cfg = SFDConfig(forget=[0], override="1", budget_kimg=round(iters * 0.128, 9), eval_every_kimg=100,
                    checkpoint_every_kimg=100, device="cpu")
    labels = torch.zeros(200, dtype=torch.long)
    z = torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    def ua_and_override(net):
        with torch.no_grad():
            pred, _, _ = judge_outputs(judge, one_step(net, z, labels, cfg.sigma_init))
        return unlearning_accuracy(pred, labels, [0]), float((pred == 1).float().mean())

    ua0, _ = ua_and_override(teacher)
    assert ua0 <= 0.1
    train_sfd(cfg, tmp_path, teacher=copy.deepcopy(teacher), evaluate=False, progress=False)
    ua, override_rate = ua_and_override(load_denoiser(tmp_path / "generator.safetensors").eval())
    assert ua >= 0.9, ua
    assert override_rate >= 0.5, override_rate


def test_resume_refuses_a_changed_configuration(teacher, tmp_path):
    cfg = tiny(2, every=1)
    train_sfd(cfg, tmp_path, teacher=copy.deepcopy(teacher), evaluate=False, progress=False)
    # a longer budget is a legitimate resumption ...
    train_sfd(cfg.replace(budget_kimg=round(3 * KIMG_PER_IT, 9)), tmp_path, teacher=copy.deepcopy(teacher),
              evaluate=False, progress=False, resume=True)
    # ... a different learning rate is not the same run
    with pytest.raises(ValueError, match=r"lr_gen: checkpoint 0.0001 vs now 0.001"):
        train_sfd(cfg.replace(lr_gen=1e-3, budget_kimg=round(4 * KIMG_PER_IT, 9)), tmp_path,
                  teacher=copy.deepcopy(teacher), evaluate=False, progress=False, resume=True)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_schedule_sets_the_rates_each_iteration(teacher, tmp_path, monkeypatch, schedule):
    """'constant' keeps both rates (the reference); 'cosine' starts at them and ends at lr_final_ratio x."""
    seen = []
    real = sfd.iteration.generator_loss

    def spy(*a, **k):                     # runs inside the iteration, after the rates were set
        seen.append((st_opt["fake"].param_groups[0]["lr"], st_opt["gen"].param_groups[0]["lr"]))
        return real(*a, **k)

    st_opt = {}
    real_build = sfd.loop.build_state

    def build(*a, **k):
        st = real_build(*a, **k)
        st_opt.update(fake=st.opt_fake, gen=st.opt_gen)
        return st

    monkeypatch.setattr(sfd.iteration, "generator_loss", spy)
    monkeypatch.setattr(sfd.loop, "build_state", build)
    cfg = tiny(9, lr_fake=2e-4, lr_gen=1e-4, lr_schedule=schedule, lr_final_ratio=0.1)
    train_sfd(cfg, tmp_path, teacher=copy.deepcopy(teacher), evaluate=False, progress=False)
    assert len(seen) == 9
    assert seen[0] == pytest.approx((2e-4, 1e-4))
    if schedule == "constant":
        assert all(s == pytest.approx((2e-4, 1e-4)) for s in seen)
    else:
        # iteration i (0-based) uses the factor at i/9: strictly decreasing towards 0.1 (reached at 9/9)
        fac = [s[1] / 1e-4 for s in seen]
        assert all(a > b for a, b in zip(fac, fac[1:]))
        assert fac[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 8 / 9)))
        assert [s[0] / 2e-4 for s in seen] == pytest.approx(fac)


@pytest.mark.parametrize("iters,every,expected", [(9, 4, [0, 4, 9]), (10, 4, [0, 4, 8, 10]), (8, 4, [0, 4, 8]), (3, 1, [0, 1, 2, 3])])
def test_an_evaluation_due_just_before_the_end_is_left_to_the_final_one(teacher, tmp_path, iters, every, expected):
    """The loop evaluates every ``every`` iterations and at the end, except a scheduled evaluation less
    than half an interval before the end (the budget's rounding: 20 kimg at 128 images per iteration is
    157 iterations, so not at 156 and again at 157)."""
    seen = []
    # checkpoints only at the end: a checkpoint between evaluations is reported too (checkpoint cadence)
    train_sfd(tiny(iters, every=every, checkpoint_every_kimg=100), tmp_path / "run", teacher=copy.deepcopy(teacher),
              evaluate=False, progress=False, callback=lambda m, ckpt: seen.append(m["iteration"]))
    assert seen == expected


def _expected_pick(history: list, threshold: float, max_override: float) -> dict:
    """keep_best_ua's rule, written out: at UA >= threshold the lowest FD ratio (override FD ratio within
    max_override first), else the highest UA; the first of equals; the start (kimg 0) never."""
    best = None
    for m in history:
        if "ua" not in m or m["kimg"] <= 0:
            continue
        tier = 2 if m["override_fd_ratio"] <= max_override else 1
        key = (tier, -m["fd_ratio"]) if m["ua"] >= threshold else (0, m["ua"])
        if best is None or key > best[0]:
            best = (key, m)
    return best[1]


def test_keep_best_ua_exports_the_best_evaluations_ema_measured_on_fresh_noise_and_resumes(
        teacher, judge, tmp_path, sfd_cache):
    """keep_best_ua: generator.safetensors is the EMA of the evaluation the rule picks (re-evaluated on the
    selection's noise it gives that evaluation's figures exactly), metrics.json reports it on noise seed
    777 + 1000, and a run interrupted and resumed picks the same. Control: off, the export is the last EMA."""
    from sfd.runs import evaluate_run
    n = 8
    # from the bundled stage 1 at the digits space's rates and batches: UA climbs within the 8 iterations
    k = 0.128
    cfg = SFDConfig(forget=[3], override="4", init_from="stage1", fake_score_reduction="mean", lr_gen=5e-4,
                    lr_fake=5e-4, ema_halflife_kimg=0.2, budget_kimg=round(n * k, 9), eval_every_kimg=k,
                    checkpoint_every_kimg=2 * k, eval_forget_samples=100, eval_remain_per_class=8, device="cpu")
    hist = []
    off = train_sfd(cfg, tmp_path / "off", teacher=copy.deepcopy(teacher), judge=judge, progress=False,
                    callback=lambda m, c: hist.append(m) if "ua" in m else None)
    uas = sorted({round(m["ua"], 6) for m in hist if m["kimg"] > 0})
    assert len(uas) >= 3, uas                                    # evaluations that the rule can tell apart
    threshold = uas[len(uas) // 2]                               # some evaluations meet it, some do not
    assert "selected_iteration" not in off
    last = evaluate_run(tmp_path / "off", seed=777, device="cpu", judge=judge)
    assert last["fd_ratio"] == pytest.approx(hist[-1]["fd_ratio"], rel=1e-6)      # control: the last EMA

    # the override cap: between the override FD ratios of the evaluations at the threshold, so that it
    # splits them; the pick must then differ from the lowest-FD-ratio rule's alone (the tier decides)
    ok = [m for m in hist if m["kimg"] > 0 and m["ua"] >= threshold]
    fd_only = min(ok, key=lambda m: m["fd_ratio"])
    cap = fd_only["override_fd_ratio"] * 0.999
    assert any(m["override_fd_ratio"] <= cap for m in ok), [(m["fd_ratio"], m["override_fd_ratio"]) for m in ok]
    on = SFDConfig.from_dict({**cfg.to_dict(), "keep_best_ua": threshold, "keep_best_max_override_fd": cap})
    full = train_sfd(on, tmp_path / "full", teacher=copy.deepcopy(teacher), judge=judge, progress=False)
    history = json.loads((tmp_path / "full" / "history.json").read_text())
    pick = _expected_pick(history, threshold, cap)
    assert pick["iteration"] != fd_only["iteration"]
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert metrics["selected_iteration"] == full["selected_iteration"] == pick["iteration"]
    assert metrics["selection"]["fd_ratio"] == pytest.approx(pick["fd_ratio"])
    assert metrics["eval_seed"] == 1777 and metrics["eval_seed_selection"] == 777
    again = evaluate_run(tmp_path / "full", seed=777, device="cpu", judge=judge)
    assert again["fd_ratio"] == pytest.approx(pick["fd_ratio"], rel=1e-6)     # the export is the picked EMA
    assert again["ua"] == pytest.approx(pick["ua"])
    fresh = evaluate_run(tmp_path / "full", seed=1777, device="cpu", judge=judge)
    assert metrics["fd_ratio"] == pytest.approx(fresh["fd_ratio"], rel=1e-6)  # reported on the fresh noise
    assert metrics["fd_ratio"] != pytest.approx(pick["fd_ratio"], rel=1e-6)

    # interrupted at the first checkpoint after the pick: the rest of the run must not displace it
    assert pick["iteration"] < n, "the pick is the last evaluation: the resume below would test nothing"
    stop = 2 * (pick["iteration"] // 2 + 1)

    def stop_after_pick(m, ckpt_dir):
        if ckpt_dir is not None and m["iteration"] == stop:
            raise _Stop
    with pytest.raises(KeyboardInterrupt):
        train_sfd(on, tmp_path / "part", teacher=copy.deepcopy(teacher), judge=judge, progress=False,
                  callback=stop_after_pick)
    info = json.loads((latest_checkpoint(tmp_path / "part") / "state.json").read_text())
    assert info["best"]["iteration"] == pick["iteration"]        # the kept evaluation is in the checkpoint
    part = train_sfd(on, tmp_path / "part", teacher=copy.deepcopy(teacher), judge=judge, progress=False,
                     resume=True)
    assert part["selected_iteration"] == full["selected_iteration"]
    assert part["fd_ratio"] == pytest.approx(full["fd_ratio"], rel=1e-6)
    g_full, _ = load_tensors(tmp_path / "full" / "generator.safetensors")
    g_part, _ = load_tensors(tmp_path / "part" / "generator.safetensors")
    assert_same_state(g_full, g_part)
