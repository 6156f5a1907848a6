"""The MLX process for one rank: join the group, load this rank's shard,
prove it computes what the whole model computes, then serve in lockstep."""
