"""Loading and building components: the VAE, the text encoder and tokenizer, the UNet, the noise scheduler; the
ControlNet and the style adapter."""
