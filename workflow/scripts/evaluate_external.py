"""Snakemake adapter: one run's metrics on an external set, next to its internal ones."""

from leukotype.smk import logged, run_meta
from leukotype.stages_external import run_evaluate_external

with logged(snakemake):
    meta = {**run_meta(snakemake.wildcards), "config": snakemake.config}
    run_evaluate_external(
        snakemake.input.predictions,
        snakemake.input.internal,
        snakemake.input.samples,
        snakemake.input.validated,
        snakemake.params.task,
        snakemake.params.external,
        meta,
        snakemake.params.evaluation,
        snakemake.output.metrics,
        shots=snakemake.input.get("shots"),
    )
