"""`sfd ...`: single runs from the command line. The sweep lives in orchestration/sweep.py."""
from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sys
import warnings
from pathlib import Path

import torch

from . import __version__, assets
from .bench import run_bench
from .chain import extend
from .config import (ATTACK_CHOICES, DEFAULT_LAYER, GROUPS, SETTINGS, check_device, format_config, layered_config,
                     preset_layers, space_label)
from .denoisers import load_denoiser
from .evaluate.report import save_grid
from .fetch import describe, run_fetch
from .io import CheckpointError, read_json, read_metadata, save_tensors, write_json
from .loop import Stopped, distil, one_step, train_sfd
from .presets import PRESETS, get_preset
from .raytrain import fit_single_run
from .rundir import holds_run, plan_run_dir
from .robustness import ATTACK_KINDS, Budget
from .runs import attack_after_run, attack_run, evaluate_run
from .tasks import get_task
from .tasks.classes import parse_classes
from .train_judge import DEFAULTS, train_resnet_judge
from .utils import command_line, pick_device


class UsageError(ValueError):
    """A user mistake on the command line (printed as `sfd: error: ...`, exit 2)."""


class SfdArgumentParser(argparse.ArgumentParser):
    """argparse's errors in sfd's one style: `sfd: error: <what> — <what to do>`, exit 2."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"sfd: error: {message} — see '{self.prog} --help'\n")


def _finite(name: str, v: float, *, low: float | None = None, low_open: bool = False, fix: str = "") -> float:
    if not math.isfinite(v) or (low is not None and (v <= low if low_open else v < low)):
        raise UsageError(f"{name} {v!r} is invalid — give {fix}")
    return v


def _positive_int(name: str, v: int, fix: str = "a whole number >= 1") -> int:
    if v < 1:
        raise UsageError(f"{name} {v!r} is invalid — give {fix}")
    return v


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="digits", choices=sorted(PRESETS),
                   help="dataset preset (default: digits, the embedded 8x8 handwritten digits)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA if present, else CPU), 'cpu', 'cuda:0', ...")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def cmd_train_classifier(a) -> int:
    preset = get_preset(a.preset)
    if not preset.embedded:
        return _train_resnet_judge(a, preset)
    if not a.out:
        raise UsageError("--out is required for the digits classifier — give a folder, e.g. runs/classifier "
                         "(the bundled weights folder only if you name it)")
    a.steps = 3000 if a.steps is None else a.steps
    a.batch = 128 if a.batch is None else a.batch
    a.lr = 2e-3 if a.lr is None else a.lr
    _check_trainer_args(a)
    print(get_task(preset).train_judge(a.out, steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed, device=a.device,
                                       progress=not a.no_progress))
    return 0


def _train_resnet_judge(a, preset) -> int:


    out = Path(a.out) if a.out else assets.classifier_path(preset.name)
    if out.suffix != ".safetensors":
        out = out / f"resnet34_{preset.name}.safetensors"
    a.steps = DEFAULTS["steps"] if a.steps is None else a.steps
    a.batch = DEFAULTS["batch"] if a.batch is None else a.batch
    a.lr = DEFAULTS["lr"] if a.lr is None else a.lr
    _check_trainer_args(a, out.parent)
    init = a.init
    if init is None:
        row = assets.find(assets.REGISTRY, preset.name, "classifier_init")
        init = str(row.path()) if row is not None and row.path().is_file() else None
        if init is None:
            print(f"sfd train-classifier: note: no ImageNet ResNet-34 in the cache ({row.path() if row else '-'}; "
                  f"`sfd fetch {preset.name}` downloads it): training from random initialisation", file=sys.stderr)
    elif init == "none":
        init = None
    m = train_resnet_judge(preset, out, steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed, device=a.device, init=init,
                           progress=not a.no_progress)
    print(f"classifier: ResNet-34, test accuracy {m['metrics']['test_accuracy']:.4f} ({m['metrics']['n_test']} "
          f"images), {m['steps']} steps, {m['wall_seconds']} s -> {out} (+ {out.with_suffix('.json').name})")
    return 0


def cmd_fetch(a) -> int:

    if a.list:
        print(describe(a.preset, a.home))
        return 0
    try:
        r = run_fetch(a.preset, teacher=a.teacher, home=a.home, mirror=a.mirror, progress=not a.no_progress,
                      skip_classifier=a.skip_classifier, classifier=a.classifier, stats=not a.no_stats,
                      device=a.device)
    except assets.DownloadError as e:
        print(f"sfd: error: {e}", file=sys.stderr)
        return 1
    return 0 if not r["missing"] or all("train-classifier" in m for m in r["missing"]) else 1


def fill_cached_assets(cfg, command: str = "forget"):
    """Omitted teacher / judge files of a real-dataset preset come from $SFD_HOME (``sfd fetch``);
    ``--teacher edm|ddpm`` picks a cached public teacher by name."""

    preset = get_preset(cfg.preset)
    if not get_task(preset).uses_fetched_assets():
        return cfg
    judge = ("classifier", "fid_weights", "reference")
    given = {k: getattr(cfg, k) for k in ("teacher", *judge)}
    paths, missing = assets.resolve(preset.name, given)
    if paths["teacher"] is None:
        raise ValueError(f"preset '{preset.name}' has no bundled teacher and none is cached in {assets.sfd_home()} "
                         f"— pass --teacher PATH (or a cached one by name: {', '.join(assets.TEACHER_NAMES)}), or "
                         f"put it at:\n{missing['teacher']}")
    if not all(paths[k] for k in judge):
        if any(given[k] for k in judge):
            raise ValueError(assets.missing_message(preset.name, {k: v for k, v in missing.items() if k in judge},
                                                    "a complete judge for UA/FD"))
        for k in judge:                     # nothing given, judge incomplete: train only, say what is missing
            paths[k] = None
        print(f"sfd {command}: note: UA/FD need these files too:\n" +
              "\n".join(v for k, v in missing.items() if k in judge), file=sys.stderr)
    for k, v in paths.items():
        if v is not None and getattr(cfg, k) != v:
            setattr(cfg, k, str(v))
            print(f"sfd {command}: {k} = {v} (from the cache)", file=sys.stderr)
    return cfg


def _check_trainer_args(a, out_dir=None) -> None:
    _positive_int("--steps", a.steps)
    _positive_int("--batch", a.batch)
    _finite("--lr", a.lr, low=0.0, low_open=True, fix="a learning rate > 0")
    if a.seed < 0:
        raise UsageError(f"--seed {a.seed} is invalid — give a seed >= 0")
    check_device(a.device)
    out = Path(out_dir if out_dir is not None else a.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file — give a folder")


def cmd_pretrain(a) -> int:
    task = get_task(a.preset)
    if a.steps is None:
        a.steps = task.pretrain_steps
    _check_trainer_args(a)
    _positive_int("--channels", a.channels)
    if a.channels > 1024:
        raise UsageError(f"--channels {a.channels} is too wide — give at most 1024")
    _positive_int("--eval-per-class", a.eval_per_class)
    if not (Path(a.out) / "classifier.safetensors").is_file():
        raise UsageError(f"--out {a.out} has no classifier.safetensors — run `sfd train-classifier --out {a.out}` "
                         f"first (the teacher is evaluated with it)")
    print(task.pretrain(a.out, steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed, channels=a.channels,
                        device=a.device, progress=not a.no_progress, eval_per_class=a.eval_per_class))
    return 0


def add_config_flags(p: argparse.ArgumentParser, skip=()) -> None:
    """One flag per SFDConfig setting, generated from its declaration in sfd.config (help, type, choices,
    topic group). A flag left out takes the preset's default (search_spaces/<preset>.yaml, as the sweep's
    baseline does), else SFDConfig's; `--print-config` says which."""
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    for s in SETTINGS.values():
        if s.name in skip or not s.flag:
            continue                     # text presets: --forget fills forget_concepts; the others: config files
        g, default = groups[s.group], s.default
        if s.name == "forget":
            g.add_argument(s.flag_name, action="append", default=None,
                           help=f"{s.help}; text presets (colordigits): concept(s), e.g. 'seven' or "
                                f"'seven,red' (default: 0)")
        elif s.name == "preset":
            g.add_argument(s.flag_name, default=None, choices=sorted(PRESETS), help=f"{s.help} (default: {default})")
        elif s.value_type == "bool":
            g.add_argument(s.flag_name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{s.help} (default: {default})")
        else:                            # a bad value or choice is SFDConfig.validate's to name (one message)
            parse = {"float": float, "int": int}.get(s.value_type, str)
            metavar = "{" + ",".join(s.choices) + "}" if s.choices else None
            g.add_argument(s.flag_name, type=parse, default=None, metavar=metavar, help=f"{s.help} (default: {default})")


def config_from_args(a, sources: dict | None = None):
    """SFDConfig from the flags given, over the preset's defaults (one source with the sweep);
    ``sources``, when given, receives for each setting the layer that set it (--print-config)."""
    given = {n: getattr(a, n) for n in SETTINGS if getattr(a, n, None) is not None}
    preset = given.get("preset", "digits")
    given = get_task(preset).settings_from_flags(given)

    def flag(k):                              # the layer of a setting from the command line: its flag
        return "--forget" if k == "forget_concepts" else SETTINGS[k].flag_name if k in given else DEFAULT_LAYER

    # with the policy's own defaults (search_spaces/<preset>.yaml: override_defaults), under the flags given
    cfg, where = layered_config(preset_layers(preset, {k: v for k, v in given.items() if k != "preset"}, flag))
    if sources is not None:
        sources.update(where)
    return cfg


def print_config(cfg, sources: dict) -> int:
    """`sfd forget --print-config`: the settings as the run would use them (validated), each with
    the layer that set it; nothing runs."""
    before = cfg.to_dict()
    cfg, chain = extend(cfg)                 # --init-from an earlier forgetting run: its targets first
    cfg.validate(get_preset(cfg.preset))
    for k, v in cfg.to_dict().items():       # e.g. a text preset's --forget becomes forget_concepts
        if v != before[k]:
            how = f"the chain of {chain.run} (--init-from)" if chain and k in ("forget", "forget_concepts", "override") \
                else "SFDConfig.validate"
            sources[k] = f"{sources[k]}, resolved by {how}"
    print(f"# sfd forget --print-config: the settings this run would use, each with the layer that set it;\n"
          f"# a later layer wins: {DEFAULT_LAYER} < {space_label(cfg.preset)} defaults < its override_defaults"
          f"[<policy>]\n#   < flags < the $SFD_HOME cache (teacher and judge files left out)")
    print("\n".join(format_config(cfg, sources)))
    return 0


def _fmt(m: dict, keys) -> str:
    def one(v):
        if isinstance(v, dict):               # per target: {'3': 1.0, '5': 0.998} -> {3: 1, 5: 0.998}
            return "{" + ", ".join(f"{t}: {one(x)}" for t, x in v.items()) + "}"
        return f"{v:.4g}" if isinstance(v, float) else f"{v}"
    return ", ".join(f"{k} {one(m[k])}" for k in keys if k in m)


SUMMARY_KEYS = ("ua", "ua_per_target", "ua_worst", "rebound_per_target", "rebound_max", "ua_heldout",
                "ua_heldout_per_target", "override_rate", "leakage_accuracy", "leakage_accuracy_teacher", "remaining_accuracy", "remaining_accuracy_teacher", "fd_remaining",
                "fd_remaining_teacher", "fd_ratio", "fd_forget_vs_override", "fd_override_teacher", "kimg",
                "train_seconds", "images_per_second_generator", "images_per_second_teacher", "asr_discrete",
                "asr_continuous", "residue_worst_family", "side_effect_worst_cell")


class StopOnSignal:
    """SIGINT / SIGTERM during `sfd forget`: the first asks the loop to stop after the iteration (it writes a
    checkpoint); a second stops at once (checkpoints are written atomically, so none is left half-written)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _handler(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            return
        raise Interrupted(signum)

    def __enter__(self) -> "StopOnSignal":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Interrupted(Exception):
    """A second SIGINT / SIGTERM: stop now, without a new checkpoint."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def cmd_forget(a) -> int:
    sources = {}
    cfg = config_from_args(a, sources)
    before = cfg.to_dict()
    cfg = fill_cached_assets(cfg)
    sources.update({k: "the $SFD_HOME cache (sfd fetch)" for k, v in cfg.to_dict().items() if v != before[k]})
    if a.print_config:
        return print_config(cfg, sources)
    if not a.out:
        raise UsageError("--out is required — give a run folder, e.g. --out runs/forget0 (or --print-config to "
                         "see the settings without running)")
    if a.num_workers < 1:
        raise UsageError(f"--num-workers {a.num_workers}: give at least 1")
    _finite("--cpus-per-worker", a.cpus_per_worker, low=0.0, low_open=True, fix="a number of CPUs > 0")
    _finite("--gpus-per-worker", a.gpus_per_worker, low=0.0, fix="a number of GPUs >= 0")
    if a.num_workers > 1 or a.address:
        cfg, _ = extend(cfg)                 # as train_sfd does on every worker: run.json holds the merged targets
        cfg.validate(get_preset(cfg.preset))
        plan = plan_run_dir(a.out, cfg.to_dict(), resume=a.resume, overwrite=a.overwrite)   # before Ray starts
        if plan.move_aside is not None:
            os.replace(plan.out, plan.move_aside)
            print(f"note: {plan.notes[0]}", flush=True)
        final = fit_single_run(cfg, a.out, num_workers=a.num_workers, address=a.address,
                               cpus_per_worker=a.cpus_per_worker, gpus_per_worker=a.gpus_per_worker,
                               resume=a.resume, progress=not a.no_progress)
    else:
        with StopOnSignal() as stop:
            try:
                final = train_sfd(cfg, a.out, resume=a.resume, progress=not a.no_progress, overwrite=a.overwrite,
                                  should_stop=lambda: stop.signum is not None)
            except Stopped as e:
                name = signal.Signals(stop.signum).name
                print(f"sfd: stopped by {name} at iteration {e.iteration}, checkpoint {e.checkpoint} — continue "
                      f"with the same command and --resume", file=sys.stderr, flush=True)
                return 128 + stop.signum
            except Interrupted as e:
                print(f"sfd: stopped by a second {e} before a new checkpoint — continue from the last one with the "
                      f"same command and --resume", file=sys.stderr, flush=True)
                return 128 + e.signum
        final.update(attack_after_run(a.out, cfg, progress=not a.no_progress))
    written = sorted(p.name for p in Path(a.out).iterdir() if p.is_file())
    print(f"done -> {a.out}: {', '.join(written)}")
    print(_fmt(final, SUMMARY_KEYS))
    return 0


def cmd_distil(a) -> int:
    if not a.kimg > 0:
        raise ValueError(f"--kimg {a.kimg}: give a positive budget in thousands of images")
    path = distil(a.preset, a.kimg, a.out, seed=a.seed, progress=not a.no_progress, command=command_line(),
                  device=a.device, **({"teacher": a.teacher} if a.teacher else {}))
    m = read_json(path / "stage1.json")
    print(f"stage 1 ({a.kimg} kimg, key {m['key']}): FD ratio {m['metrics'].get('fd_ratio', float('nan')):.3f}, "
          f"remaining accuracy {m['metrics'].get('remaining_accuracy', float('nan')):.4f} -> {path}")
    print(f"use it: sfd forget --init-from {path} ...   (the sweep finds it by its key in the cache)")
    return 0


def cmd_export(a) -> int:

    from .export import (PromptWarning, export_class_run, export_text_run, is_text_generator, load_class_pipeline,
                         load_one_step)

    run, out = Path(a.run), Path(a.out)
    if run.is_file() and run.suffix == ".safetensors":
        gen = run
    elif run.is_dir():
        gen = run / "generator.safetensors"
    else:
        raise UsageError(f"--run {run} does not exist — give the --out folder of an `sfd forget` run")
    if out.exists() and any(out.iterdir()) and not a.overwrite:
        raise UsageError(f"--out {out} exists and is not empty — choose another folder, or pass --overwrite to "
                         f"replace it")
    if out.resolve() == run.resolve():
        raise UsageError(f"--out {out} is the run folder itself — export to a folder of its own")
    if run.is_dir() and (run / "pipeline" / "model_index.json").is_file():      # sd: already a diffusers folder
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(run / "pipeline", out)
        print(f"{run / 'pipeline'} (a Stable Diffusion one-step pipeline) -> {out}\n"
              f"  from sfd.export import SFDOneStepPipeline\n"
              f"  image = SFDOneStepPipeline.from_pretrained({str(out)!r})(\"a photo of ...\").images[0]")
        return 0
    if not gen.is_file():
        raise UsageError(f"--run {run} holds no generator.safetensors — give the folder of a finished `sfd forget` "
                         f"run (or its generator.safetensors)")
    if is_text_generator(gen):                       # colordigits: the UNet + its teacher's text encoder, tokenizer
        export_text_run(gen, out)
        pipe = load_one_step(out)                    # what the user will do: it must load and sample
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PromptWarning)
            pipe(prompt="", output_type="pt")
        print(f"{gen} -> {out} (SFDTextPipeline: unet/ + text_encoder/, tokenizer/ of {read_json(out / 'sfd.json')['teacher']}; "
              f"any text, one network evaluation per image, sigma_init {pipe.config.sigma_init:.4g}; safetensors)\n"
              f"  from sfd.export import SFDTextPipeline\n"
              f"  images = SFDTextPipeline.from_pretrained({str(out)!r})(prompt=\"your text\").images")
        return 0
    export_class_run(gen, out)
    pipe = load_class_pipeline(out)                 # what the user will do: it must load and sample
    pipe(class_labels=[0], output_type="pt")
    print(f"{gen} -> {out} (SFDClassPipeline: {pipe.num_classes} classes, one network evaluation per image, "
          f"sigma_init {pipe.denoiser.config.sigma_init:.4g}; safetensors)\n"
          f"  from sfd.export import SFDClassPipeline\n"
          f"  images = SFDClassPipeline.from_pretrained({str(out)!r})(class_labels=[3, 4]).images")
    return 0


