"""Bundle code of diffusion_probe_3d_segmentation: the feature-pyramid diffusion backbone, anatomical coordinates,
multi-timestep feature extraction, FPN probing heads and the demo data preparation."""
