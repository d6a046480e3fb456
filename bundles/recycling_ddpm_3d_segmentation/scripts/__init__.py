"""Bundle code of recycling_ddpm_3d_segmentation: the ImgX-DiffSeg v0.1.0 time-conditioned 3D U-Net and data prep."""