def cmd_sample(a) -> int:


    _positive_int("--n", a.n, "at least 1 sample per class")
    if a.n > 10_000:
        raise UsageError(f"--n {a.n} is too many samples per class — give at most 10000")
    if a.seed < 0:
        raise UsageError(f"--seed {a.seed} is invalid — give a seed >= 0")
    check_device(a.device)
    if not a.out.endswith((".png", ".safetensors")):
        raise UsageError(f"--out {a.out!r}: give a .png (grid) or .safetensors (tensors) file")
    if Path(a.out).is_dir():
        raise UsageError(f"--out {a.out} is a folder — give a .png or .safetensors file path")
    device = pick_device(a.device)
    from .export import is_text_generator
    if is_text_generator(a.generator):                # prompts in: colordigits runs, exported text / SD pipelines
        return _sample_text(a, device)
    if a.prompt:
        raise UsageError(f"--prompt is for text-to-image generators; {a.generator} is class-conditional — use "
                         f"--classes")
    path = Path(a.generator)
    if path.is_dir():
        if not (path / "generator.safetensors").is_file():
            raise UsageError(f"--generator {path} holds no generator.safetensors — give the folder of a finished "
                             f"`sfd forget` run, its generator.safetensors, or a text pipeline written by `sfd export`")
        path = path / "generator.safetensors"
    meta = read_metadata(path)
    info = meta.get("generator")
    if not info:
        raise ValueError(f"{path} is not an sfd one-step generator (no 'generator' metadata) — "
                         f"use the generator.safetensors of an `sfd forget` run")
    gen = load_denoiser(path, device).eval()
    if a.classes is not None:
        names = info.get("preset")
        p = PRESETS.get(names)
        if p is not None:
            classes = parse_classes(a.classes, p, "--classes")
        else:
            classes = [int(c) for c in a.classes.split(",") if c.strip().isdigit()]
            if not classes:
                raise UsageError(f"--classes {a.classes!r}: give class ids 0..{gen.num_classes - 1}")
    else:
        classes = list(range(gen.num_classes))
    for c in classes:
        if not 0 <= c < gen.num_classes:
            raise ValueError(f"class {c} is not in 0..{gen.num_classes - 1} — give --classes within that range")
    labels = torch.tensor(classes).repeat_interleave(a.n)
    z = torch.randn((len(labels), *gen.img_shape), generator=torch.Generator().manual_seed(a.seed))
    with torch.no_grad():
        x = one_step(gen, z.to(device), labels.to(device), info["sigma_init"]).cpu()
    out = a.out
    if out.endswith(".safetensors"):
        save_tensors(out, {"images": x, "labels": labels})
    else:
        save_grid(out, x, nrow=a.n)
    print(f"{len(labels)} samples ({a.n} per class for classes {classes}; forgotten: {info.get('forget')} -> "
          f"{info.get('override')}) -> {out}")
    return 0


