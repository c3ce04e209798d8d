"""Federated learning: client actors that keep their data, aggregation strategies, secure
aggregation and differential privacy. Imports point federated -> actors -> training."""
