"""Snakemake adapter: a per-image preprocessing step's table (crop boxes) for a data set."""

from leukotype.smk import logged
from leukotype.stages import run_analyse_images

with logged(snakemake):
    run_analyse_images(snakemake.input.validated, snakemake.params.step, snakemake.output.table)
