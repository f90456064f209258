"""Will a recipe fit the hardware: the dry run behind `--dry-run`, `--max-seq-len` and `--topology`
(dryrun.py), TPU slices and GPU hosts as compile targets on any machine (topology.py), and the
compiled program's FLOPs and bytes with every loop counted (hlo_cost.py). All of it is the
compilers' accounting, never a measured speed. Over the stages in kd_jax/core/."""
