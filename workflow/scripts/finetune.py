"""Snakemake adapter: fine-tune one backbone for one task and fold."""

from leukotype.smk import logged
from leukotype.stages import run_finetune

with logged(snakemake):
    run_finetune(
        snakemake.input.samples,
        snakemake.input.validated,
        snakemake.params.task,
        snakemake.wildcards.backbone,
        snakemake.wildcards.fold,
        snakemake.params.weights,
        snakemake.config["torch_home"],
        snakemake.params.settings,
        snakemake.params.checkpoint_dir,
        snakemake.output,
        feature_dirs=snakemake.input.features,
        threads=snakemake.threads,
    )
