"""Snakemake adapter: generate the synthetic demo dataset."""

from leukotype.smk import logged
from leukotype.stages import run_demo

with logged(snakemake):
    run_demo(snakemake.output.manifest, snakemake.params.demo)
