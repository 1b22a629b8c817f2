"""Snakemake adapter: SVM on frozen or fine-tuned features for one run."""

from leukotype.config import svm_feature_layers
from leukotype.smk import logged
from leukotype.stages import run_svm

with logged(snakemake):
    run_svm(
        snakemake.input.samples,
        snakemake.params.task,
        snakemake.wildcards.fold,
        snakemake.input.features,
        svm_feature_layers(
            snakemake.wildcards.svm_strategy, snakemake.wildcards.backbone, snakemake.wildcards.layer
        ),
        snakemake.params.svm,
        snakemake.output.model,
        snakemake.output.predictions,
        snakemake.output.cv_results,
        seed=snakemake.config["split"]["seed"],
        threads=snakemake.threads,
        memory_mb=snakemake.resources.get("mem_mb"),
        out_calibration=snakemake.output.calibration,
    )
