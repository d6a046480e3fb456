"""Bundle code of sdseg_latent_segmentation: kl-f8 autoencoder, vision encoder, latent denoiser, training glue."""
