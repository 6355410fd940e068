"""Runs past one machine, on the engines clusters already have (DESIGN §6a): the unit of distribution is a
shard, a resumable run with its own journal; Slurm job arrays and Ray place and retry shards, we never
schedule. ``auto_shard``: which shard this process is, from the launcher's variables (``--shard auto``);
``ray_run``: ``mics run --ray``, the shards as Ray tasks; ``shard_task``: one shard inside its task;
``cache_backup``: a shard's node-local call cache, copied beside its journal."""
