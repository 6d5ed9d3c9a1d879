"""Built-in objectives: per-sample losses on images in [0, 1], lower is better."""
