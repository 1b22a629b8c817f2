"""Snakemake adapter: paper-style table and figures of one task."""

from leukotype.smk import logged
from leukotype.stages import run_summarise

with logged(snakemake):
    run_summarise(
        snakemake.input.metrics,
        snakemake.params.task,
        snakemake.output.csv,
        snakemake.output.accuracy,
        snakemake.output.confusion,
        dataset=snakemake.params.dataset,
        comparisons=snakemake.input.comparisons,
        baselines=snakemake.params.baselines,
        out_per_class=snakemake.output.per_class,
    )
