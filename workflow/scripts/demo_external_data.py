"""Snakemake adapter: the synthetic demo's external set (another stain and magnification)."""

from leukotype.smk import logged
from leukotype.stages_external import run_demo_external

with logged(snakemake):
    run_demo_external(snakemake.output.manifest, snakemake.params.demo)
