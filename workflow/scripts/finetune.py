"""Snakemake adapter: fine-tune one backbone for one task and fold."""

from leukotype.config import finetune_execution_settings
from leukotype.smk import logged
from leukotype.stages import FinetuneOutputs, run_finetune

with logged(snakemake):
    backbone = snakemake.wildcards.backbone
    # params hold what changes the model; device, workers and the fast path come from the
    # config so that changing them never reschedules the job.
    settings = {**finetune_execution_settings(snakemake.config, backbone), **snakemake.params.settings}
    run_finetune(
        snakemake.input.samples,
        snakemake.input.validated,
        snakemake.params.task,
        backbone,
        snakemake.wildcards.fold,
        snakemake.params.weights,
        snakemake.config["torch_home"],
        settings,
        snakemake.params.checkpoint_dir,
        FinetuneOutputs(
            model=snakemake.output.model,
            history=snakemake.output.history,
            curve=snakemake.output.curve,
            predictions=snakemake.output.predictions,
            features=snakemake.output.features,
            calibration=snakemake.output.calibration,
        ),
        feature_dirs=snakemake.input.features,
        threads=snakemake.threads,
        sha256=snakemake.params.sha256,
        preprocessing=snakemake.params.preprocessing,
        preprocessing_files=snakemake.input.preprocessing,
    )
