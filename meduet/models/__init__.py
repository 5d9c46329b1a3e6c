"""Networks: the 3-D KL-VAE tokenizer (and, later, the latent ViT and diffusion models)."""
