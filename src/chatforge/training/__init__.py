"""Training: a family-agnostic trainer, task data pipelines, schedules and the run driver."""
