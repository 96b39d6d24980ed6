"""SFD on N workers: Ray Train (gloo) with 2 workers against 1 worker in this process.

One Ray Train fit runs every 2-worker phase (Ray start-up costs more than the phases):
- the synchronised gradients of generator and fake score in the first iteration (before
  clipping and the optimiser) equal one worker's, for the bundled digits UNet and a small DDPM
  with dropout 0.1; a gradient mis-scaled by 2 on one rank's fake-score path is caught;
- parameters after 5 iterations;
- runs stopped by ``stop_when`` and by ``max_seconds`` end on both ranks (a hang would hit the
  process group's 120 s timeout and fail the fit), and the sharded evaluation equals one
  worker's UA/FD.
Adam hides a global gradient scale (its step is scale-invariant), so the checks compare
gradients, not losses.

LoRA on the shared Stable Diffusion UNet (generator and fake score as two adapters, each view its own DDP
module) runs on 2 gloo ranks spawned by its test through a rendezvous file, without Ray.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from sfd.config import SFDConfig
from sfd.distributed import Dist
from sfd.io import load_tensors, save_tensors
from sfd.iteration import build_state, sfd_iteration

B = 8                                   # per branch: 16 images per iteration
ITERS = 5
EVAL = dict(eval_forget_samples=30, eval_remain_per_class=6)


def make_teacher(arch: str):
    if arch == "anchor":                # colordigits with the anchor term (a third backward pass)
        from sfd.denoisers import load_teacher
        from sfd.presets import get_preset
        return load_teacher(get_preset("colordigits"))
    if arch == "digits":
        from sfd.denoisers import load_teacher
        from sfd.presets import get_preset
        return load_teacher(get_preset("digits"))
    from sfd.denoisers.ddpm import ConditionalDDPMUNet, VPDenoiser
    torch.manual_seed(0)                # the same random weights in every process
    return VPDenoiser(ConditionalDDPMUNet(resolution=8, in_channels=1, out_channels=1, ch=32, ch_mult=[1, 2],
                                          num_res_blocks=1, attn_resolutions=[4], dropout=0.1, num_classes=10))


def case_config(arch: str, variant: str = "params") -> SFDConfig:
    if arch == "anchor":
        # float32 (diffusers' UNet runs no float64), so the generator's SiD terms are off: in the first iteration
        # their y_real - y_fake is rounding noise; the generator's gradient is the anchor term's alone
        return SFDConfig(preset="colordigits", forget_concepts=["seven"], override="one", batch_remain=B,
                         batch_forget=B, device="cpu", lambda_anchor=1.0, anchor_per_prompt=2, anchor_batch=B,
                         lambda_gen_remain=0.0, lambda_gen_forget=0.0).validate()
    return SFDConfig(forget=[0], override="1", batch_remain=B, batch_forget=B, device="cpu",
                     sigma_dist="vp-t" if arch == "ddpm" else "loguniform")


def run_case(arch: str, variant: str, dist: Dist, rank: int = 0) -> dict:
    """ITERS iterations; first-iteration synchronised gradients, final parameters, losses.

    ``variant``: 'grads', 'corrupt' (grads with a deliberate bug), 'params' or 'params32'. All
    but 'params32' run in float64: in the first iteration the fake score equals the teacher, so
    the remain branch's y_real - y_fake is pure rounding noise in float32, and reduction-order
    rounding would swamp a 1e-5 comparison on a random-weight backbone. In float64 the loop's
    own code (the fp32 path, which keeps the input dtype) is compared without that noise.
    """
    corrupt = variant == "corrupt"
    dtype = torch.float32 if variant == "params32" or arch == "anchor" else torch.float64
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return _run_case(arch, variant, dist, rank, corrupt, dtype)
    finally:
        torch.set_default_dtype(prev)


def _run_case(arch, variant, dist, rank, corrupt, dtype) -> dict:
    judge = None
    if arch == "anchor":
        from sfd.tasks import get_task
        judge = get_task("colordigits").load_judge(case_config(arch))
    st = build_state(case_config(arch, variant), make_teacher(arch).to(dtype), "cpu", dist, judge=judge)
    out: dict[str, torch.Tensor] = {}

    def grads_hook(name, net):
        if st.iteration == 0:
            for n, p in net.named_parameters():
                if p.grad is not None:
                    out[f"grad/{name}/{n}"] = p.grad.detach().clone()

    def loss_hook(name, loss):          # a deliberate bug: rank 0's fake-score (anchor: anchor) loss counted twice
        return loss * 2 if corrupt and name == ("anchor" if arch == "anchor" else "fake_score") and rank == 0 else loss

    losses = [sfd_iteration(st, grads_hook=grads_hook, loss_hook=loss_hook) for _ in range(ITERS)]
    for name, net in (("generator", st.generator), ("fake_score", st.fake_score)):
        for n, p in net.named_parameters():
            out[f"param/{name}/{n}"] = p.detach().clone()
    out["losses"] = torch.tensor(losses, dtype=torch.float64)
    return out


def stop_run_config(**kw) -> SFDConfig:
    return SFDConfig(forget=[0], override="1", batch_remain=B, batch_forget=B, device="cpu", budget_kimg=10.0,
                     eval_every_kimg=0.016, checkpoint_every_kimg=100, **EVAL, **kw)


def stop_at_three(m):
    return m["iteration"] >= 3


def ddp_phases(config: dict) -> None:
    """Ray Train worker: every 2-worker phase, results written by each rank."""
    import ray.train
    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    out = Path(config["out"])
    dist = Dist.current()
    assert dist.world_size == 2
    for arch in ("digits", "ddpm", "anchor"):
        for variant in ("grads", "corrupt", "params", "params32") if arch != "anchor" else ("grads", "corrupt"):
            res = run_case(arch, variant, dist, rank)
            if rank == 0:
                save_tensors(out / f"{arch}-{variant}.safetensors", res)
    from sfd.loop import train_sfd
    for name, cfg, stop in (("stop_when", stop_run_config(), stop_at_three),
                            ("max_seconds", stop_run_config(max_seconds=1.0), None)):
        final = train_sfd(cfg, out / f"run-{name}", progress=False, stop_when=stop, measure_speed=False)
        (out / f"{name}-rank{rank}.json").write_text(json.dumps(
            {"iteration": final["iteration"], **{k: final.get(k) for k in ("ua", "fd_ratio", "fd_remaining")}}))


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """Run ddp_phases on 2 Ray Train workers (gloo) once for the module."""
    import ray
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = tmp_path_factory.mktemp("ddp")
    cache = tmp_path_factory.mktemp("cache")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers cannot import tests/
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"SFD_CACHE": str(cache)}})
    try:
        result = TorchTrainer(ddp_phases, train_loop_config={"out": str(out)},
                              scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                              torch_config=TorchConfig(backend="gloo", timeout_s=120),
                              run_config=RunConfig(name="ddp", storage_path=str(out / "ray"))).fit()
        assert result.error is None, result.error
    finally:
        ray.shutdown()
    return out, cache


def grad_errors(two: dict, one: dict) -> dict[str, float]:
    """Per network: relative error of the whole flattened gradient, and the worst single
    tensor's error measured against the network's gradient norm (a near-zero tensor, e.g. a
    bias right before a GroupNorm, has no meaningful error of its own)."""
    out = {}
    for net in ("generator", "fake_score"):
        keys = sorted(k for k in one if k.startswith(f"grad/{net}/"))
        assert keys and keys == sorted(k for k in two if k.startswith(f"grad/{net}/"))
        a = torch.cat([two[k].flatten() for k in keys])
        b = torch.cat([one[k].flatten() for k in keys])
        norm = b.norm()
        out[f"{net}/flat"] = float((a - b).norm() / norm)
        out[f"{net}/worst_tensor"] = max(float((two[k] - one[k]).norm() / norm) for k in keys)
        out[f"{net}/tensors"] = len(keys)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["digits", "ddpm"])
def test_two_workers_synchronised_gradients_equal_one_worker(two_workers, arch):
    out, _ = two_workers
    one = run_case(arch, "grads", Dist())
    two, _ = load_tensors(out / f"{arch}-grads.safetensors")
    errs = grad_errors(two, one)
    # every trained parameter of both networks is in the reduction
    st = build_state(case_config(arch), make_teacher(arch), "cpu")
    assert errs["fake_score/tensors"] == len(st.opt_fake.param_groups[0]["params"])
    assert errs["generator/tensors"] == len(st.opt_gen.param_groups[0]["params"])
    for k in ("generator/flat", "generator/worst_tensor", "fake_score/flat", "fake_score/worst_tensor"):
        assert errs[k] < 1e-5, (k, errs)
    # negative control: rank 0's fake-score loss counted twice -> its half of the synchronised
    # fake-score gradient is doubled (1.5x overall), and the comparison catches it
    bad = grad_errors(load_tensors(out / f"{arch}-corrupt.safetensors")[0], one)
    assert bad["fake_score/flat"] > 0.1, bad


@pytest.mark.slow
def test_two_workers_anchor_term_gradients_equal_one_worker(two_workers):
    """colordigits with the anchor term: its backward pass adds to the generator's gradient on each rank before
    the step, so the synchronised gradient of both passes equals one worker's; rank 0's anchor loss counted
    twice is caught."""
    out, _ = two_workers
    one = run_case("anchor", "grads", Dist())
    errs = grad_errors(load_tensors(out / "anchor-grads.safetensors")[0], one)
    for k in ("generator/flat", "generator/worst_tensor", "fake_score/flat", "fake_score/worst_tensor"):
        assert errs[k] < 1e-5, (k, errs)
    bad = grad_errors(load_tensors(out / "anchor-corrupt.safetensors")[0], one)
    assert bad["generator/flat"] > 0.05 and bad["fake_score/flat"] < 1e-5, bad


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["digits", "ddpm"])
def test_two_workers_parameters_after_five_iterations(two_workers, arch):
    """After 5 iterations the parameters agree element-wise: to 1e-9 in float64; in float32
    within Adam's step bound. Adam's first steps are sign-like (m / (sqrt(v) + eps) ~ +-1 once
    |g| >> eps = 1e-8), so an element whose true gradient is ~0 but whose float32 rounding noise
    exceeds eps can move +lr on one side and -lr on the other: in float32 elements may differ
    by up to 2 * lr per iteration (in float64 the noise stays far below eps)."""
    out, _ = two_workers
    lr = max(case_config(arch).lr_gen, case_config(arch).lr_fake)
    for variant in ("params", "params32"):
        one = run_case(arch, variant, Dist())
        two, _ = load_tensors(out / f"{arch}-{variant}.safetensors")
        assert torch.allclose(two["losses"], one["losses"], rtol=1e-6 if variant == "params" else 1e-4, atol=1e-6)
        worst = max(float((two[k] - one[k]).abs().max()) for k in one if k.startswith("param/"))
        if variant == "params":
            assert worst <= 1e-9, worst
        else:
            assert worst <= 2 * lr * ITERS + 1e-6, worst


@pytest.mark.slow
def test_two_worker_runs_stop_on_every_rank_and_shard_evaluation(two_workers, monkeypatch):
    out, cache = two_workers
    monkeypatch.setenv("SFD_CACHE", str(cache))
    from sfd.loop import train_sfd
    for name in ("stop_when", "max_seconds"):
        ranks = [json.loads((out / f"{name}-rank{r}.json").read_text()) for r in (0, 1)]
        # both ranks left the loop at the same iteration (else the fit would have hung)
        assert ranks[0]["iteration"] == ranks[1]["iteration"] > 0
        assert ranks[1]["ua"] is None          # metrics are computed on rank 0 only
    two = json.loads((out / "stop_when-rank0.json").read_text())
    assert two["iteration"] == 3
    # the same run on one worker: the sharded evaluation gave the same UA and FD
    one = train_sfd(stop_run_config(), out / "one-worker", progress=False, stop_when=stop_at_three,
                    measure_speed=False)
    assert one["iteration"] == 3
    assert two["ua"] == pytest.approx(one["ua"], abs=1e-9)
    assert two["fd_remaining"] == pytest.approx(one["fd_remaining"], rel=1e-3)
    assert two["fd_ratio"] == pytest.approx(one["fd_ratio"], rel=1e-3)


def test_resume_is_exact_with_dropout(tmp_path, monkeypatch):
    """A DDPM backbone with dropout 0.1: 2 + 2 resumed iterations == 4 straight ones (losses and
    parameters, ==), because dropout masks come from the checkpointed RNG."""
    from sfd.checkpoint import latest_checkpoint
    from sfd.loop import train_sfd

    def cfg(iters):
        return SFDConfig(forget=[0], override="1", batch_remain=B, batch_forget=B, device="cpu",
                         budget_kimg=round(iters * 2 * B / 1000, 9), eval_every_kimg=round(2 * B / 1000, 9),
                         checkpoint_every_kimg=round(2 * 2 * B / 1000, 9), sigma_dist="vp-t")

    train_sfd(cfg(4), tmp_path / "straight", teacher=make_teacher("ddpm"), evaluate=False, progress=False)
    train_sfd(cfg(2), tmp_path / "resumed", teacher=make_teacher("ddpm"), evaluate=False, progress=False)
    train_sfd(cfg(4), tmp_path / "resumed", teacher=make_teacher("ddpm"), evaluate=False, progress=False,
              resume=True)
    a, b = latest_checkpoint(tmp_path / "straight"), latest_checkpoint(tmp_path / "resumed")
    assert json.loads((a / "state.json").read_text())["losses"] == json.loads((b / "state.json").read_text())["losses"]
    ta, _ = load_tensors(a / "state.safetensors")
    tb, _ = load_tensors(b / "state.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    # and dropout was really on: the same run with dropout off differs
    def no_dropout():
        t = make_teacher("ddpm")
        for m in t.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        return t
    train_sfd(cfg(4), tmp_path / "nodrop", teacher=no_dropout(), evaluate=False, progress=False)
    c = latest_checkpoint(tmp_path / "nodrop")
    assert json.loads((c / "state.json").read_text())["losses"] != json.loads((a / "state.json").read_text())["losses"]


@pytest.mark.slow
def test_sfd_forget_num_workers_runs_on_ray_train(tmp_path):
    """`sfd forget --num-workers 2`: the run on 2 Ray Train workers, outputs as a local run's."""
    import subprocess
    env = {**__import__("os").environ, "SFD_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "sfd", "forget", "--num-workers", "2", "--out", str(tmp_path / "run"),
                        "--budget-kimg", "0.032", "--batch-remain", "8", "--batch-forget", "8", "--eval-every-kimg",
                        "0.016", "--eval-forget-samples", "20", "--eval-remain-per-class", "4", "--no-progress"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["iteration"] == 2 and 0 <= m["ua"] <= 1 and m["fd_ratio"] > 0
    assert (tmp_path / "run" / "generator.safetensors").is_file()
    assert "ua" in r.stdout


# -- LoRA on the shared SD UNet under DDP (2 gloo ranks spawned here: no Ray) ----------------------------
LORA_ITERS = 3


def run_lora_case(folder, dist: Dist, checkpointing: bool = False) -> dict:
    """LORA_ITERS iterations of a LoRA run (global batch 2 + 2) on tiny SD components, in float64 (see
    run_case); the adapters' parameters, the base UNet's digest and the losses."""
    from test_sd import PRESET, sd_cfg

    from sfd.evaluate.sd_judges import base_fingerprint
    from sfd.tasks import get_task
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        cfg = sd_cfg(folder, lora_rank=4, batch_remain=2, batch_forget=2, grad_checkpointing=checkpointing).validate()
        teacher = get_task(PRESET).load_teacher(cfg.teacher).to(torch.float64)
        base0 = base_fingerprint(teacher)
        st = build_state(cfg, teacher, "cpu", dist)
        losses = [sfd_iteration(st) for _ in range(LORA_ITERS)]
        out = {f"param/{name}/{n}": p.detach().clone() for name, net in st.modules().items()
               for n, p in net.named_parameters()}
        out["losses"] = torch.tensor(losses, dtype=torch.float64)
        out["base_same"] = torch.tensor(base_fingerprint(teacher) == base0)
        out["wrapped"] = torch.tensor(st.fake_train is not st.fake_score and st.gen_train is not st.generator)
        return out
    finally:
        torch.set_default_dtype(prev)


def _lora_rank(rank: int, world: int, folder: str, out: str) -> None:
    """One spawned rank: a gloo process group through a rendezvous file, then run_lora_case without and with
    gradient checkpointing (one spawn for both: starting the processes costs more than the runs)."""
    import datetime
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=120))
    try:
        for ckpt in (False, True):
            save_tensors(Path(out) / f"lora-ckpt{int(ckpt)}-rank{rank}.safetensors",
                         run_lora_case(Path(folder), Dist.current(), ckpt))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_lora_adapters_under_two_rank_ddp_equal_one_rank(tmp_path):
    """Generator and fake score as two LoRA adapters on the one UNet, each wrapped in DDP on 2 gloo ranks: after
    3 iterations both ranks hold the same adapters (generator, fake score and EMA), equal to one rank's with the
    same global batch (float64: to 1e-9, as the Ray test above), and the shared base is unchanged -- also with
    gradient checkpointing, which recomputes each block under its own adapter inside DDP's backward."""
    import torch.multiprocessing as mp
    from test_sd import make_sd_folder
    folder = make_sd_folder(tmp_path / "sd", "epsilon")
    mp.spawn(_lora_rank, args=(2, str(folder), str(tmp_path)), nprocs=2, join=True)
    for ckpt in (False, True):
        r0, _ = load_tensors(tmp_path / f"lora-ckpt{int(ckpt)}-rank0.safetensors")
        r1, _ = load_tensors(tmp_path / f"lora-ckpt{int(ckpt)}-rank1.safetensors")
        one = run_lora_case(folder, Dist(), ckpt)
        assert bool(r0["wrapped"]) and bool(r1["wrapped"]) and not bool(one["wrapped"])      # DDP on 2 ranks only
        assert bool(r0["base_same"]) and bool(r1["base_same"]) and bool(one["base_same"])
        keys = sorted(k for k in one if k.startswith("param/"))
        assert keys == sorted(k for k in r0 if k.startswith("param/")) and all("lora_" in k for k in keys)
        assert {k.split("/")[1] for k in keys} == {"generator", "generator_ema", "fake_score"}
        for k in keys:
            assert torch.equal(r0[k], r1[k]), (ckpt, k)                              # the ranks agree exactly
        assert torch.allclose(r0["losses"], one["losses"], rtol=1e-9, atol=1e-9), ckpt
        worst = max(float((r0[k] - one[k]).abs().max()) for k in keys)
        moved = max(float(one[k].abs().max()) for k in keys if "lora_B" in k)           # lora_B starts at 0
        assert worst <= 1e-9 and moved > 1e-4, (ckpt, worst, moved)
