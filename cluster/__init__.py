"""Cluster job submission: `bihm submit slurm|ray`, the sbatch templates, a local SLURM."""
