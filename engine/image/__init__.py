"""Text-to-image diffusion: U-Net (diffusers layout), CLIP text encoder (transformers layout), schedulers,
the sampling pipeline, the model folder and the training command."""
