"""`mlxq bench`: measurements a user can run on their own machine (see bench/ for the recorded benchmarks)."""