def _sample_text(a, device) -> int:
    """Free text through the generator's text encoder: an exported pipeline, or a run with its teacher's encoder."""


    from .export import PromptWarning, load_text_generator, prompt_notes
    if a.classes is not None:
        raise UsageError(f"--classes {a.classes}: --generator {a.generator} is text-conditioned; give --prompt "
                         f"\"...\" instead (repeat it for more rows, e.g. --prompt 'a red seven' --prompt 'a blue one')")
    if not a.prompt:
        raise UsageError(f"--generator {a.generator} is a text-to-image generator — give at least one --prompt \"...\"")
    pipe = load_text_generator(a.generator, device)
    for note in prompt_notes(pipe.tokenizer, a.prompt):          # what the text encoder will not read
        print(f"note: {note}", file=sys.stderr)
    g = torch.Generator().manual_seed(a.seed)
    with warnings.catch_warnings():                              # already printed above
        warnings.simplefilter("ignore", PromptWarning)
        x = pipe(a.prompt, num_images_per_prompt=a.n, generator=g, output_type="pt").images * 2 - 1
    if a.out.endswith(".safetensors"):
        save_tensors(a.out, {"images": x.cpu()}, {"prompts": [p for p in a.prompt for _ in range(a.n)]})
    else:
        save_grid(a.out, x.cpu(), nrow=a.n)
    print(f"{len(x)} samples ({a.n} per prompt, one network evaluation each, sigma_init "
          f"{pipe.config.sigma_init:.4g}) -> {a.out}")
    return 0


