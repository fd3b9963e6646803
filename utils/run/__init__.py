"""The run scaffold both trainers share: `scaffold.Run` (folder, seeds, step counts, resume, checkpoints, the
non-finite guard, progress, summary) and what it is built from: `run_state` (save and resume across ranks),
`run_folder` (checkpoint layout, markers, pruning), `config_policy` (which config keys a resume may change),
`output_lock`, `rng_state`, `step_state` (a step's buffers kept or restored), `elastic` and `reshard` (a checkpoint
continued at another world size)."""
