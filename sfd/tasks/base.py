"""The Task protocol: what a kind of preset knows, asked by everything above it.

A preset's conditions are class ids (``classes``), prompts over the preset's own vocabulary
(``concepts``) or free-form prompts on a Stable Diffusion pipeline (``sd``). Everything that depends on
that -- which settings make sense, what a target is, how conditions are drawn, which teacher loader,
judge and evaluator apply, what the run exports -- is a method here, implemented once per kind in
this package. The loop, the iteration, the CLI and the sweep ask ``get_task(preset)``; none of them
branch on the kind.

The defaults below are the class-conditional behaviour; the text tasks override what differs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from ..denoisers import load_denoiser, load_teacher, save_denoiser
from ..evaluate import load_judge
from ..evaluate.forgetting import ForgetEvaluator
from ..io import read_metadata
from ..onestep import autocast_call, one_step, resolve_precision
from ..presets import Preset
from ..robustness import read_prompts_file
from ..pretrain import train_classifier, train_teacher
from ..utils import pick_device


class Task(ABC):
    kind = "classes"
    noun = "classes"                 # the sweep's all_<preset>_<noun>
    anchors = False                  # the targets offer anchor prompts (SFDConfig.lambda_anchor)
    default_override = "next"        # a target's override when none is given

    def __init__(self, preset: Preset):
        self.preset = preset

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.preset.name!r})"

    # -- configuration --------------------------------------------------------------------------------
    @abstractmethod
    def validate(self, cfg) -> None:
        """Check and normalise the settings that depend on the kind (targets, text-only settings);
        raise ValueError naming the setting, the bad value and the fix."""

    def settings_from_flags(self, given: dict) -> dict:
        """``sfd forget``'s flags (strings as typed) -> settings: ``--forget`` / ``--override`` parsed for
        this kind; the other keys unchanged."""
        return given

    # -- one run ----------------------------------------------------------------------------------------
    def load_teacher(self, path=None, device="cpu", allow_download: bool = False):
        """The frozen teacher: the preset's bundled one, or the file/folder at ``path``."""
        return load_teacher(self.preset, path, device, allow_download=allow_download)

    @abstractmethod
    def targets(self, cfg, teacher):
        """The run's forget / override / remain conditions (after ``cfg`` was validated); text tasks give
        the teacher the run's prompt table here, before the fake score and generator are cloned."""

    def sample_shape(self, teacher) -> tuple:
        """Shape of one generator sample (pixels; Stable Diffusion: the UNet's latents)."""
        return tuple(self.preset.img_shape)

    # -- chained forgetting (sfd.chain) ----------------------------------------------------------------------
    def chain_pairs(self, cfg) -> list[tuple[str, str]]:
        """(target, override) of a validated configuration, in its order."""
        raise ValueError(f"chained forgetting (--init-from an earlier forgetting run) is implemented for the class "
                         f"presets and colordigits, not preset '{self.preset.name}' — forget every target in one run "
                         f"(--forget a,b)")

    def chain_settings(self, earlier: list[tuple[str, str]], cfg, run: str) -> dict:
        """The target settings that forget ``earlier`` (the pairs of run ``run``) and this stage's targets of
        ``cfg``; raise ValueError for what a chain cannot do."""
        return self.chain_pairs(cfg)

    # -- judging ----------------------------------------------------------------------------------------
    def can_evaluate(self, cfg) -> bool:
        """Whether UA/FD can be measured: a bundled judge, or classifier + FID weights + reference given."""
        return self.preset.embedded or bool(cfg.classifier and cfg.fid_weights and cfg.reference)

    def load_judge(self, cfg, device="cpu"):
        return load_judge(self.preset, cfg.classifier, device, cfg.fid_weights)

    def evaluator(self, cfg, judge, teacher, targets, *, seed: int = 777, progress: bool = False, dist=None,
                  device=None):
        """The evaluator the loop calls at every evaluation and `sfd evaluate` on a finished run."""
        return ForgetEvaluator(self.preset, judge, teacher, targets, cfg.eval_forget_samples,
                               cfg.eval_remain_per_class, seed=seed, progress=progress, reference=cfg.reference,
                               dist=dist, device=device, fd_draws=cfg.eval_fd_draws)

    def evaluate_run(self, run_dir: Path, cfg, metrics: dict, *, seed: int = 777, device="auto",
                     progress: bool = False, teacher=None, judge=None, **_) -> dict:
        """Re-evaluate a finished run's generator.safetensors with the run's teacher and judge on the noise
        of ``seed`` (``cfg``: the run's configuration with any sample counts changed)."""
        gen_file = Path(run_dir) / "generator.safetensors"
        gmeta = read_metadata(gen_file).get("generator")
        if not isinstance(gmeta, dict):
            raise ValueError(f"{gen_file} is not an sfd one-step generator (no 'generator' metadata) — evaluate "
                             f"the folder of an `sfd forget` run")
        check_generator_matches(run_dir, gmeta, cfg, metrics)
        device = pick_device(device)
        teacher = teacher if teacher is not None else self.load_teacher(cfg.teacher, device, cfg.allow_download)
        judge = judge if judge is not None else self.load_judge(cfg, device)
        gen = load_denoiser(gen_file, device).eval()
        s_gen = gmeta.get("sigma_init")
        sigma_init = float(s_gen if s_gen is not None else cfg.sigma_init)
        # the generator runs in the precision the run's configuration resolves to here, as in its loop
        precision = resolve_precision(cfg.precision, device)
        gen_call = autocast_call(gen, device, precision)
        ev = self.evaluator(cfg.validate(self.preset), judge, teacher, self.targets(cfg, teacher), seed=seed,
                            progress=progress, device=device)
        m = ev(lambda z, c: one_step(gen_call, z.to(device), c.to(device), sigma_init).float())
        return {**m, "seed": seed, "precision_resolved": precision}

    # -- outputs ----------------------------------------------------------------------------------------
    def export(self, out_dir: Path, generator, sigma_init: float, info: dict, cfg) -> Path:
        """Write the run's one-step generator into ``out_dir`` (its EMA); return the path written."""
        path = Path(out_dir) / "generator.safetensors"
        save_denoiser(path, generator, {"generator": info})
        return path

    # -- robustness (sfd attack) --------------------------------------------------------------------------
    attacks: tuple = ()
    """The white-box attacks sfd.robustness runs on this kind's generators (none: ``sfd attack`` refuses)."""

    def attacks_for(self, forget) -> tuple:
        """The attacks that give an attack success rate for a target forgetting ``forget``."""
        return self.attacks

    def check_attackable(self) -> None:
        if not self.attacks:
            raise ValueError(f"sfd attack: preset '{self.preset.name}' is not supported yet — attacks run on class "
                             f"presets (digits, cifar10, stl10), colordigits and sd")

    def robustness_suite(self, targets, judge, budget, teacher, extra_prompts=None, *, cfg=None, neighbors=None):
        """sfd.robustness's families, side-effect cells and attacks for one run of this kind."""
        self.check_attackable()
        raise TypeError(f"{type(self).__name__} lists attacks {self.attacks} but makes no robustness suite")

    def attack_judge(self, cfg, device="cpu", clip=None):
        """The judge of ``sfd attack``: the run's own (``--clip`` is for Stable Diffusion runs)."""
        if clip is not None:
            raise ValueError(f"--clip {clip}: a CLIP folder judges Stable Diffusion runs; preset '{self.preset.name}' "
                             f"is judged by its own classifier — drop --clip")
        return self.load_judge(cfg, device)

    def read_attack_prompts(self, path):
        """``sfd attack --prompts-file``: the user's prompts (a family of their own)."""
        return read_prompts_file(path)

    def attack_teacher(self, teacher, cfg, targets):
        """The network the attacks sample as the teacher (the teacher itself; Stable Diffusion: under its guidance)."""
        return teacher

    def run_generator(self, run_dir: Path, cfg, metrics: dict, device, teacher=None):
        """(one-step generator, sigma_init) of a finished run: generator.safetensors (its own record wins)."""
        gen_file = Path(run_dir) / "generator.safetensors"
        gmeta = read_metadata(gen_file).get("generator")
        if not isinstance(gmeta, dict):
            raise ValueError(f"{gen_file} is not an sfd one-step generator (no 'generator' metadata) — give the folder "
                             f"of an `sfd forget` run")
        check_generator_matches(run_dir, gmeta, cfg, metrics)
        s = gmeta.get("sigma_init")
        return load_denoiser(gen_file, device).eval(), float(s if s is not None else cfg.sigma_init)

    # -- the sweep ---------------------------------------------------------------------------------------
    def all_forget(self) -> list:
        """Every single target of ``all_<preset>_<noun>``."""
        return list(range(self.preset.num_classes))

    @abstractmethod
    def parse_forget(self, items: list[str], spec: str) -> tuple:
        """The forget part of a target spec (``3+5``, ``cat``; ``seven+red``) as this kind's values."""

    def resolve_override(self, forget: tuple, override: str) -> str:
        """A target's override as its run records it ('next' resolved where this kind resolves it)."""
        return override

    def target_override(self, override: str) -> str:
        """The override of a target that names none, from the sweep's --override (class targets: as given)."""
        return override

    def target_error(self, spec: str, forget: tuple, override: str, err: Exception) -> str:
        """The message for a target that does not validate."""
        valid = ", ".join(f"{i}={n}" for i, n in enumerate(self.preset.class_names))
        return (f"target {self.preset.name}:{'+'.join(map(str, forget))}->{override}: {err} (classes of "
                f"'{self.preset.name}' by id or name: {valid})")

    def target_settings(self, forget: tuple, override: str, synonyms=(), templates=(), prompt_files=None) -> dict:
        """The SFD settings that make a run forget this target."""
        return {"forget": list(forget), "override": override}

    def check_target(self, cfg) -> None:
        """Anything a sweep target must pass beyond ``cfg.validate`` (read its prompt files now, not in a trial)."""

    def check_template(self, template: str) -> None:
        """A prompt template of a targets file: raise ValueError for an unknown slot."""
        raise ValueError(f"preset '{self.preset.name}' forgets classes; prompt templates are for text-to-image "
                         f"presets")

    @property
    def accepts_targets_file(self) -> bool:
        """Concept lists (``--targets-file``) apply to text tasks only."""
        return False

    @property
    def takes_prompt_files(self) -> bool:
        """Whether targets may name forget / remain prompt files (Stable Diffusion)."""
        return False

    @property
    def free_text_targets(self) -> bool:
        """Target specs are free-form phrases with spaces: one target per command-line argument."""
        return False

    @property
    def shared_reference(self) -> bool:
        """Whether the sweep prepares the teacher's reference samples once per preset (class presets: the
        same remain classes for every target); prompt-table teachers sample each target's own prompts."""
        return True

    def stand_in_target(self) -> dict:
        """Settings that name a target, so a search space's defaults can be validated on their own."""
        return {}

    def check_sweep_files(self, files: dict, targets) -> None:
        """The sweep's teacher / judge files for this kind's targets (raise ValueError naming what is missing)."""

    def uses_fetched_assets(self) -> bool:
        """Whether omitted teacher / judge files come from the $SFD_HOME cache (`sfd fetch`)."""
        return not self.preset.embedded

    # -- the bundled models ------------------------------------------------------------------------------
    pretrain_steps = 8000

    def train_judge(self, out, *, steps: int, batch: int, lr: float, seed: int, device, progress: bool) -> str:
        """Train the preset's bundled judge into ``out``; return the summary line."""
        m = train_classifier(self.preset, out, steps=steps, batch=batch, lr=lr, seed=seed, device=device,
                             progress=progress)
        return (f"classifier: held-out accuracy {m['metrics']['test_accuracy']:.4f} "
                f"({m['metrics']['n_test']} images), {m['wall_seconds']} s -> {out}")

    def pretrain(self, out, *, steps: int, batch: int, lr: float, seed: int, channels: int, device, progress: bool,
                 eval_per_class: int) -> str:
        """Train the preset's bundled teacher into ``out``; return the summary line."""
        m = train_teacher(self.preset, out, steps=steps, batch=batch, lr=lr, seed=seed, channels=channels,
                          device=device, progress=progress, eval_per_class=eval_per_class)
        met = m["metrics"]
        return (f"teacher: {met['sampler']}, {met['samples_per_class']}/class: mean class accuracy "
                f"{met['mean_class_accuracy']:.4f}, FD all {met['fd_all']:.3f} (real halves "
                f"{met['fd_real_halves_all']:.3f}); {m['wall_seconds']} s -> {out}")


