"""The learning itself: the model zoo and its parts, data and shards, FedAvg, the centralized baseline."""
