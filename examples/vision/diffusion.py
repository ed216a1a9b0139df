"""DDPM on digits: a small diffusers ``UNet2DModel`` learns to predict the noise added at a random
timestep (Ho et al., arXiv 2006.11239).

The per-sample loss is the noise-prediction MSE of each image, returned with the timesteps that
produced it — ``{"loss", "sample_losses", "timesteps"}`` — so a reweighting callback can
normalise within timestep buckets (raw per-sample diffusion losses mostly reflect the timestep).
Validation uses a fixed generator: the same noise and timesteps every epoch, so ``val/loss`` is
comparable across epochs and runs.

    lit-efficient fit --config examples/vision/ddpm_digits.yaml
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from lightning.pytorch import LightningModule

from examples.common import total_training_steps, warmup_cosine
from lit_efficient.core.logs import tensorboard_writer


class DDPMDigits(LightningModule):
    """Noise-prediction DDPM with a diffusers UNet.

    Args:
        sample_size: image side (16 by default: digits upsampled; the UNet halves it per level).
        channels: output channels of each UNet level (default ``[32, 64]``).
        layers_per_block: ResNet layers per UNet block (default 1).
        attention: put self-attention in the lowest-resolution level (default True).
        num_train_timesteps: diffusion steps of the DDPM noise schedule (default 1000).
        lr: AdamW learning rate (default 1e-3), cosine-decayed per step; weight decay 0.
        sample_every_n_epochs: log a grid of 16 generated samples to TensorBoard every n epochs
            (0, the default, never).
        num_inference_steps: reverse-chain steps used by ``sample`` (default 100, in
            ``[1, num_train_timesteps]``): the full 1000-step chain costs ~40 s for 16 images on
            a 2-core CPU, 100 steps about a tenth of that.
    """

    def __init__(
        self,
        sample_size: int = 16,
        channels: Optional[list[int]] = None,
        layers_per_block: int = 1,
        attention: bool = True,
        num_train_timesteps: int = 1000,
        lr: float = 1e-3,
        sample_every_n_epochs: int = 0,
        num_inference_steps: int = 100,
    ) -> None:
        super().__init__()
        channels = list(channels or [32, 64])
        if len(channels) < 2 or any(c < 8 or c % 8 for c in channels):
            raise ValueError(f"`channels` needs >= 2 levels, each a multiple of 8 (GroupNorm of 8); got {channels}")
        if sample_size % 2 ** (len(channels) - 1):
            raise ValueError(f"`sample_size` {sample_size} must be divisible by "
                             f"2^(levels-1) = {2 ** (len(channels) - 1)}")
        if lr <= 0:
            raise ValueError(f"`lr` must be > 0; got {lr}")
        if sample_every_n_epochs < 0:
            raise ValueError(f"`sample_every_n_epochs` must be >= 0; got {sample_every_n_epochs}")
        if not 1 <= num_inference_steps <= num_train_timesteps:
            raise ValueError(
                f"`num_inference_steps` must be in [1, num_train_timesteps={num_train_timesteps}]; "
                f"got {num_inference_steps}"
            )
        self.save_hyperparameters()
        down = ["DownBlock2D"] * len(channels)
        up = ["UpBlock2D"] * len(channels)
        if attention:
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        self.unet = UNet2DModel(sample_size=sample_size, in_channels=1, out_channels=1,
                                block_out_channels=tuple(channels), layers_per_block=layers_per_block,
                                down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=8)
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        size = self.hparams.sample_size
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x * 2.0 - 1.0  # [0, 1] pixels to the [-1, 1] range DDPM assumes

    def noise_losses(self, x: torch.Tensor, generator: Optional[torch.Generator] = None):
        """Per-sample noise-prediction MSE and the timesteps used."""
        x0 = self._prepare(x)
        # Draw on the generator's device, then move: a CPU generator (validation's fixed one) cannot
        # feed torch.randn(device="cuda"), and this keeps validation noise identical on every device.
        gen_device = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=gen_device).to(x0.device)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator,
                          device=gen_device).to(x0.device)
        noisy = self.noise_scheduler.add_noise(x0, noise, t)
        prediction = self.unet(noisy, t).sample
        return (prediction - noise).pow(2).flatten(1).mean(dim=1), t

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        losses, t = self.noise_losses(batch[0])
        self.log("train/loss", losses.mean(), on_step=True, on_epoch=False, prog_bar=True)
        return {"loss": losses.mean(), "sample_losses": losses, "timesteps": t}

    def on_validation_epoch_start(self) -> None:
        self._val_generator = torch.Generator().manual_seed(1234)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        losses, _ = self.noise_losses(batch[0], generator=self._val_generator)
        self.log("val/loss", losses.mean(), on_step=False, on_epoch=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        every = self.hparams.sample_every_n_epochs
        if every <= 0 or self.trainer.sanity_checking or (self.current_epoch + 1) % every:
            return
        writer = tensorboard_writer(self.trainer)
        if writer is not None:
            images = self.sample(16, generator=torch.Generator().manual_seed(0))
            grid = images.view(4, 4, self.hparams.sample_size, self.hparams.sample_size)
            grid = grid.permute(0, 2, 1, 3).reshape(4 * self.hparams.sample_size, 4 * self.hparams.sample_size)
            writer.add_image("samples", grid, self.global_step, dataformats="HW")

    @torch.no_grad()
    def sample(
        self, n: int, generator: Optional[torch.Generator] = None, num_inference_steps: Optional[int] = None
    ) -> torch.Tensor:
        """Generate ``n`` images in [0, 1] with the DDPM reverse chain, ``num_inference_steps`` long
        (default: the ``num_inference_steps`` hyperparameter)."""
        size = self.hparams.sample_size
        x = torch.randn((n, 1, size, size), generator=generator).to(self.device)
        scheduler = DDPMScheduler.from_config(self.noise_scheduler.config)
        scheduler.set_timesteps(num_inference_steps or self.hparams.num_inference_steps)
        for t in scheduler.timesteps:
            x = scheduler.step(self.unet(x, t).sample, t, x, generator=generator).prev_sample
        return ((x + 1) / 2).clamp(0, 1)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.unet.parameters(), lr=self.hparams.lr, weight_decay=0.0)
        scheduler = warmup_cosine(optimizer, total_training_steps(self.trainer), 0.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
