"""Training of the ``colordigits`` text-to-image teacher and its two-headed judge.

Teacher: a small diffusers ``UNet2DConditionModel`` (cross-attention on the text encoder's
last hidden states, as Stable Diffusion) and a 2-layer transformers ``CLIPTextModel`` with a
word-level ``tokenizers`` tokenizer, trained jointly from scratch with the EDM loss, caption
dropout to the empty prompt (classifier-free guidance's null condition) and an EMA. Written
as a pipeline folder (sfd.denoisers.text_unet) plus a manifest (command, seed, steps, wall time,
metrics: prompt accuracy on training and held-out templates, FD vs real per colour).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import colordigits as cd
from .denoisers.text_unet import TextEncoder, TextUNetDenoiser, load_text_pipeline, save_text_pipeline
from .evaluate.classifier import augment_digits
from .evaluate.text_concepts import (ColorDigitsCNN, evaluate_text_teacher, load_colordigits_judge,
                                     save_colordigits_judge)
from .io import write_json
from .losses import edm_loss
from .utils import command_line, ema_beta, ema_update, pick_device, seed_everything

SPECIALS = ("[PAD]", "<bos>", "[UNK]", "<eos>")
MAX_TOKENS = 12


def build_tokenizer(words):
    """Word-level fast tokenizer (lower-cased, punctuation split off, <bos> ... <eos>)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                       special_tokens=[("<bos>", 1), ("<eos>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="[UNK]",
                                   pad_token="[PAD]", model_max_length=MAX_TOKENS)


def build_text_model(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=MAX_TOKENS,
                         pad_token_id=0, bos_token_id=1, eos_token_id=3)
    return CLIPTextModel(cfg)


def build_unet(channels=(32, 32), cross_attention_dim: int = 64, in_channels: int = 3, size: int = 8):
    """8x8 (plain ResNet blocks) and 4x4 + middle (cross-attention on the text): sized for 2 CPU cores
    (cross-attention at 8x8 too doubled the time of a training step)."""
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=tuple(channels), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=8, time_embedding_type="fourier", flip_sin_to_cos=True)


def edm_scheduler():
    from diffusers import EDMEulerScheduler
    return EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, prediction_type="epsilon")


