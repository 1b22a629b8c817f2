"""Snakemake adapter: the reliability diagram of one task's runs."""

from leukotype.smk import logged
from leukotype.stages import run_reliability

with logged(snakemake):
    run_reliability(
        snakemake.input.metrics,
        snakemake.params.task,
        snakemake.output.figure,
        dataset=snakemake.params.dataset,
    )