def cmd_evaluate(a) -> int:


    run = Path(a.run)
    if not run.is_dir():
        raise UsageError(f"--run {run} is not a folder — give the --out folder of an `sfd forget` run")
    for name in ("--forget-samples", "--remain-per-class", "--fd-draws"):
        v = getattr(a, name[2:].replace("-", "_"))
        if v < 0:
            raise UsageError(f"{name} {v} is invalid — give a count >= 1 (or 0: the run's)")
    check_device(a.device)
    m = evaluate_run(run, seed=a.seed, device=a.device, forget_samples=a.forget_samples or None,
                     remain_per_class=a.remain_per_class or None, progress=not a.no_progress, clip=a.clip,
                     per_prompt=max(1, a.per_prompt), fd_draws=a.fd_draws or None)
    if a.attack != "off":                # the attack stage: `sfd attack RUN --attacks ...` at its default budget
        kinds = ATTACK_KINDS if a.attack == "all" else (a.attack,)
        out = attack_run(run, attacks=kinds, device=a.device, progress=not a.no_progress, clip=a.clip)
        m["attack"] = {k: v for k, v in out.items() if k.startswith(("asr", "residue", "side_effect", "attack_"))}
        m.update({k: v for k, v in m["attack"].items() if k in SUMMARY_KEYS})
    write_json(run / "evaluation.json", m)
    shown = SUMMARY_KEYS + ("n_forget_samples", "n_remaining_samples")
    print(_fmt(m, shown) if any(k in m for k in shown) else _fmt(m, m))
    print(f"-> {run / 'evaluation.json'}")
    return 0