def train_text_teacher(preset, out_dir, steps: int = 6000, batch: int = 128, lr: float = 1e-3, seed: int = 0,
                       caption_dropout: float = 0.1, ema_halflife_kimg: float = 20.0, device=None,
                       progress: bool = True, eval_per_prompt: int = 4) -> dict:

    device = pick_device(device)
    gen = seed_everything(seed)
    x_tr, y_tr = cd.real_data("train")
    d_tr, k_tr = cd.split_label(y_tr)
    tokenizer = build_tokenizer(cd.vocabulary())
    text_model = build_text_model(len(tokenizer)).to(device).train()
    unet = build_unet().to(device)
    sched = edm_scheduler()
    text = TextEncoder(tokenizer, text_model)
    text.model.requires_grad_(True).train()           # trained jointly with the UNet here
    den = TextUNetDenoiser(unet, {"_class_name": type(sched).__name__, **dict(sched.config)}, text)
    params = [*unet.parameters(), *text_model.parameters()]
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    warmup = max(steps // 20, 1)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_model).eval()
    beta = ema_beta(batch, ema_halflife_kimg)
    t0 = time.time()
    bar = tqdm(range(steps), desc="colordigits teacher (EDM loss)", disable=not progress)

    class _Cond(torch.nn.Module):          # edm_loss calls denoiser(x, sigma, cond) with cond = embeddings
        def __init__(self):
            super().__init__()
            self.den = den

        def forward(self, x, sigma, emb):
            return den.forward_embeds(x, sigma, emb)

        def loss_weight(self, sigma):
            return den.loss_weight(sigma)

    wrapped = _Cond()
    for step in bar:
        idx = torch.randint(0, len(y_tr), (batch,), generator=gen)
        caps = cd.caption_batch(d_tr[idx], k_tr[idx], gen, dropout=caption_dropout)
        emb = text_model(text.tokens(caps).to(device)).last_hidden_state
        loss = edm_loss(wrapped, x_tr[idx].to(device), emb, generator=gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        b = beta if step > warmup else 0.0
        ema_update(ema_unet, unet, b)
        ema_update(ema_text, text_model, b)
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    wall = time.time() - t0
    out_dir = Path(out_dir)
    folder = save_text_pipeline(out_dir / "teacher", ema_unet.cpu(), ema_text.cpu(), tokenizer, sched)
    teacher = load_text_pipeline(folder, preset, device)
    judge = load_colordigits_judge(out_dir / "classifier.safetensors", device)
    metrics = evaluate_text_teacher(teacher, judge, per_prompt=eval_per_prompt, seed=seed, progress=progress,
                                    grid_path=out_dir / "teacher_samples.png")
    manifest = {"model": "colordigits text-to-image teacher (EMA), diffusers layout in teacher/",
                "preset": preset.name, "command": command_line(), "seed": seed, "steps": steps, "batch": batch,
                "lr": lr, "caption_dropout": caption_dropout, "ema_halflife_kimg": ema_halflife_kimg,
                "train_templates": list(cd.TRAIN_TEMPLATES), "heldout_templates": list(cd.HELDOUT_TEMPLATES),
                "wall_seconds": round(wall, 1), "device": str(device),
                "parameters_unet": sum(p.numel() for p in ema_unet.parameters()),
                "parameters_text_encoder": sum(p.numel() for p in ema_text.parameters()),
                "torch": torch.__version__, "metrics": metrics}
    write_json(out_dir / "teacher.json", manifest)
    return manifest


def train_colordigits_judge(preset, out_dir, steps: int = 3000, batch: int = 128, lr: float = 2e-3, seed: int = 0,
                            device=None, progress: bool = True) -> dict:

    device = pick_device(device)
    gen = seed_everything(seed)
    x_tr, y_tr = cd.real_data("train")
    x_te, y_te = cd.real_data("test")
    d_tr, k_tr = cd.split_label(y_tr)
    model = ColorDigitsCNN().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t0 = time.time()
    bar = tqdm(range(steps), desc="colordigits judge", disable=not progress)
    F = torch.nn.functional
    for step in bar:
        idx = torch.randint(0, len(y_tr), (batch,), generator=gen)
        xb = augment_digits(x_tr[idx], gen)
        # brightness jitter so the colour head keys on hue, not on stroke intensity
        xb = ((xb + 1) * (0.75 + 0.5 * torch.rand(batch, 1, 1, 1, generator=gen))).clamp(0, 2) - 1
        _, ld, lk = model.heads(xb.to(device))
        loss = (F.cross_entropy(ld, d_tr[idx].to(device), label_smoothing=0.05)
                + F.cross_entropy(lk, k_tr[idx].to(device), label_smoothing=0.05))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    wall = time.time() - t0
    model.eval()
    with torch.no_grad():
        _, ld, lk = model.heads(x_te.to(device))
    d_te, k_te = cd.split_label(y_te)
    pd, pk = ld.argmax(1).cpu(), lk.argmax(1).cpu()
    metrics = {"digit_accuracy": float((pd == d_te).float().mean()), "color_accuracy": float((pk == k_te).float().mean()),
               "both_accuracy": float(((pd == d_te) & (pk == k_te)).float().mean()), "n_test": len(y_te)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_colordigits_judge(out_dir / "classifier.safetensors", model)
    manifest = {"model": "colordigits judge (digit head + colour head)", "preset": preset.name,
                "command": command_line(), "seed": seed, "steps": steps, "batch": batch, "lr": lr,
                "wall_seconds": round(wall, 1), "device": str(device), "torch": torch.__version__, "metrics": metrics}
    write_json(out_dir / "classifier.json", manifest)
    return manifest
