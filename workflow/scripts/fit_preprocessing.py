"""Snakemake adapter: a preprocessing variant's fitted states (stain reference) from training images."""

from leukotype.smk import logged
from leukotype.stages import run_fit_preprocessing

with logged(snakemake):
    run_fit_preprocessing(
        snakemake.input.validated,
        snakemake.input.splits,
        snakemake.params.preprocessing,
        snakemake.input.analyses,
        snakemake.params.seed,
        snakemake.output.state,
    )
