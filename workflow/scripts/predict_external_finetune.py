"""Snakemake adapter: a fine-tuned network's predictions and features for an external set."""

from leukotype.config import finetune_execution_settings
from leukotype.smk import logged
from leukotype.stages_external import run_predict_external_finetune

with logged(snakemake):
    run_predict_external_finetune(
        snakemake.input.model,
        snakemake.input.validated,
        snakemake.params.task,
        snakemake.params.external,
        snakemake.wildcards.backbone,
        {**finetune_execution_settings(snakemake.config, snakemake.wildcards.backbone), **snakemake.params.settings},
        snakemake.output.predictions,
        snakemake.output.features,
        feature_dirs=snakemake.input.features,
        adapt=snakemake.wildcards.adapt,
        threads=snakemake.threads,
        preprocessing=snakemake.params.preprocessing,
        preprocessing_files=snakemake.input.preprocessing,
    )
