"""`sfd ...`: single runs from the command line. The sweep lives in orchestration/sweep.py."""
from __future__ import annotations

import argparse
import sys

from . import __version__
from .presets import PRESETS, get_preset


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="digits", choices=sorted(PRESETS),
                   help="dataset preset (default: digits, the embedded 8x8 handwritten digits)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA if present, else CPU), 'cpu', 'cuda:0', ...")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def cmd_train_classifier(a) -> int:
    from .pretrain import train_classifier
    preset = get_preset(a.preset)
    out = a.out or preset.weights_dir
    m = train_classifier(preset, out, steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed, device=a.device,
                         progress=not a.no_progress)
    print(f"classifier: held-out accuracy {m['metrics']['test_accuracy']:.4f} "
          f"({m['metrics']['n_test']} images), {m['wall_seconds']} s -> {out}")
    return 0


def cmd_pretrain(a) -> int:
    from .pretrain import train_teacher
    preset = get_preset(a.preset)
    out = a.out or preset.weights_dir
    m = train_teacher(preset, out, steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed, channels=a.channels,
                      device=a.device, progress=not a.no_progress, eval_per_class=a.eval_per_class)
    met = m["metrics"]
    print(f"teacher: {met['sampler']}, {met['samples_per_class']}/class: mean class accuracy "
          f"{met['mean_class_accuracy']:.4f}, FD all {met['fd_all']:.3f} (real halves {met['fd_real_halves_all']:.3f}); "
          f"{m['wall_seconds']} s -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfd",
        description="Score Forgetting Distillation: remove a class from a diffusion model and distil the "
                    "rest into a one-step generator, data-free. The embedded 'digits' preset runs offline on a CPU.")
    parser.add_argument("--version", action="version", version=f"sfd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train-classifier", help="train the preset's classifier / Frechet feature network",
                       description="Train the small CNN that judges the embedded preset: its accuracy gives UA "
                                   "and its penultimate features are the Frechet-distance space. Writes "
                                   "classifier.safetensors and classifier.json (manifest) into --out.")
    _add_common(p)
    p.add_argument("--out", help="output folder (default: the bundled weights folder of the preset)")
    p.add_argument("--steps", type=int, default=3000, help="optimiser steps (default: 3000)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default: 128)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default: 2e-3)")
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("pretrain", help="train the preset's teacher diffusion model (EDM loss, EMA)",
                       description="Train the embedded preset's class-conditional teacher with the EDM loss, "
                                   "label dropout for classifier-free guidance and an EMA, then evaluate 18-step "
                                   "Heun samples with the classifier in --out (train it first). Writes "
                                   "teacher.safetensors, teacher.json (manifest) and teacher_samples.png.")
    _add_common(p)
    p.add_argument("--out", help="output folder (default: the bundled weights folder of the preset)")
    p.add_argument("--steps", type=int, default=8000, help="optimiser steps (default: 8000)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default: 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    p.add_argument("--channels", type=int, default=32, help="UNet base width (default: 32)")
    p.add_argument("--eval-per-class", type=int, default=500, help="teacher samples per class for the manifest")
    p.set_defaults(func=cmd_pretrain)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
