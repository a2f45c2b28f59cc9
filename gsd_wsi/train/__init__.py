"""Training machinery: patch data, distributed processes, checkpoints."""
