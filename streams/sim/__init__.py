"""The event simulator behind ``clv simulate``: a seeded synthetic shop whose customers
carry learnable signal, with its own ground truth. Entry point: ``streams.simulate``."""
