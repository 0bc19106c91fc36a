"""The one error every checkpoint problem raises."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as a Flux transformer; the message says exactly why."""


# Users catch and see it as srpo_infer.checkpoint.CheckpointError (tracebacks, pickles across Ray processes).
CheckpointError.__module__ = "srpo_infer.checkpoint"
