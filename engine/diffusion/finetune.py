"""What every diffusion family's LoRA fine-tuner shares: the task over noised training targets
(``engine.finetune.Task`` for pixels or latents), used by the shapes image and Stable Diffusion fine-tuners."""
from __future__ import annotations

from engine.finetune import Task


class DenoiserTask(Task):
    """A diffusion family's task: ``self.x0`` (N, C, H, W) training targets (pixels or latents), index arrays
    ``train_idx``, ``val_idx`` and ``prior_idx`` (prior-preservation samples, trained on, never validated; may be
    empty), ``acp`` (alpha-bar per training timestep) and ``self.a`` (batch, caption_dropout, prior_share); the family
    writes ``_loss(idx, t, noise, drop)`` (drop: the captions trained as empty)."""

    def adapt(self, unet, text_encoder, unet_targets: tuple, text_targets: tuple) -> None:
        """LoRA on the U-Net, and on the text encoder when ``self.a.text_encoder`` (else it stays frozen): sets
        ``spec`` (for saving), ``paths`` and ``model``."""
        import torch

        from engine.nn.lora import LoraSpec, wrap

        a, text = self.a, bool(getattr(self.a, "text_encoder", True))
        self.spec = LoraSpec(a.rank, a.alpha, a.dropout, unet_targets + (text_targets if text else ()))
        self.paths = wrap(unet, LoraSpec(a.rank, a.alpha, a.dropout, unet_targets), seed=a.seed)
        if text:
            self.paths += wrap(text_encoder, LoraSpec(a.rank, a.alpha, a.dropout, text_targets), seed=a.seed + 1)
        else:
            for p in text_encoder.parameters():
                p.requires_grad_(False)
        self.model = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})

    def _loss(self, idx, t, noise, drop):
        raise NotImplementedError

    def batch(self, rng):
        import torch

        idx = self.draw(rng, self.a.batch, getattr(self.a, "prior_share", 0.0))
        t = torch.from_numpy(rng.integers(0, len(self.acp), size=self.a.batch))
        noise = torch.from_numpy(rng.standard_normal((self.a.batch, *self.x0.shape[1:])).astype("float32"))
        drop = torch.from_numpy(rng.random(self.a.batch) < self.a.caption_dropout)
        return tuple(x.to(self.device) for x in (torch.from_numpy(idx), t, noise, drop))

    def loss(self, batch):
        return self._loss(*batch)

    def val_loss(self) -> float:
        """The loss on the held-out images at 8 fixed timesteps and noises (the same at every evaluation)."""
        import numpy as np
        import torch

        idx = self.val_idx if len(self.val_idx) else self.train_idx[:1]
        rng = np.random.default_rng(12345)
        total = 0.0
        for t in np.linspace(50, len(self.acp) - 50, 8).astype(int):
            noise = torch.from_numpy(rng.standard_normal((len(idx), *self.x0.shape[1:])).astype("float32"))
            batch = (torch.from_numpy(idx), torch.full((len(idx),), int(t)), noise,
                     torch.zeros(len(idx), dtype=torch.bool))
            total += float(self._loss(*(x.to(self.device) for x in batch)))
        return total / 8
