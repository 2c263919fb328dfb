"""Federated and decentralized aggregation: server-side aggregators (FedAvg family, FedAU), gossip with variance
correction, NoLoCo's outer step, on the engine's fused kernels. (Issue 12 fills this room.)"""