def check_generator_matches(run_dir, gmeta: dict, cfg, metrics: dict) -> None:
    """The generator's own record is the truth; a metrics.json that disagrees with it is an error."""
    run_dir = Path(run_dir)
    sigma_cfg = metrics.get("sigma_init_resolved", cfg.sigma_init)
    diffs = [f"{key}: generator {mine!r} vs metrics.json {theirs!r}"
             for key, mine, theirs in (("preset", gmeta.get("preset"), cfg.preset),
                                       ("forget", gmeta.get("forget"), cfg.forget_concepts or cfg.forget),
                                       ("override", gmeta.get("override"), cfg.override))
             if mine is not None and mine != theirs]
    s_gen = gmeta.get("sigma_init")
    if s_gen is not None and not (isinstance(sigma_cfg, (int, float))
                                  and abs(s_gen - sigma_cfg) <= 1e-6 * max(1.0, abs(s_gen))):
        diffs.append(f"sigma_init: generator {s_gen!r} vs metrics.json {sigma_cfg!r}")
    if diffs:
        raise ValueError(f"{run_dir / 'metrics.json'} disagrees with {run_dir / 'generator.safetensors'} ("
                         f"{'; '.join(diffs)}) — restore the run's metrics.json or evaluate an untouched run")


class PromptTask(Task):
    """What the text tasks share: ``--forget`` takes concepts (words or phrases), a target's settings name
    concepts, synonyms and templates, and the teacher samples each target's own prompts."""

    noun = "concepts"
    default_override = "next"

    def refuse_class_only(self, cfg) -> None:
        """The evaluation settings that class presets alone implement, refused by name."""
        if cfg.eval_fd_draws != 1:
            raise ValueError(f"eval_fd_draws (--eval-fd-draws) {cfg.eval_fd_draws}: averaging FD over several draws is "
                             f"for class presets (digits, cifar10, stl10); preset '{self.preset.name}' measures one "
                             f"draw — drop it")
        if cfg.keep_best_ua:
            raise ValueError(f"keep_best_ua (--keep-best-ua) {cfg.keep_best_ua}: keeping the best evaluation's "
                             f"generator is for class presets (digits, cifar10, stl10); preset '{self.preset.name}' "
                             f"keeps the last — drop it")

    def settings_from_flags(self, given: dict) -> dict:
        """``--forget`` holds concepts: words or phrases, comma-separated or repeated."""
        given = dict(given)
        if "forget" in given:
            given["forget_concepts"] = [t.strip() for item in given.pop("forget") for t in str(item).split(",")]
        return given

    def parse_forget(self, items, spec: str) -> tuple:
        out = tuple(str(c).strip() for c in items)
        seen = set()
        for c in out:
            if c.lower() in seen:
                raise ValueError(f"target {spec!r}: concept {c!r} is forgotten twice — give each concept once")
            seen.add(c.lower())
        return out

    def target_override(self, override: str) -> str:
        """A class policy or class id from the sweep's --override means nothing here: the task's default."""
        return self.default_override if override in ("random", "classifier") or override.isdigit() else override

    def target_error(self, spec: str, forget: tuple, override: str, err: Exception) -> str:
        return f"target {spec!r}: {err}"

    def target_settings(self, forget, override, synonyms=(), templates=(), prompt_files=None) -> dict:
        out = {"forget_concepts": list(forget), "override": override,
               "concept_synonyms": {k: list(v) for k, v in synonyms}, "prompt_templates": list(templates)}
        out.update({k: v for k, v in (prompt_files or {}).items() if v})
        return out

    @property
    def accepts_targets_file(self) -> bool:
        return True

    @property
    def shared_reference(self) -> bool:
        return False

    def uses_fetched_assets(self) -> bool:
        return False
