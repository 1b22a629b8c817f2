"""Snakemake adapter: metrics, confidence intervals and confusion matrix of one run."""

from leukotype.smk import logged, run_meta
from leukotype.stages import run_evaluate

with logged(snakemake):
    meta = {**run_meta(snakemake.wildcards), "weights": snakemake.params.weights, "config": snakemake.config}
    run_evaluate(
        snakemake.input.predictions,
        snakemake.input.samples,
        snakemake.params.task,
        meta,
        snakemake.params.evaluation,
        snakemake.output.metrics,
        snakemake.output.confusion,
        snakemake.output.confusion_png,
        feature_dirs=snakemake.input.features,
        cv_results=(snakemake.input.cv_results or [None])[0],
        calibration=snakemake.input.calibration,
    )
