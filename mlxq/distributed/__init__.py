"""Serving one model from several machines (or processes) on MLX's collectives (`mx.distributed`).

- `split.py`: which share of a model each rank holds (pipeline, tensor or experts parallel), read lazily;
- `pipeline.py`: pipeline stages and micro-batches;
- `control.py`: rank 0 telling the others what to run, heartbeats, failure detection;
- `runner.py`: the engine's runner over a group (rank 0) and the loop the other ranks follow;
- `group.py`: start-up (version and model checks, loading the shares), `GroupModel`;
- `launch.py`: starting the ranks from a host file (`mlxq serve/generate/chat --hosts`).

Rank 0 runs the one engine (scheduler, sampling, outputs) and the HTTP server; the other ranks run the same runner
operations on their shares, in the same order.
"""
