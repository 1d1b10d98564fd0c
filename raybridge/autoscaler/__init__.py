"""Ray's own autoscaler on the head, with Slurm member jobs as its nodes (config.py says how)."""
