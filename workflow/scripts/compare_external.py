"""Snakemake adapter: paired comparisons between the runs of one task on one external set."""

from leukotype.smk import logged
from leukotype.stages_external import run_compare_external

with logged(snakemake):
    run_compare_external(
        snakemake.input.metrics,
        snakemake.input.predictions,
        snakemake.input.samples,
        snakemake.input.validated,
        snakemake.params.task,
        snakemake.params.external,
        snakemake.params.evaluation,
        snakemake.output.csv,
        snakemake.output.figure,
    )
