"""Tasks of the MONAI DiffSeg MONAI Label app: bundle discovery, inference, scoring, strategy, training."""
