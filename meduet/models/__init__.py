"""Networks: the 3-D KL-VAE tokenizer, the MeDUET latent ViT and their shared blocks."""
