"""Snakemake adapter: export the best run of one task as a model bundle."""

from leukotype.export import run_export_best
from leukotype.smk import logged

with logged(snakemake):
    run_export_best(
        snakemake.config["results"],
        snakemake.config,
        snakemake.wildcards.task,
        snakemake.output.bundle,
    )
