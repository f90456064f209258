"""The bottom floor, which imports nothing else of kd_jax: the config schema, its loader and command
line, the errors, the mesh and its sharding rules, progress bars."""
