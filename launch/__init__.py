"""Launch scripts: absl entry points for training, evaluation, export and serving."""
