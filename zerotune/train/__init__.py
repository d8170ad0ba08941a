"""Training: the loop, optimizers and schedules, tasks, checkpoint I/O (see zerotune.train.api for the verb)."""
