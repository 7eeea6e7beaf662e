"""Serving: sequence, block_manager, scheduler (no torch), sampler, runner, engine, http."""
