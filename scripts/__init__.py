"""Command-line scripts: prepare the model, build archives, run TorchServe, measure and benchmark."""
