"""pgolf trainer: data, model, optimiser, training loop, quantisation and the artifact format."""

__version__ = "0.1.0"
