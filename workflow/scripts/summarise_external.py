"""Snakemake adapter: internal vs external table and figure of one task."""

from leukotype.smk import logged
from leukotype.stages_external import run_external_table

with logged(snakemake):
    run_external_table(
        snakemake.input.external,
        snakemake.input.internal,
        snakemake.params.task,
        snakemake.params.externals,
        snakemake.output.csv,
        snakemake.output.figure,
        dataset=snakemake.params.dataset,
        comparisons=dict(zip(snakemake.params.compared, snakemake.input.comparisons)),
    )
