"""Snakemake adapter: one table of every run, and the study's provenance record."""

from leukotype.smk import logged
from leukotype.stages import run_collect

with logged(snakemake):
    run_collect(
        snakemake.input.metrics,
        snakemake.input.validation,
        snakemake.config,
        snakemake.output.runs,
        snakemake.output.study,
    )
