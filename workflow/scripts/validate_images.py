"""Snakemake adapter: decode and check every image once."""

from leukotype.smk import logged
from leukotype.stages import run_validation

with logged(snakemake):
    run_validation(
        snakemake.input.dataset,
        snakemake.params.tasks,
        snakemake.params.validation,
        snakemake.output.table,
        snakemake.output.summary,
        threads=snakemake.threads,
    )
