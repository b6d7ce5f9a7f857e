"""The Locust load test and the TorchServe batch-size sweep built on it."""