def cmd_attack(a) -> int:
    run = Path(a.run)
    if not run.is_dir():
        raise UsageError(f"RUN {run} is not a folder — give the --out folder of an `sfd forget` run")
    if a.control is not None and not Path(a.control).is_dir():
        raise UsageError(f"--control {a.control} is not a folder — give the --out folder of a run of the same target "
                         f"with --lambda-gen-forget 0 --lambda-fake-forget 0")
    kinds = [k.strip() for k in a.attacks.split(",") if k.strip()] if a.attacks != "none" else []
    bad = [k for k in kinds if k not in ATTACK_KINDS]
    if bad:
        raise UsageError(f"--attacks {a.attacks!r}: {', '.join(bad)} is not an attack — give any of "
                         f"{', '.join(ATTACK_KINDS)} (comma-separated) or 'none'")
    if not kinds and a.no_families:
        raise UsageError("--attacks none with --no-families measures nothing — drop one of them")
    check_device(a.device)
    budget = Budget(steps=a.steps, seeds=a.seeds, starts=a.starts, edits=a.edits, candidates=a.candidates, lr=a.lr,
                    teacher_steps=a.teacher_steps, per_prompt=a.per_prompt, seed=a.seed)
    out = attack_run(run, control=a.control, attacks=kinds, families=not a.no_families, budget=budget,
                     prompts_file=a.prompts_file, device=a.device, progress=not a.no_progress, clip=a.clip,
                     neighbors=a.neighbor_prompts)
    shown = [k for k in ("residue_worst_family", "residue_worst_family_name", "residue_worst_family_teacher",
                         "side_effect_worst_cell", "side_effect_worst_cell_name", "side_effect_worst_cell_control",
                         "leakage_worst_cell", "leakage_worst_cell_name", "leakage_worst_cell_share",
                         "leakage_worst_cell_share_teacher", "leakage_worst_cell_control") if k in out]
    for kind, r in out["attacks"].items():
        line = f"{kind}: ASR {r['asr']:.3f} (teacher {r['asr_teacher']:.3f}"
        line += f", control {r['asr_control']:.3f})" if "asr_control" in r else ")"
        print(f"{line}, {r['instances']} instances, {r['seconds']:.1f} s on the generator")
    if shown:
        print(_fmt(out, shown))
    print(f"-> {run / 'attack.json'} (figures also in {run / 'metrics.json'} under 'attack')")
    return 0


def cmd_bench(a) -> int:
    _finite("--seconds", a.seconds, low=0.0, low_open=True, fix="a time budget per class in seconds > 0")
    _finite("--eval-every-kimg", a.eval_every_kimg, low=0.0, low_open=True, fix="an interval in kimg > 0")
    if a.threads < 0:
        raise UsageError(f"--threads {a.threads} is invalid — give a count >= 1 (or 0: all cores)")
    if a.batch < 2:
        raise UsageError(f"--batch {a.batch} is invalid — give at least 2 (both branches)")
    if a.iteration and a.arch == "sd15" and not (a.memory_limit_gb > 0 and a.lora_rank >= 1):
        raise UsageError(f"--memory-limit-gb {a.memory_limit_gb} / --lora-rank {a.lora_rank}: give a limit > 0 GiB "
                         f"and a rank >= 1")
    digits = get_preset("digits")
    classes = parse_classes(a.classes, digits, "--classes")
    for c in classes:
        digits.check_class(c, "--classes")
    a.classes = ",".join(map(str, classes))
    if not a.iteration and not a.overwrite:          # refuse before any class is trained, not at the second one
        taken = [str(Path(a.out) / f"forget{c}") for c in classes if holds_run(Path(a.out) / f"forget{c}")]
        if taken:
            raise UsageError(f"--out {a.out} already holds bench runs ({', '.join(taken)}) — choose another --out, "
                             f"or pass --overwrite to move them aside (<run>.old-<timestamp>)")
    if a.override not in ("next", "random", "classifier"):
        a.override = ",".join(map(str, parse_classes(a.override, digits, "--override")))
        digits.check_class(int(a.override.split(",")[0]), "--override")
    return run_bench(a)


