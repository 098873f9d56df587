"""The differential cache oracle: seeded workloads run with the prefix cache on, checked against
cache-off greedy references and the memory invariants (see `workload`, `driver`, `shrink`)."""
