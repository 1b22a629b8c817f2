"""Snakemake adapter: features of one backbone for every image x transform."""

from leukotype.smk import logged
from leukotype.stages import run_extract

with logged(snakemake):
    run_extract(
        snakemake.input.validated,
        snakemake.wildcards.backbone,
        snakemake.params.layers,
        snakemake.params.weights,
        snakemake.params.sha256,
        snakemake.config["torch_home"],
        snakemake.params.augmentation,
        # batch size, workers and device change speed, not values: read from the config rather
        # than params so that changing them does not trigger a re-extraction.
        {**snakemake.config["features"], **snakemake.params.features},
        snakemake.output[0],
        threads=snakemake.threads,
        memory_mb=snakemake.resources.get("mem_mb"),
        preprocessing=snakemake.params.preprocessing,
        preprocessing_files=snakemake.input.preprocessing,
    )
