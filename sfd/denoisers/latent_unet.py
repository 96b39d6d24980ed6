"""Stable Diffusion as a project :class:`Denoiser`: the text UNet adapter in the VAE's latent space.

SD is a discrete VP model (scaled-linear betas, epsilon or v prediction) on latents
x0 = scaling_factor * E(image); :class:`~sfd.denoisers.text_unet.TextUNetDenoiser` already converts it to
D(x, sigma, c) with c an id into the run's prompt table. This adapter adds only what the latent space
needs: the VAE -- used solely to *decode* for evaluation and export, never in the SFD losses, held once
and shared by the clones like the text encoder -- and the LoRA host (sfd.denoisers.lora) when the
generator and fake score are adapters on this one frozen UNet.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..io import CheckpointError
from .text_unet import Shared, TextUNetDenoiser, load_component, load_text_components


class LatentTextUNet(TextUNetDenoiser):
    """D(x, sigma, c) on SD latents; :meth:`decode` turns latents into images in [-1, 1]."""

    def __init__(self, unet, scheduler_config: dict, text, vae, prompts=None, embed_shape=None):
        super().__init__(unet, scheduler_config, text, prompts=prompts, embed_shape=embed_shape)
        if self.edm:
            raise CheckpointError("a Stable Diffusion scheduler has a beta schedule (DDPM/PNDM/DDIM scaled-linear); "
                                  "this one is EDM")
        self.vae = Shared(vae)
        self.adapters = None                 # sfd.denoisers.lora.AdapterHost once LoRA views are added
        if vae is not None:
            lat = int(vae.config.latent_channels)
            if lat != self.img_shape[0]:
                raise CheckpointError(f"the VAE has {lat} latent channels but the UNet takes {self.img_shape[0]} — "
                                      f"unet/ and vae/ come from different models")

    def identity_parts(self) -> dict[str, bytes]:
        """The text encoder's parts and the VAE's weights and scaling factor: the VAE turns the teacher's latents
        into the images every judge sees, so a teacher with another VAE is another teacher (its stage 1, chain
        check and cached figures are not shared). Without a VAE (no ``vae/``): the text parts alone."""
        parts = super().identity_parts()
        vae = self.vae.obj
        if vae is not None:
            parts.update({f"vae.{k}": v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                          for k, v in vae.state_dict().items()})
            parts["vae.scaling_factor"] = repr(float(vae.config.scaling_factor)).encode()
        return parts

    def decode(self, latents: torch.Tensor, batch: int = 4) -> torch.Tensor:
        if self.vae.obj is None:
            raise CheckpointError("this denoiser has no VAE: load it from a pipeline folder with vae/")
        return decode_latents(self.vae.obj, latents, batch)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        if enabled and self.adapters is not None:     # recompute each block under its own adapter
            self.unet.enable_gradient_checkpointing(self.adapters.checkpoint_fn())
        else:
            super().set_gradient_checkpointing(enabled)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """Clean latents x0 -> images in [-1, 1] (N, 3, H, W), fp32 on the CPU: D(x0 / scaling_factor)."""
    p = next(vae.parameters())
    scale = float(vae.config.scaling_factor)
    out = [vae.decode(z.to(p.device, p.dtype) / scale).sample.float().clamp(-1, 1).cpu() for z in latents.split(batch)]
    return torch.cat(out) if out else torch.zeros(0, 3, 1, 1)


def load_sd_pipeline(path, preset=None, device="cpu", **_ignored) -> LatentTextUNet:
    """The SD teacher from a local pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/);
    safetensors (a ``.bin`` only through ``torch.load(weights_only=True)``), never a download."""
    from diffusers import AutoencoderKL
    path = Path(path)
    if not (path / "vae" / "config.json").is_file():
        raise CheckpointError(f"{path} has no vae/ — the sd preset needs a Stable Diffusion pipeline folder (unet/, "
                              f"vae/, text_encoder/, tokenizer/, scheduler/), e.g. one saved by diffusers' "
                              f"StableDiffusionPipeline.save_pretrained")
    unet, text, sched = load_text_components(path, device)
    vae = load_component(AutoencoderKL, path / "vae", "AutoencoderKL").to(device).eval().requires_grad_(False)
    return LatentTextUNet(unet, sched, text, vae).to(device).eval()