def build_parser() -> argparse.ArgumentParser:
    parser = SfdArgumentParser(
        prog="sfd",
        description="Score Forgetting Distillation: remove a class from a diffusion model and distil the "
                    "rest into a one-step generator, data-free. The embedded 'digits' preset runs offline on a CPU.")
    parser.add_argument("--version", action="version", version=f"sfd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train-classifier", help="train the preset's classifier (UA judge / Frechet feature network)",
                       description="digits: train the small CNN that judges the embedded preset (its accuracy gives "
                                   "UA, its penultimate features are the Frechet space; colordigits: the same CNN "
                                   "with a digit head and a colour head); writes "
                                   "classifier.safetensors + classifier.json into --out. cifar10/stl10: train the "
                                   "paper's UA judge, a ResNet-34 (torchvision layout) on the fetched training set "
                                   "(`sfd fetch` first; starts from the fetched ImageNet ResNet-34 when present; GPU "
                                   "recommended), tested on the official test split; writes "
                                   "$SFD_HOME/<preset>/resnet34_<preset>.safetensors + .json (manifest), where "
                                   "sfd forget and the sweep find it.",
                       epilog="example: sfd train-classifier --preset cifar10 --device cuda")
    _add_common(p)
    p.add_argument("--out", help="output folder or .safetensors file (default: digits: the bundled weights folder; "
                                 "cifar10/stl10: the $SFD_HOME cache)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: 3000 digits, 4000 cifar10/stl10)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 128)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: 2e-3 AdamW for digits, 0.01 SGD for cifar10/stl10)")
    p.add_argument("--init", default=None,
                   help="cifar10/stl10: torchvision ResNet-34 state dict to start from (default: the cached "
                        "ImageNet resnet34-b627a593.pth if present; 'none' for random initialisation)")
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("fetch", help="download and verify the public files of cifar10 / stl10 into $SFD_HOME",
                       description="Download what a real-dataset run needs into one cache ($SFD_HOME, default "
                                   "~/.cache/sfd): the official dataset archive, a public class-conditional teacher "
                                   "(cifar10: NVIDIA's EDM conditional VP snapshot; the official SFD DDPM has no "
                                   "direct link and is listed with the path to put it at), the FID Inception weights "
                                   "and the ImageNet ResNet-34 the UA judge starts from; then compute the per-class "
                                   "Inception statistics of the training set once. Every file is checked against its "
                                   "published checksum (recorded in $SFD_HOME/checksums.lock.json); downloads resume "
                                   "after an interruption. Without network, lists each file, its checksum and the "
                                   "path to put it at.",
                       epilog="examples: sfd fetch cifar10 | sfd fetch stl10 --skip-classifier | "
                              "SFD_MIRROR=http://mirror.local/sfd sfd fetch cifar10 | sfd fetch cifar10 --list")
    p.add_argument("preset", choices=["cifar10", "stl10"], help="dataset preset")
    p.add_argument("--teacher", choices=["edm", "ddpm"], default=None,
                   help="which public teacher (default: the one with a direct link: edm for cifar10)")
    p.add_argument("--mirror", default=None,
                   help="base URL serving every file as <mirror>/<filename> (default: $SFD_MIRROR, else the "
                        "official URLs)")
    p.add_argument("--home", default=None, help="cache folder (default: $SFD_HOME or ~/.cache/sfd)")
    p.add_argument("--skip-classifier", action="store_true",
                   help="do not download the ImageNet ResNet-34 (you have a judge, or will pass --classifier)")
    p.add_argument("--classifier", default=None,
                   help="your own ResNet-34 judge (torchvision layout, 10 outputs): checked and cached as the "
                        "preset's classifier")
    p.add_argument("--no-stats", action="store_true", help="skip computing the reference Inception statistics")
    p.add_argument("--list", action="store_true", help="print the files, checksums, paths and URLs; download nothing")
    p.add_argument("--device", default="auto", help="device for the reference statistics ('auto', 'cpu', 'cuda:0')")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("pretrain", help="train the preset's teacher diffusion model (EDM loss, EMA)",
                       description="Train the embedded preset's class-conditional teacher with the EDM loss, "
                                   "label dropout for classifier-free guidance and an EMA, then evaluate 18-step "
                                   "Heun samples with the classifier in --out (train it first). Writes "
                                   "teacher.safetensors, teacher.json (manifest) and teacher_samples.png. "
                                   "--preset colordigits: the text-to-image teacher (UNet2DConditionModel + "
                                   "CLIPTextModel + word-level tokenizer, caption dropout to the empty prompt) as a "
                                   "pipeline folder OUT/teacher/ (diffusers layout, safetensors), evaluated by prompt "
                                   "accuracy on training and held-out templates and FD per colour.")
    _add_common(p)
    p.add_argument("--out", required=True,
                   help="output folder holding classifier.safetensors, e.g. runs/digits-models (the bundled "
                        "weights folder only if you name it)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimiser steps (default: 8000 digits, 4000 colordigits)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default: 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    p.add_argument("--channels", type=int, default=32, help="UNet base width (default: 32)")
    p.add_argument("--eval-per-class", type=int, default=500,
                   help="teacher samples per class for the manifest (colordigits: per prompt, this / 100)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("forget", help="one SFD run: forget classes, distil a one-step generator",
                       description="Forget --forget (overridden by --override) and distil the teacher into a one-step "
                                   "generator, data-free. Writes DIR/metrics.json (UA, FD vs the teacher, ...), "
                                   "history.json, curves.png, samples_teacher.png, samples_generator.png, "
                                   "generator.safetensors and checkpoints/ (resumable with --resume).",
                       usage="sfd forget (--out DIR | --print-config) [settings: one flag per section below]",
                       epilog="example: sfd forget --preset digits --forget 0 --override 1 --out runs/forget0 "
                              "(the same with --print-config instead of --out: what it would run)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="run folder (required unless --print-config)")
    o.add_argument("--resume", action="store_true",
                   help="continue the run in --out (same settings) from its newest intact checkpoint")
    o.add_argument("--overwrite", action="store_true",
                   help="--out holds another run: move it aside to <out>.old-<timestamp> (never deleted) and start "
                        "fresh")
    o.add_argument("--no-progress", action="store_true", help="hide progress bars")
    o.add_argument("--print-config", action="store_true",
                   help="print the settings the run would use, each with the layer that set it (SFDConfig default, "
                        "search_spaces/<preset>.yaml defaults, its override_defaults[<policy>], a flag, the "
                        "$SFD_HOME cache), then exit without running anything")
    add_config_flags(p)
    r = p.add_argument_group("Ray Train (exactly what a sweep trial runs)")
    r.add_argument("--num-workers", type=int, default=1,
                   help="data-parallel workers; > 1 runs on Ray Train (gloo on CPU, NCCL on GPU), the global batch "
                        "split between them (default: 1, in this process)")
    r.add_argument("--address", default=None, help="Ray cluster to join ('auto' or host:port); implies Ray Train")
    r.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per Ray Train worker (default: 1)")
    r.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per Ray Train worker (default: 0)")
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser("distil", help="stage 1: distil the teacher into a one-step generator, forgetting nothing",
                       description="Stage 1 of two-stage SFD (SFD.md section 7): distil every class of the teacher "
                                   "into a one-step generator and fake score with the forget weights at 0, with the "
                                   "preset's default settings. Writes OUT/state.safetensors and OUT/stage1.json (key = "
                                   "teacher digest + settings); `sfd forget --init-from OUT` and the sweep start "
                                   "their forgetting from it.",
                       epilog="example: sfd distil --preset digits --kimg 400 --out runs/stage1")
    _add_common(p)
    p.add_argument("--out", required=True, help="output folder (the run itself goes to OUT/run)")
    p.add_argument("--kimg", type=float, default=400.0, help="budget in thousands of generator images (default: 400)")
    p.add_argument("--teacher", help="teacher checkpoint (default: the preset's bundled teacher)")
    p.set_defaults(func=cmd_distil)

    p = sub.add_parser("sample", help="sample a one-step generator into a PNG grid or safetensors",
                       description="Draw --n samples per class from a class-conditional one-step generator (an `sfd "
                                   "forget` run folder or its generator.safetensors): one row per class in a PNG, "
                                   "or images + labels in a .safetensors file. A text-to-image generator (a "
                                   "colordigits run, a folder written by `sfd export`, a Stable Diffusion run's "
                                   "pipeline/) takes any --prompt instead, encoded by its text encoder: one row per "
                                   "prompt, one UNet evaluation per image; words its tokenizer does not know are "
                                   "reported.",
                       epilog="examples: sfd sample --generator runs/f0 --out grid.png | "
                              "sfd sample --generator runs/seven --prompt 'red seven' --prompt 'seven in red ink' "
                              "--out seven.png | sfd sample --generator runs/brad-pitt/pipeline --prompt 'a photo of "
                              "brad pitt' --prompt 'a dog on a beach' --n 4 --out pitt.png")
    p.add_argument("--generator", required=True,
                   help="an `sfd forget` run folder or its generator.safetensors, a folder written by `sfd export`, "
                        "or the pipeline/ folder of an `sfd forget --preset sd` run")
    p.add_argument("--classes", help="class-conditional generators: comma-separated class ids (default: all)")
    p.add_argument("--prompt", action="append", default=None,
                   help="text-to-image generators (required): any text, encoded by the generator's text encoder (case "
                        "as its tokenizer normalises it); one row each; repeat the flag")
    p.add_argument("--n", type=int, default=10, help="samples per class (default: 10)")
    p.add_argument("--out", required=True, help="output .png (grid) or .safetensors (tensors)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda:0', ...")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="write a run's one-step generator as a diffusers pipeline folder",
                       description="Write the one-step generator of an `sfd forget` run as a folder a diffusers user "
                                   "loads and samples in two lines (safetensors, no code in the folder):\n\n"
                                   "  from sfd.export import SFDClassPipeline\n"
                                   "  images = SFDClassPipeline.from_pretrained(OUT)(class_labels=[3, 4]).images\n\n"
                                   "OUT holds model_index.json and denoiser/ (SFDOneStepGenerator, a diffusers "
                                   "ModelMixin: config.json = the sfd architecture description and sigma_init, "
                                   "diffusion_pytorch_model.safetensors). Call options: num_images_per_label, "
                                   "generator (a torch.Generator), latents (N, C, H, W noise), output_type "
                                   "'pil' | 'np' | 'pt' (images in [0, 1]) | 'raw' ([-1, 1]).\n\n"
                                   "A text-to-image run (colordigits) exports an SFDTextPipeline that takes any text:\n\n"
                                   "  from sfd.export import SFDTextPipeline\n"
                                   "  images = SFDTextPipeline.from_pretrained(OUT)(prompt=\"red seven\").images\n\n"
                                   "OUT holds model_index.json (sigma_init), the generator's unet/, the run teacher's "
                                   "text_encoder/ and tokenizer/, scheduler/ and sfd.json (diffusers layout, "
                                   "safetensors). Call options: num_images_per_prompt, generator, latents, output_type "
                                   "as above, strict=True (raise on words the tokenizer does not know instead of "
                                   "warning). A Stable Diffusion run already "
                                   "wrote RUN/pipeline (SFDOneStepPipeline, text prompts); it is copied.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example: sfd export --run runs/forget0 --out exported/forget0")
    p.add_argument("--run", required=True, help="run folder of `sfd forget` (or its generator.safetensors)")
    p.add_argument("--out", required=True, help="folder to write (must not exist or be empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="re-evaluate a finished run (UA, FD vs the teacher at equal counts)",
                       description="Evaluate the generator of an `sfd forget` run folder with the run's classifier "
                                   "and teacher, at fixed sample counts; writes RUN/evaluation.json.")
    p.add_argument("--run", required=True, help="run folder of `sfd forget`")
    p.add_argument("--forget-samples", type=int, default=0, help="forget-class samples for UA (default: the run's)")
    p.add_argument("--remain-per-class", type=int, default=0, help="samples per remaining class (default: the run's)")
    p.add_argument("--fd-draws", type=int, default=0,
                   help="class presets: average the remaining-class FD over this many disjoint draws of "
                        "--remain-per-class samples per class (default: the run's eval_fd_draws)")
    p.add_argument("--seed", type=int, default=777, help="evaluation noise seed (default: 777)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda:0', ...")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--attack", choices=ATTACK_CHOICES, default="off",
                   help="also run `sfd attack` on the run at its default budget (no control): continuous, discrete "
                        "or all; writes RUN/attack.json, figures in evaluation.json under 'attack' (default: off)")
    sdg = p.add_argument_group("Stable Diffusion runs (RUN/pipeline): NudeNet on nudity targets, CLIP from local files")
    sdg.add_argument("--clip", default=None,
                     help="a local transformers CLIP folder (CLIPModel + CLIPProcessor save_pretrained): zero-shot "
                          "concept accuracy on the forget prompts and CLIP score on the remain prompts")
    sdg.add_argument("--per-prompt", type=int, default=1, help="images per prompt (default: 1)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("attack", help="is it really gone? prompt families, side effects and white-box attacks on a run",
                       description="Measure a finished single-target run (classes, colordigits concepts or sd) with its own "
                                   "judge: residue of the forgotten concept per prompt family, every remaining "
                                   "concept's accuracy per family against the teacher (side effects), and the attack "
                                   "success rate (ASR) of a discrete token search and a continuous embedding attack "
                                   "through the one-step generator (a baseline's run: its fine-tuned teacher through "
                                   "the teacher's sampler), with the same attack on the teacher (it must "
                                   "succeed) and on --control. Writes RUN/attack.json (docs/robustness.md) and adds the "
                                   "summary to RUN/metrics.json.")
    p.add_argument("run", metavar="RUN", help="run folder of `sfd forget` (one forget target)")
    p.add_argument("--control", default=None, metavar="RUN",
                   help="a negative control: the same target distilled with --lambda-gen-forget 0 "
                        "--lambda-fake-forget 0 (attacked at the same budget)")
    p.add_argument("--attacks", default="discrete,continuous",
                   help="attacks to run, comma-separated, or 'none' (default: discrete,continuous; class presets "
                        "have the continuous one only)")
    p.add_argument("--no-families", action="store_true", help="skip the prompt families and side effects")
    p.add_argument("--prompts-file", default=None, help="text presets: your own prompts, one per line (a family "
                                                        "'user_file' beside the generated ones)")
    sdg = p.add_argument_group("Stable Diffusion runs (RUN/pipeline)")
    sdg.add_argument("--clip", default=None, metavar="DIR",
                     help="a local transformers CLIP folder (CLIPModel + CLIPProcessor): judges a concept target "
                          "(default: the run's --classifier); nudity targets are judged by NudeNet")
    sdg.add_argument("--neighbor-prompts", default=None, metavar="FILE",
                     help="neighbour concepts, one per line (e.g. other celebrities): side-effect cells, the run's "
                          "forget prompts with the concept rewritten to each neighbour, judged by CLIP")
    b = Budget()
    bg = p.add_argument_group("budget (the same for the generator, the teacher and the control)")
    bg.add_argument("--steps", type=int, default=b.steps, help=f"optimisation steps per instance (default: {b.steps})")
    bg.add_argument("--seeds", type=int, default=b.seeds, help=f"noise seeds per start (default: {b.seeds})")
    bg.add_argument("--starts", type=int, default=b.starts,
                    help=f"start prompts / classes; instances = starts x seeds (default: {b.starts})")
    bg.add_argument("--edits", type=int, default=b.edits, help=f"discrete: tokens the attacker may change (default: "
                                                               f"{b.edits})")
    bg.add_argument("--candidates", type=int, default=b.candidates,
                    help=f"discrete: substitutions evaluated per instance and step (default: {b.candidates})")
    bg.add_argument("--lr", type=float, default=b.lr, help=f"continuous: Adam learning rate (default: {b.lr})")
    bg.add_argument("--teacher-steps", type=int, default=b.teacher_steps,
                    help=f"Heun steps of the teacher's sampler inside the attacks (default: {b.teacher_steps})")
    bg.add_argument("--per-prompt", type=int, default=b.per_prompt,
                    help=f"families: samples per prompt, at least (default: {b.per_prompt})")
    bg.add_argument("--seed", type=int, default=b.seed, help=f"base noise seed (default: {b.seed})")
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda:0', 'auto' (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide progress lines")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("bench", help="benchmark SFD on the embedded default: time to forget, FD ratios, speed",
                       description="For each target class: time and kimg until UA >= 0.99, and until UA >= 0.99 and "
                                   "remaining FD <= 2x the teacher's hold together; FD ratio and remaining accuracy "
                                   "after the budget; one-step vs teacher images/s; one SFD iteration vs one teacher "
                                   "training step; peak memory. Prints a table and writes OUT/bench.json.")
    p.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9", help="classes to forget in turn (default: 0-9)")
    p.add_argument("--override", default="next", help="'next' (class c -> c+1 mod 10), a class id, 'random' or "
                                                       "'classifier' (default: next)")
    p.add_argument("--seconds", type=float, default=300.0, help="training time budget per class (default: 300)")
    p.add_argument("--full-budget", action="store_true",
                   help="train every class for the whole --seconds instead of stopping once UA >= 0.99, "
                        "FD <= 2x the teacher's and remaining accuracy within 2 points hold together")
    p.add_argument("--out", default="runs/bench", help="output folder (default: runs/bench)")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds an earlier bench: move its runs aside (<run>.old-<timestamp>) instead of refusing")
    p.add_argument("--eval-every-kimg", type=float, default=2.5, help="evaluation interval (default: 2.5)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    it = p.add_argument_group("one iteration's time and memory (--iteration)")
    it.add_argument("--iteration", action="store_true",
                    help="instead: time and peak memory of one SFD iteration of a full-size backbone with random "
                         "weights, without and with gradient checkpointing (each in a fresh process)")
    it.add_argument("--arch", default="ddpm-cifar10", choices=["ddpm-cifar10", "digits", "sd15"],
                    help="backbone for --iteration (default: ddpm-cifar10, the 38.6 M-parameter reference UNet; sd15: "
                         "Stable Diffusion 1.5's 860 M-parameter UNet at 64x64 latents, full fine-tuning in fp32 vs "
                         "LoRA on the shared UNet + bf16 + gradient checkpointing, the SD recipe's guidance)")
    it.add_argument("--lora-rank", type=int, default=8, help="sd15: LoRA rank of the second variant (default: 8)")
    it.add_argument("--memory-limit-gb", type=float, default=14.0,
                    help="sd15: address-space limit of each measuring process in GiB; a variant that needs more "
                         "fails cleanly and is reported as not fitting (default: 14)")
    it.add_argument("--batch", type=int, default=8, help="global batch (both branches) for --iteration (default: 8)")
    it.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                    help="precision for --iteration (default: fp32)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:          # argparse: --help exits 0 (re-raised), a usage error returns 2
        if e.code in (0, None):
            raise
        return int(e.code) if isinstance(e.code, int) else 2
    try:
        return a.func(a)
    except (ValueError, CheckpointError, FloatingPointError) as e:
        # Errors meant for people: the message names the bad value and the fix.
        print(f"sfd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
