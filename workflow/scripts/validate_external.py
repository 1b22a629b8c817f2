"""Snakemake adapter: validate an external test set like the training data."""

from leukotype.smk import logged
from leukotype.stages_external import run_validate_external

with logged(snakemake):
    run_validate_external(
        snakemake.input.dataset,
        snakemake.params.external,
        snakemake.params.validation,
        snakemake.output.table,
        snakemake.output.summary,
        threads=snakemake.threads,
        study=snakemake.input.study,
    )
