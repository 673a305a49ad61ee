"""Training: the Slide-SAM hybrid loss and training-time prompt simulation."""
