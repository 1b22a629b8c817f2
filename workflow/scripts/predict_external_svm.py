"""Snakemake adapter: a trained SVM run's predictions for an external set."""

from leukotype.smk import logged
from leukotype.stages_external import run_predict_external_svm

with logged(snakemake):
    run_predict_external_svm(
        snakemake.input.model,
        snakemake.input.validated,
        snakemake.params.task,
        snakemake.params.external,
        snakemake.input.features,
        snakemake.wildcards.layer,
        snakemake.output.predictions,
    )
