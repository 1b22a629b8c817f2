"""Snakemake adapter: the saliency gallery of one task's best run (its model bundle)."""

from leukotype.gallery import run_gallery
from leukotype.smk import logged

with logged(snakemake):
    run_gallery(
        snakemake.input.bundle,
        snakemake.input.predictions,
        snakemake.input.validated,
        snakemake.params.gallery["correct"],
        snakemake.params.gallery["wrong"],
        snakemake.output.figure,
        snakemake.output.cells,
        dataset=snakemake.params.dataset,
        threads=snakemake.threads,
    )
