"""FedRE: model-heterogeneous federated learning (each client its own architecture)."""
