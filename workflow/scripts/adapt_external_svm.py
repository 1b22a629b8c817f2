"""Snakemake adapter: few-shot adaptation of one SVM run to an external set (adapt: shots)."""

from leukotype.config import svm_feature_layers
from leukotype.smk import logged
from leukotype.stages_external import run_adapt_external_svm

with logged(snakemake):
    run_adapt_external_svm(
        snakemake.input.model,
        snakemake.input.samples,
        snakemake.wildcards.fold,
        snakemake.input.features,
        snakemake.input.validated,
        snakemake.params.task,
        snakemake.params.external,
        snakemake.input.external_features,
        svm_feature_layers(
            snakemake.wildcards.svm_strategy, snakemake.wildcards.backbone, snakemake.wildcards.layer
        ),
        snakemake.params.seed,
        snakemake.output.predictions,
        snakemake.output.internal,
        snakemake.output.shots,
        snakemake.output.model,
        memory_mb=snakemake.resources.get("mem_mb"),
    )
