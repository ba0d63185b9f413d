"""Every format other than ldm's own: LoRA files (Diffusers and kohya), the single-file checkpoint, the Hub (model
cards, uploads)."""
