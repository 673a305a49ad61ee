"""Training Slide-SAM: config, data (prepared windows), prompt simulation, loss, trainer.

Import the pieces from their modules (``slidesam.training.trainer.train``, ...); this package
root stays empty so that importing one part does not load the others.
"""
