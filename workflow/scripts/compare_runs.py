"""Snakemake adapter: paired comparisons between the runs of one task."""

from leukotype.smk import logged
from leukotype.stages import run_compare

with logged(snakemake):
    run_compare(
        snakemake.input.metrics,
        snakemake.input.predictions,
        snakemake.input.samples,
        snakemake.params.task,
        snakemake.params.evaluation,
        snakemake.output.csv,
        snakemake.output.figure,
        dataset=snakemake.params.dataset,
    )
