"""Snakemake adapter: leakage-safe split of one task."""

from leukotype.smk import logged
from leukotype.stages import run_split

with logged(snakemake):
    run_split(snakemake.input.validated, snakemake.params.task, snakemake.params.split, snakemake.output.table)
