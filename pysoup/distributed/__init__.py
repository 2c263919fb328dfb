"""Merges bigger than one machine: the plan's output shards as tasks on a cluster (Ray). (Issue 15 fills this
room.)"""
